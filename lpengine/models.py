"""What flows through the pipeline and what comes out of it.

`Item` is the mutable work record a stage hands to the next; `ItemResult` and `RunReport` are the frozen public
outcome. The set of terminal states is closed: every item ends in exactly one of `ItemState`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lpengine.config import VideoParams
from lpengine.storage.base import LocalFile, Published


class ItemState(enum.StrEnum):
    """The closed set of terminal states (docs/library.md lists what each means and what to do)."""

    SUCCEEDED = "succeeded"
    """The MP4 is on disk, verified."""
    REJECTED_LOCALLY = "rejected_locally"
    """A local check refused the image or audio; nothing was paid."""
    UPLOAD_FAILED = "upload_failed"
    """The file could not be published where the service can fetch it."""
    DETECT_FAILED = "detect_failed"
    """`liveportrait-detect` said no (its message is kept), or refused the image."""
    SUBMIT_FAILED = "submit_failed"
    """The service refused the task, or retries ran out before a task id came back."""
    TASK_FAILED = "task_failed"
    """The task ended FAILED (code and message kept), CANCELED, or UNKNOWN too often."""
    DOWNLOAD_FAILED = "download_failed"
    """The video could not be fetched or verified (expired URL, truncated or corrupt body)."""
    TIMED_OUT = "timed_out"
    """The task did not finish within `limits.task_timeout_s`."""
    CANCELLED = "cancelled"
    """The run stopped (signal, caller cancelled, fatal account error) before the item finished."""


class Stage(enum.StrEnum):
    PLAN = "plan"
    UPLOAD = "upload"
    DETECT = "detect"
    SUBMIT = "submit"
    POLL = "poll"
    DOWNLOAD = "download"


@dataclass(frozen=True, slots=True)
class ItemSpec:
    """One row of the plan: what to make, before anything is checked."""

    image: str
    """Local path (absolute) or an http(s) URL."""
    output_name: str
    """Safe file stem in the output folder (unique within the batch)."""
    params: VideoParams
    audio: str | None = None
    """Overrides the batch's default audio (path or URL)."""
    source: str = ""
    """Where the row came from (manifest line, file path) for messages."""
    key: str = ""
    """What the plan knows this input by across runs (a file's real path, a manifest row's hash): the state store
    records it with the output name, so the name stays the input's whatever other files appear or vanish."""
    preset: str | None = None
    """The preset `params` came from (docs/presets.md), if any."""
    overrides: Mapping[str, Any] | None = None
    """With a preset: the values written over it (config `video:` keys, manifest columns, a sweep's combination)."""

    @property
    def recipe(self) -> VideoParams | dict[str, Any]:
        """What the item's identity is made of. With a preset, its name and the values written over it, not the
        values it resolves to today: editing a preset must not turn items already submitted into new ones (paid
        again, the old task orphaned); `stages.upload` keeps their recorded parameters instead."""
        if self.preset is None:
            return self.params
        return {"preset": self.preset, "overrides": dict(self.overrides or {})}


@dataclass(slots=True)
class Item:
    """The work record of one item while it is in the pipeline."""

    spec: ItemSpec
    item_id: str = ""
    image: LocalFile | None = None
    """The image file as stored: its hash is the item's identity."""
    image_orientation: int = 1
    """Its EXIF Orientation (`lpengine.media.ImageInfo.orientation`); other than 1, `upright` is what is sent."""
    upright: LocalFile | None = None
    """The upright copy published in place of `image` while the item runs (`lpengine.stages.upright`)."""
    audio: LocalFile | None = None
    audio_duration: float = 0.0
    image_urls: dict[str, Published] = field(default_factory=dict)
    audio_urls: dict[str, Published] = field(default_factory=dict)
    detect_message: str | None = None
    task_id: str | None = None
    submit_attempts: int = 0
    submit_inflight_wall: float | None = None
    """Set (and committed) just before a submit is sent, cleared when its outcome is known: a crash in between
    leaves it set, and the next run reconciles through the task list instead of paying again."""
    submitted_wall: float | None = None
    cancelled_by_us: bool = False
    task_code: str | None = None
    task_message: str | None = None
    video_url: str | None = None
    video_duration: float | None = None
    output_path: str | None = None
    output_size: int | None = None
    state: ItemState | None = None
    reason: str = ""
    stage: Stage = Stage.PLAN
    timings: dict[str, float] = field(default_factory=dict)
    detect_paid: bool = False
    transient: bool = False
    resumed: bool = False
    settled: bool = False
    """Restored already finished, with nothing about it changed: the store holds all there is to say, so the
    item is not saved again (a cron re-run of a finished 100k batch would otherwise commit 100k times)."""
    deferred: bool = False
    """Another live worker holds this item (PostgreSQL state): this one leaves it, and reports what that worker
    records, or takes it over if that worker dies (docs/scaling.md)."""
    image_stamp: tuple[int, int, int, int] | None = None
    """The image file's stat stamp taken just before this run read and checked it (`state.base.FileStamp`)."""
    analysis: dict[str, Any] | None = None
    """The video's judgement (`lpengine.analysis`): verdict, flags, score, metrics; verdict `analysis_failed` with
    `metrics.error` when it could not be judged. None: not analysed."""
    detect_paid_now: bool = False
    """This run paid the face check (`detect_paid` also holds a check paid by an earlier run)."""
    billed_before: bool = False
    """An earlier run already saw the video succeed (and so counted its cost)."""
    redo: dict[str, Any] | None = None
    """`{"epoch", "count", "history"}` once the item was redone (`lpengine.stages.redo`); None: never."""
    sent_here: bool = False
    """This process sent the submit that made the item's task, with input URLs it serves itself; False for a task
    an earlier run or another worker sent (found in the store or reconciled), whose URLs may have died with it."""

    @property
    def sent_image(self) -> LocalFile | None:
        """The image file the service is given (and its face verdict is about): `upright` or `image`."""
        return self.upright or self.image

    def finish(self, state: ItemState, reason: str = "", *, transient: bool = False) -> Item:
        """End the item. `transient` outcomes (network trouble, retryable task codes) are retried by a re-run;
        the others are final, because repeating them would cost money for the same answer."""
        self.state = state
        self.reason = reason
        self.transient = transient
        return self

    def cost(self, detect_price: float, video_price: float) -> float:
        """What the item has cost, over every run of the batch (the videos a redo replaced included)."""
        seconds = earlier_seconds(self.redo)
        if self.state is ItemState.SUCCEEDED:
            seconds += self.video_duration or 0.0
        return (detect_price if self.detect_paid else 0.0) + seconds * video_price

    def cost_this_run(self, detect_price: float, video_price: float) -> float:
        """What this run added: a re-run that sends nothing costs nothing, however much the batch cost before."""
        succeeded_now = self.state is ItemState.SUCCEEDED and not self.billed_before
        video = (self.video_duration or 0.0) * video_price if succeeded_now else 0.0
        return (detect_price if self.detect_paid_now else 0.0) + video

    def result(self, detect_price: float, video_price: float) -> ItemResult:
        return ItemResult(
            input=self.spec.image,
            output=self.output_path,
            state=self.state or ItemState.CANCELLED,
            reason=self.reason,
            detect_message=self.detect_message,
            task_id=self.task_id,
            task_code=self.task_code,
            video_duration=self.video_duration,
            submit_attempts=self.submit_attempts,
            timings={k: round(v, 4) for k, v in self.timings.items()},
            cost_cny=round(self.cost(detect_price, video_price), 6),
            resumed=self.resumed,
            preset=self.spec.preset,
            params=self.spec.params.model_dump(),
            audio=str(self.audio.path) if self.audio else self.spec.audio,
            cost_this_run_cny=round(self.cost_this_run(detect_price, video_price), 6),
            **verdict_fields(self.analysis),
            **redo_fields(self.redo),
        )


def verdict_fields(analysis: Mapping[str, Any] | None) -> dict[str, Any]:
    """An item's judgement as `ItemResult` fields (all None when it was not analysed)."""
    if not analysis:
        return {}
    score = analysis.get("score")
    return {
        "verdict": str(analysis.get("verdict")),
        "flags": [str(f) for f in analysis.get("flags") or []],
        "score": int(score) if isinstance(score, int | float) else None,
        "metrics": dict(analysis.get("metrics") or {}),
    }


def earlier_seconds(redo: Mapping[str, Any] | None) -> float:
    """Seconds of video paid for before the item's current one: each redo paid for a whole new video."""
    if not redo:
        return 0.0
    return float(sum(entry.get("video_duration") or 0.0 for entry in redo.get("history") or []))


def redo_fields(redo: Mapping[str, Any] | None) -> dict[str, Any]:
    """An item's redos as `ItemResult` fields (none when it was never redone)."""
    if not redo:
        return {}
    return {"redo_count": int(redo.get("count") or 0), "redo_history": [dict(h) for h in redo.get("history") or []]}


def item_identity(output_name: str, image_sha: str, audio_sha: str, params: VideoParams | Mapping[str, Any]) -> str:
    """Content identity: an edited image, another voice track or other parameters make a new item.

    `params` is `ItemSpec.recipe`: the parameters themselves, or a preset's name and the values written over it."""
    recipe = params.model_dump() if isinstance(params, VideoParams) else dict(params)
    blob = json.dumps([output_name, image_sha, audio_sha, recipe], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One row of the report."""

    input: str
    output: str | None
    state: ItemState
    reason: str
    detect_message: str | None
    task_id: str | None
    task_code: str | None
    video_duration: float | None
    submit_attempts: int
    timings: dict[str, float]
    cost_cny: float
    """What the item cost over every run of the batch."""
    resumed: bool = False
    preset: str | None = None
    """The preset the item's parameters came from, if any."""
    params: dict[str, Any] | None = None
    """The video parameters the item was (or is to be) submitted with."""
    audio: str | None = None
    """The voice track the video was made from (path or URL)."""
    verdict: str | None = None
    """ok, warn, bad (docs/analysis.md), analysis_failed, or None when the video was not analysed."""
    flags: list[str] | None = None
    score: int | None = None
    metrics: dict[str, Any] | None = None
    cost_this_run_cny: float = 0.0
    """What this run paid for it (0 for work finished by an earlier run)."""
    redo_count: int = 0
    """How many times `--redo` made the video again (each time paid again, by choice)."""
    redo_history: list[dict[str, Any]] | None = None
    """One entry per replaced video, oldest first: `at` (epoch seconds), `verdict`, `flags`, `score`, `task_id`,
    `video_duration`, `output` (where it was) and `kept_as` (where it is now)."""

    @property
    def earlier_verdict(self) -> str:
        """The verdict of the video the last redo replaced, with its flags ("bad: frozen"); "" if never redone."""
        if not self.redo_history:
            return ""
        last = self.redo_history[-1]
        flags = ", ".join(last.get("flags") or [])
        return f"{last.get('verdict')}: {flags}" if flags else str(last.get("verdict"))

    @property
    def needs_review(self) -> bool:
        """A video someone should look at: judged warn or bad, or not judgeable."""
        return self.verdict in ("warn", "bad", "analysis_failed")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, keys in field order (report.json's row layout). Spelled out rather than
        `dataclasses.asdict`, whose recursive deep copy costs more than the rest of writing a row."""
        return {
            "input": self.input,
            "output": self.output,
            "state": self.state.value,
            "reason": self.reason,
            "detect_message": self.detect_message,
            "task_id": self.task_id,
            "task_code": self.task_code,
            "video_duration": self.video_duration,
            "submit_attempts": self.submit_attempts,
            "timings": dict(self.timings),
            "cost_cny": self.cost_cny,
            "resumed": self.resumed,
            "preset": self.preset,
            "params": dict(self.params) if self.params is not None else None,
            "audio": self.audio,
            "verdict": self.verdict,
            "flags": self.flags,
            "score": self.score,
            "metrics": self.metrics,
            "cost_this_run_cny": self.cost_this_run_cny,
            "redo_count": self.redo_count,
            "redo_history": [dict(h) for h in self.redo_history] if self.redo_history is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemResult:
        """The inverse of `to_dict` (JSON keeps every field exactly; only the state needs its enum back)."""
        return cls(**{**data, "state": ItemState(data["state"])})


REVIEW_NAMES = 20


@dataclass(slots=True)
class ResultTotals:
    """Counts and cost of a run's results, added up as they are written, so that a report's aggregates never need
    the rows again (an engine run keeps its rows in a file, not in memory)."""

    items: int = 0
    by_state: Counter[ItemState] = field(default_factory=Counter)
    cost_cny: float = 0.0
    """Unrounded: rounding each partial sum would drift from the rounded total of the rows."""
    needs_review: int = 0
    """Videos judged warn, bad or analysis_failed (docs/analysis.md)."""
    review_names: list[str] = field(default_factory=list)
    """The first `REVIEW_NAMES` of them, by file name, for the run summary."""
    cost_this_run_cny: float = 0.0

    def add(self, result: ItemResult) -> None:
        self.items += 1
        self.by_state[result.state] += 1
        self.cost_cny += result.cost_cny
        if result.needs_review:
            self.needs_review += 1
            if len(self.review_names) < REVIEW_NAMES:
                self.review_names.append(os.path.basename(result.output or result.input))
        self.cost_this_run_cny += result.cost_this_run_cny

    @classmethod
    def of(cls, results: Iterable[ItemResult]) -> ResultTotals:
        totals = cls()
        for result in results:
            totals.add(result)
        return totals


@dataclass(frozen=True, slots=True)
class RunReport:
    """The outcome of one run; `raise_for_failures()` for callers that want an exception.

    `items` is any sequence of rows. `Engine.run()` passes a read-only view of the run's results file (rows are read
    from disk each time it is iterated, so a 100k-item report costs no memory; see docs/library.md) together with
    `totals` counted while the rows were written. Built from rows in memory, the totals are counted here.
    """

    items: Sequence[ItemResult]
    wall_time_s: float
    dry_run: bool = False
    api_requests: dict[str, int] = field(default_factory=dict)
    throttled: int = 0
    retries: int = 0
    totals: ResultTotals | None = None

    def __post_init__(self) -> None:
        if self.totals is None:
            object.__setattr__(self, "totals", ResultTotals.of(self.items))

    @property
    def _totals(self) -> ResultTotals:
        assert self.totals is not None  # set by __post_init__
        return self.totals

    @property
    def counts(self) -> dict[str, int]:
        by_state = self._totals.by_state
        return {state.value: by_state[state] for state in ItemState if by_state[state]}

    @property
    def cost_cny(self) -> float:
        """The batch total: what its items cost over every run (a re-run that sends nothing repeats it)."""
        return round(self._totals.cost_cny, 6)

    @property
    def needs_review(self) -> tuple[int, list[str]]:
        """How many videos need a look, and the names of the first of them."""
        return self._totals.needs_review, list(self._totals.review_names)

    @property
    def cost_this_run_cny(self) -> float:
        """What this run paid: the figure to add up across cron runs."""
        return round(self._totals.cost_this_run_cny, 6)

    @property
    def ok(self) -> bool:
        return self._totals.by_state[ItemState.SUCCEEDED] == self._totals.items

    def raise_for_failures(self) -> None:
        from lpengine.errors import BatchFailedError

        if not self.ok:
            raise BatchFailedError([r for r in self.items if r.state is not ItemState.SUCCEEDED])

    def summary(self) -> dict[str, Any]:
        return {
            "items": self._totals.items,
            "counts": self.counts,
            "cost_cny": self.cost_cny,
            "cost_this_run_cny": self.cost_this_run_cny,
            "wall_time_s": round(self.wall_time_s, 3),
            "dry_run": self.dry_run,
            "api_requests": self.api_requests,
            "throttled": self.throttled,
            "retries": self.retries,
            "needs_review": self._totals.needs_review,
            "review": list(self._totals.review_names),
        }
