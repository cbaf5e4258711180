"""What every stage needs, passed explicitly (no globals): config, client, storage, state, log, pricing."""

from __future__ import annotations

import asyncio
import contextvars
import operator
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from lpengine.client.api import DashScopeClient
from lpengine.config import BatchConfig
from lpengine.locks import KeyedLocks
from lpengine.logs import BatchLog
from lpengine.models import Item, ItemState, Stage
from lpengine.stages.upright import UprightCopies, upright_folder
from lpengine.state.base import AccountQueue, StateStore
from lpengine.storage.base import LocalFile, Storage

current_item: contextvars.ContextVar[Item | None] = contextvars.ContextVar("lpengine_current_item", default=None)
"""The item the running stage worker is busy with: the client's retries are logged against it."""


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Emitted to `Engine(on_event=...)` at every stage transition and terminal state."""

    item: str
    stage: Stage
    state: ItemState | None
    reason: str = ""
    task_id: str | None = None
    cost_cny: float = 0.0
    """What this run has paid for the item so far (work paid by an earlier run is not counted again)."""


@dataclass(slots=True)
class AudioTrack:
    file: LocalFile | None
    url: str | None
    duration_s: float


@dataclass
class StageContext:
    config: BatchConfig
    client: DashScopeClient | None
    storage: Storage
    store: StateStore
    log: BatchLog
    on_event: Callable[[ProgressEvent], None] | None = None
    url_lifetime: timedelta = timedelta(hours=2)
    # asyncio's semaphore, not anyio's: see `lpengine.client.limits.RateMeter`
    window: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(4))
    account: AccountQueue | None = None
    """The account's window and queue shared with other workers (PostgreSQL); None: this process's window alone."""
    audio: dict[str, AudioTrack] = field(default_factory=dict)
    locks: KeyedLocks[tuple[str, str]] = field(default_factory=KeyedLocks)
    """Per-content locks, so concurrent copies of one file publish or detect once."""
    # Resolved once from the config: every item reads them, and resolving a path is work each time.
    output_dir: Path = field(init=False)
    default_audio: str | None = field(init=False)
    """The config's `audio`, resolved (None without one: each item then names its own)."""
    upright: UprightCopies = field(init=False)

    def __post_init__(self) -> None:
        self.output_dir = self.config.output_dir
        self.upright = UprightCopies(upright_folder(self.config) / secrets.token_hex(4))
        self.default_audio = self.config.resolve_ref(self.config.audio) if self.config.audio else None
        if self.client is not None:
            self.client.on_retry = self._client_retried

    def _client_retried(self, error: Exception, attempt: int) -> None:
        item = current_item.get()
        if item is None:
            self.log.emit("info", "request.retry", attempt=attempt, error=describe(error))
        else:
            self.retried(item, error, attempt)

    def retried(self, item: Item, error: Exception, attempt: int) -> None:
        """A request of `item` failed and is tried again: one structured event (never a traceback), so that a
        fault the retry hides stays visible in the log without alarming whoever watches the terminal."""
        self.log.emit(
            "info",
            "request.retry",
            item=item.spec.output_name,
            stage=item.stage.value,
            task_id=item.task_id,
            attempt=attempt,
            error=describe(error),
        )

    @property
    def speedup(self) -> float:
        return self.config.speedup

    @property
    def api(self) -> DashScopeClient:
        if self.client is None:
            raise RuntimeError("a paid stage ran in dry-run mode")
        return self.client

    async def save(self, item: Item, **extra: Any) -> None:
        """Commit the item's progress (write-ahead: call before each paid step and after each result)."""
        await self.store.put(
            item.item_id,
            item.spec.output_name,
            item.image.sha256 if item.image else None,
            dump_item(item, **extra),
        )

    async def save_finished(self, item: Item) -> None:
        """The item's last save, with the digest of an image this run checked, so that re-runs know it unread while
        it stays unchanged; nothing at all for an item restored finished and unchanged."""
        digest = (item.image_stamp, item.image.sha256) if item.image and item.image_stamp else None
        if not item.item_id or (item.settled and digest is None):
            return
        with self.store.together():
            if not item.settled:
                await self.save(item)
            if digest is not None:
                await self.store.put_digest(item.spec.image, *digest)

    def release_inputs(self, item: Item) -> None:
        """The item is finished: no task of it fetches its inputs again, so the storage may forget them."""
        for published in {id(p): p for p in (*item.image_urls.values(), *item.audio_urls.values())}.values():
            self.storage.release(published)
        item.image_urls.clear()
        item.audio_urls.clear()
        if item.upright is not None and item.image is not None:
            self.upright.release(item.image)
            item.upright = None

    def emit(self, item: Item, event: str, level: str = "info", **fields: Any) -> None:
        self.log.emit(
            level,
            event,
            item=item.spec.output_name,
            stage=item.stage.value,
            task_id=item.task_id,
            **fields,
        )
        if self.on_event is not None:
            pricing = self.config.pricing
            self.on_event(
                ProgressEvent(
                    item=item.spec.output_name,
                    stage=item.stage,
                    state=item.state,
                    reason=item.reason,
                    task_id=item.task_id,
                    cost_cny=item.cost_this_run(pricing.detect_per_image, pricing.video_per_second),
                )
            )


def describe(error: BaseException) -> str:
    return f"{error.__class__.__name__}: {error}"


INPUT_DOWNLOAD_FAILED = "InvalidParameter.InputDownloadFailed"
"""§6: the service could not download an input URL (a synchronous 400 at detect and at submit)."""


def undownloadable(**urls: str) -> str:
    """The reason an item gets when the service could not fetch its inputs: the URLs (without their query, which
    may hold a signature) and what usually causes it, rather than the service's bare "Failed to download input
    files." (which does not say which file)."""
    shown = " or ".join(f"the {what} {url.split('?', 1)[0]}" for what, url in urls.items())
    return (
        f"the service could not download {shown}: is the bucket private / the link expired? ({INPUT_DOWNLOAD_FAILED})"
    )


_PERSISTED = (
    "detect_message",
    "detect_paid",
    "task_id",
    "submit_attempts",
    "submit_inflight_wall",
    "submitted_wall",
    "cancelled_by_us",
    "task_code",
    "task_message",
    "video_url",
    "video_duration",
    "output_path",
    "output_size",
    "reason",
    "timings",
    "audio_duration",
    "transient",
    "analysis",
    "redo",
)


_persisted_values = operator.attrgetter(*_PERSISTED)  # one call for all of them (five saves per item)


def dump_item(item: Item, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = dict(zip(_PERSISTED, _persisted_values(item), strict=True))
    data["state"] = item.state.value if item.state else None
    data["stage"] = item.stage.value
    data["input"] = item.spec.image
    data["preset"] = item.spec.preset
    data["params"] = item.spec.params.model_dump()  # the recipe as submitted: a resumed item keeps it
    if item.spec.key:
        data["key"] = item.spec.key
    data["updated_wall"] = time.time()
    data.update(extra)
    return data


def restore_item(item: Item, data: dict[str, Any]) -> None:
    for name in _PERSISTED:
        if name in data and data[name] is not None:
            setattr(item, name, data[name])
    if data.get("state"):
        item.state = ItemState(data["state"])
    item.stage = Stage(data.get("stage", "plan"))
