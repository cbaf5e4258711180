"""Typed views of the service's responses (§2–§5, §8): parsed once at the edge, used everywhere else."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class TaskStatus(enum.StrEnum):
    """`task_status` values (§4). SUSPENDED appears only in the SDK's enum; it is treated as still running.

    A value the docs do not list reads as UNRECOGNISED, which is not terminal: the service may add a state, and
    reading it as UNKNOWN ("the task is gone") would submit the item again and pay twice. Only the literal UNKNOWN
    means gone (§4: it is also the documented answer for a task id the service does not know).
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    UNKNOWN = "UNKNOWN"
    SUSPENDED = "SUSPENDED"
    UNRECOGNISED = "UNRECOGNISED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @classmethod
    def parse(cls, value: object) -> TaskStatus:
        try:
            return cls(str(value))
        except ValueError:
            return cls.UNRECOGNISED


_TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.UNKNOWN})

_SHORTEST = len("YYYY-MM-DD hh:mm:ss")


def parse_service_time(value: object) -> datetime | None:
    """`YYYY-MM-DD HH:mm:ss.SSS`, no zone (§1). Unparseable values are dropped rather than failing a poll."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)  # C speed: strptime took 6 µs, three times per task
    except ValueError:
        return None
    # fromisoformat also takes dates alone and zoned times; the wire format is neither.
    return moment if moment.tzinfo is None and len(value) >= _SHORTEST else None


@dataclass(frozen=True, slots=True)
class DetectResult:
    passed: bool
    message: str
    request_id: str | None


@dataclass(frozen=True, slots=True)
class SubmitResult:
    task_id: str
    status: TaskStatus
    request_id: str | None


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """One `GET /tasks/{id}` answer. FAILED and UNKNOWN are results here, not exceptions."""

    task_id: str
    status: TaskStatus
    raw_status: str = ""
    """`task_status` as the service spelled it (what an UNRECOGNISED status really said)."""
    submit_time: datetime | None = None
    scheduled_time: datetime | None = None
    end_time: datetime | None = None
    video_url: str | None = None
    video_duration: float | None = None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None

    @classmethod
    def from_body(cls, task_id: str, body: dict[str, Any]) -> TaskInfo:
        out = body.get("output") or {}
        results = out.get("results") or {}
        # §4's `output.results.video_url`, or the flat `output.video_url` of the sibling video models (EMO, Wan)
        video_url = (results.get("video_url") if isinstance(results, dict) else None) or out.get("video_url")
        usage = body.get("usage") or {}
        duration = usage.get("video_duration")
        return cls(
            task_id=str(out.get("task_id") or task_id),
            status=TaskStatus.parse(out.get("task_status")),
            raw_status=str(out.get("task_status")),
            submit_time=parse_service_time(out.get("submit_time")),
            scheduled_time=parse_service_time(out.get("scheduled_time")),
            end_time=parse_service_time(out.get("end_time")),
            video_url=video_url if isinstance(video_url, str) and video_url else None,
            video_duration=float(duration) if isinstance(duration, int | float) else None,
            code=out.get("code"),
            message=out.get("message"),
            request_id=body.get("request_id"),
        )


@dataclass(frozen=True, slots=True)
class TaskListEntry:
    """A row of `GET /tasks` (§5): `status` and epoch-millisecond times, unlike the single-task query."""

    task_id: str
    status: TaskStatus
    model_name: str | None
    request_id: str | None
    gmt_create_ms: int | None
    end_time_ms: int | None


@dataclass(frozen=True, slots=True)
class TaskListPage:
    total: int
    page_no: int
    page_size: int
    entries: list[TaskListEntry]

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> TaskListPage:
        entries = [
            TaskListEntry(
                task_id=str(row.get("task_id")),
                status=TaskStatus.parse(row.get("status")),
                model_name=row.get("model_name"),
                request_id=row.get("request_id"),
                gmt_create_ms=row.get("gmt_create"),
                end_time_ms=row.get("end_time"),
            )
            for row in body.get("data") or []
        ]
        return cls(
            total=int(body.get("total") or 0),
            page_no=int(body.get("page_no") or 1),
            page_size=int(body.get("page_size") or len(entries)),
            entries=entries,
        )


@dataclass(frozen=True, slots=True)
class UploadPolicy:
    """A temporary-storage upload credential (§8): valid `expire_in_seconds` after it was fetched."""

    model: str
    policy: str
    signature: str
    upload_dir: str
    upload_host: str
    expire_in_seconds: float
    max_file_size_mb: float
    oss_access_key_id: str
    x_oss_object_acl: str
    x_oss_forbid_overwrite: str
    fetched_at: float  # anyio clock

    @classmethod
    def from_body(cls, model: str, body: dict[str, Any], fetched_at: float) -> UploadPolicy:
        data = body.get("data") or {}
        return cls(
            model=model,
            policy=str(data["policy"]),
            signature=str(data["signature"]),
            upload_dir=str(data["upload_dir"]),
            upload_host=str(data["upload_host"]),
            # the doc types these as strings but the example returns numbers: accept both
            expire_in_seconds=float(data.get("expire_in_seconds", 300)),
            max_file_size_mb=float(data.get("max_file_size_mb", 100)),
            oss_access_key_id=str(data["oss_access_key_id"]),
            x_oss_object_acl=str(data.get("x_oss_object_acl", "private")),
            x_oss_forbid_overwrite=str(data.get("x_oss_forbid_overwrite", "true")),
            fetched_at=fetched_at,
        )
