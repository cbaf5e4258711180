"""The state-store interface every backend implements, and the records it hands back."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from lpengine.client.limits import SharedPacer


@dataclass(frozen=True, slots=True)
class StoredItem:
    item_id: str
    output_name: str
    state: str | None
    stage: str
    task_id: str | None
    data: dict[str, Any]


FileStamp = tuple[int, int, int, int]
"""(size, mtime_ns, ctime_ns, inode) of a file. Writing a file changes its ctime, which no tool can set back, so an
equal stamp means the same content (git's index relies on the same fields)."""


def file_stamp(path: str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass(frozen=True, slots=True)
class StoredUpload:
    url: str
    needs_resolve_header: bool
    expires_at: float
    created_key: str | None


@dataclass(frozen=True, slots=True)
class QueueView:
    """The account's tasks outstanding at the service that other workers hold, on this process's clock
    (`anyio.current_time()`): what a worker's prediction of its own tasks must chain through, since the account
    runs every worker's tasks one at a time in the order they were submitted."""

    runner_free: float | None
    """When the account's runner last finished a task, as far as any worker has seen; None: not seen yet."""
    queued: list[tuple[float, float]]
    """(submitted at, audio seconds) of each of those tasks."""


class AccountQueue(Protocol):
    """The account-wide submission window and queue (PostgreSQL: `lpengine.account_tasks`), shared by every worker
    of every batch on the account."""

    async def take(self, item_id: str, window: int, audio_s: float) -> bool:
        """A place in the account's window for the item; False while `window` tasks of the account are out."""
        ...

    async def submitted(self, item_id: str) -> float:
        """The item's task is at the service: it is queued in this order (returned, local clock)."""
        ...

    async def release(self, item_id: str, runner_free: float | None) -> None:
        """The item's task left the service (or was never sent); `runner_free`: when the runner was last seen free."""
        ...

    async def view(self) -> QueueView: ...


class Coordinator(Protocol):
    """How cooperative workers share one batch (PostgreSQL): leases on items, heartbeats, takeover."""

    heartbeat_every: float
    """Seconds between heartbeats."""

    async def heartbeat(self) -> None: ...
    async def claim_item(self, item_id: str) -> bool: ...
    async def deferred(self, item_ids: list[str]) -> tuple[list[StoredItem], list[str]]: ...
    def pacer(self, account: str) -> SharedPacer: ...
    def account_queue(self, account: str) -> AccountQueue: ...


class StateStore(Protocol):
    """What the engine needs from durable state; `tests/unit/test_store_contract.py` holds every backend to it.

    Every write is durable when it returns. `together()` groups writes that follow one another: SQLite commits them
    as one transaction (one WAL append instead of several); a backend may also commit them one by one, since the
    engine orders its writes so that a crash between any two of them is recovered from (the claim before the item's
    save, the verdict before the item's progress).
    """

    @property
    def shared(self) -> bool:
        """Other processes write this batch's rows too (so a row read before a claim may be stale)."""
        ...

    @property
    def coordinator(self) -> Coordinator | None:
        """None when this process is the batch's only worker (SQLite and its run lock)."""
        ...

    async def get(self, item_id: str) -> StoredItem | None: ...
    async def put(self, item_id: str, output_name: str, image_sha: str | None, data: dict[str, Any]) -> None: ...
    async def detect_verdict(self, image_sha: str) -> tuple[bool | None, str] | None: ...
    async def put_detect(self, image_sha: str, passed: bool | None, message: str) -> None: ...
    async def forget_detect(self, image_sha: str) -> None: ...
    async def upload(self, sha: str, model: str, backend: str) -> StoredUpload | None: ...
    async def put_upload(self, sha: str, model: str, backend: str, upload: StoredUpload) -> None: ...
    async def claim_task(self, task_id: str, item_id: str, wall: float) -> bool: ...
    async def claim_times(self) -> dict[str, float]: ...
    async def claimed_since(self, item_id: str, wall: float) -> str | None: ...
    async def inflight_submits(self) -> list[tuple[str, float]]: ...
    async def created_keys(self) -> list[str]: ...
    async def digest(self, path: str, stamp: FileStamp) -> str | None: ...
    async def put_digest(self, path: str, stamp: FileStamp, sha256: str) -> None: ...
    async def forget_created_keys(self, keys: list[str]) -> None: ...
    def items(self) -> AsyncIterator[StoredItem]: ...
    async def workers(self) -> list[dict[str, Any]]: ...
    def together(self) -> AbstractContextManager[None]: ...
    async def redo_epoch(self) -> int:
        """The latest redo request of the batch (`redo.epoch` in the items' records); 0 when none was made."""
        ...

    async def start_redo(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Replace these items' records in one transaction (`lpengine.stages.redo`): a redo request is committed
        whole or not at all, so a crash never leaves half of what the user confirmed selected."""
        ...


def stored_item(row: Any) -> StoredItem:
    """A row of (item_id, output_name, state, stage, task_id, data as JSON text), as both backends select it."""
    return StoredItem(
        item_id=str(row[0]),
        output_name=str(row[1]),
        state=row[2],
        stage=str(row[3]),
        task_id=row[4],
        data=orjson.loads(row[5]),
    )


def stored_upload(row: Any) -> StoredUpload | None:
    """A row of (url, resolve, expires_at, created_key), as both backends select it; None for no row."""
    return StoredUpload(str(row[0]), bool(row[1]), float(row[2]), row[3]) if row else None
