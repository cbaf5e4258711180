"""Stage 1: check an item locally, restore what earlier runs achieved, and publish its files for the API.

Local checks run first because they are free and the service's own checks are not: a 12 MB photo must never
cost a detect call. The voice track is shared by every item, so it is checked once and published once per model.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

import anyio

from lpengine.config import VideoParams, is_url
from lpengine.errors import InputRejectedError, StorageError
from lpengine.media import INLINE_IO_BYTES, inspect_audio, inspect_image
from lpengine.models import Item, ItemState, Stage, item_identity
from lpengine.stages.context import AudioTrack, StageContext, restore_item
from lpengine.stages.redo import keep_previous_video
from lpengine.state.base import FileStamp, StoredItem, StoredUpload, file_stamp
from lpengine.storage.base import DETECT_MODEL, SYNTHESIS_MODEL, LocalFile, Published

MODELS = (DETECT_MODEL, SYNTHESIS_MODEL)
_UNKNOWN_AUDIO_S = 10.0  # duration guess for audio given only by URL (used for scheduling and estimates)
_Info = TypeVar("_Info")


class _FileInfo(Protocol):
    """What `ImageInfo` and `AudioInfo` share."""

    @property
    def path(self) -> Path: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def content_type(self) -> str: ...
    @property
    def suffix(self) -> str: ...
    @property
    def data(self) -> bytes | None: ...


def _local(info: _FileInfo) -> LocalFile:
    return LocalFile(Path(info.path), info.sha256, info.size, info.content_type, info.suffix, info.data)


async def load_audio(ctx: StageContext, ref: str) -> AudioTrack:
    """Check an audio file once per batch (cached by reference); raises InputRejectedError."""
    track = ctx.audio.get(ref)
    if track is None:
        if is_url(ref):
            track = AudioTrack(file=None, url=ref, duration_s=_UNKNOWN_AUDIO_S)
        else:
            info = await _inspect(inspect_audio, Path(ref))
            track = AudioTrack(file=_local(info), url=None, duration_s=info.duration_s)
        ctx.audio[ref] = track
    return track


async def _inspect(check: Callable[[Path], _Info], path: Path, stamp: FileStamp | None = None) -> _Info:
    """Checked on the loop's thread when small, in a worker thread otherwise (`INLINE_IO_BYTES` says why)."""
    stamp = stamp or file_stamp(str(path))
    small = stamp is None or stamp[0] <= INLINE_IO_BYTES  # None: the check itself reports the problem
    return check(path) if small else await anyio.to_thread.run_sync(check, path)


async def prepare(ctx: StageContext, item: Item) -> None:
    """Local checks + identity + resume. Ends the item (rejected, or already done) or leaves it to go on."""
    item.stage = Stage.UPLOAD
    started = time.perf_counter()
    audio_ref = item.spec.audio or ctx.default_audio
    if audio_ref is None:
        item.finish(ItemState.REJECTED_LOCALLY, "no audio: set `audio:` in the config or an `audio` column")
        return
    try:
        track = await load_audio(ctx, audio_ref)
        item.audio = track.file
        item.audio_duration = track.duration_s
        audio_sha = track.file.sha256 if track.file else hashlib.sha256(audio_ref.encode()).hexdigest()
        if is_url(item.spec.image):
            image_sha = hashlib.sha256(item.spec.image.encode()).hexdigest()
        else:
            stamp = file_stamp(item.spec.image)
            if stamp is not None and await _finished_unread(ctx, item, stamp, audio_sha):
                return
            info = await _inspect(inspect_image, Path(item.spec.image), stamp)
            item.image = _local(info)
            item.image_orientation = info.orientation
            item.image_stamp = stamp
            image_sha = info.sha256
    except InputRejectedError as exc:
        item.finish(ItemState.REJECTED_LOCALLY, f"{exc.path}: {exc.reason}")
        return
    item.item_id = item_identity(item.spec.output_name, image_sha, audio_sha, item.spec.recipe)
    item.timings["check"] = time.perf_counter() - started

    stored = await ctx.store.get(item.item_id)
    coordinator = ctx.store.coordinator
    if coordinator is not None and not (stored is not None and _finished(stored)):
        if not await coordinator.claim_item(item.item_id):
            defer(item, "another worker is on it")
            return
        stored = await ctx.store.get(item.item_id)  # read again, holding it: its previous holder may have written
    if stored is None:
        return
    _restore(item, stored, finished=_finished(stored))
    _keep_recorded_params(ctx, item, stored.data)


def defer(item: Item, reason: str) -> None:
    """Leave the item to the worker that holds it; nothing about it is saved from here."""
    item.deferred = item.settled = True
    item.finish(ItemState.CANCELLED, reason, transient=True)


async def _finished_unread(ctx: StageContext, item: Item, stamp: FileStamp, audio_sha: str) -> bool:
    """A re-run's shortcut: an image unchanged since it was last checked (same path and stat stamp) is known by
    its recorded digest, and if its item is finished, the image is not read at all (at 3 MB a photo, a 100k
    folder is 300 GB to read and hash on every cron run). Anything short of finished goes the full way."""
    image_sha = await ctx.store.digest(item.spec.image, stamp)
    if image_sha is None:
        return False
    item_id = item_identity(item.spec.output_name, image_sha, audio_sha, item.spec.recipe)
    stored = await ctx.store.get(item_id)
    if stored is None or not _finished(stored):
        return False
    item.item_id = item_id
    _restore(item, stored, finished=True)
    _keep_recorded_params(ctx, item, stored.data)
    return True


def _keep_recorded_params(ctx: StageContext, item: Item, data: dict[str, object]) -> None:
    """An item already submitted keeps the parameters it was submitted with, even if its preset was edited since
    (its identity holds the preset's name, not its values): the task at the service, or the video on disk, was
    made with those, and submitting again with new ones would pay twice. Said once per item, as a warning."""
    recorded = data.get("params")
    submitted = data.get("task_id") or data.get("submit_inflight_wall") or data.get("submit_attempts")
    if not isinstance(recorded, dict) or not submitted:
        return
    params = VideoParams.model_validate(recorded)
    if params == item.spec.params:
        return
    changed = {k: [v, getattr(item.spec.params, k)] for k, v in recorded.items() if getattr(item.spec.params, k) != v}
    ctx.emit(
        item,
        "preset.changed_since_submit",
        level="warning",
        preset=item.spec.preset,
        submitted_with={k: pair[0] for k, pair in changed.items()},
        preset_now={k: pair[1] for k, pair in changed.items()},
        message=f"preset {item.spec.preset!r} changed since this item was submitted; it keeps the parameters it "
        "was submitted with",
    )
    item.spec = replace(item.spec, params=params)


def _finished(stored: StoredItem) -> bool:
    """Final and still true: a final state, and for a success, its video still on disk at the recorded size."""
    data = stored.data
    if not stored.state or data.get("transient"):
        return False
    if stored.state != ItemState.SUCCEEDED.value:
        return True
    path, size = data.get("output_path"), data.get("output_size")
    try:
        return bool(path) and os.stat(str(path)).st_size == size
    except OSError:
        return False  # the file vanished: fetch it again (poll gives a fresh URL or says the task is gone)


def _restore(item: Item, stored: StoredItem, *, finished: bool) -> None:
    restore_item(item, stored.data)
    item.resumed = True
    item.billed_before = stored.state == ItemState.SUCCEEDED.value  # its video file may have vanished since
    item.stage = Stage.UPLOAD
    if finished:
        item.settled = stored.data.get("input") == item.spec.image  # else the new path is saved when it ends
    else:
        item.state, item.reason, item.transient = None, "", False  # to be done (again)
        keep_previous_video(item)


async def publish(ctx: StageContext, file: LocalFile, model: str) -> Published:
    """Publish once per (content, model) per batch — and across runs for durable backends."""
    backend = ctx.storage.name
    durable = ctx.storage.durable
    async with ctx.locks.hold((file.sha256, model)):
        needed_until = time.time() + ctx.url_lifetime.total_seconds()
        if durable:
            cached = await ctx.store.upload(file.sha256, model, backend)
            if cached is not None and cached.expires_at > needed_until:
                return Published(cached.url, cached.needs_resolve_header, None)
        published = await ctx.storage.publish(file, model=model, valid_for=ctx.url_lifetime)
        if durable and published.lifetime_s is not None:
            stored = StoredUpload(
                published.url, published.needs_resolve_header, time.time() + published.lifetime_s, published.created_key
            )
            await ctx.store.put_upload(file.sha256, model, backend, stored)
        return published


async def upload(ctx: StageContext, item: Item) -> None:
    """Publish the image for both models (once, unless the backend binds files to a model) and the shared audio
    for synthesis; URL inputs pass through. A photo stored turned is published as its upright copy."""
    started = time.perf_counter()
    model_bound = ctx.storage.model_bound
    try:
        if item.image is not None and item.image_orientation != 1 and item.upright is None:
            item.upright = await ctx.upright.take(item.image)
            ctx.log.emit("info", "image.upright", item=item.spec.output_name, orientation=item.image_orientation)
        image = item.sent_image
        if image is None:
            for model in MODELS:
                item.image_urls[model] = Published(item.spec.image, item.spec.image.startswith("oss://"))
        else:
            item.image_urls[DETECT_MODEL] = await publish(ctx, image, DETECT_MODEL)
            item.image_urls[SYNTHESIS_MODEL] = (
                await publish(ctx, image, SYNTHESIS_MODEL) if model_bound else item.image_urls[DETECT_MODEL]
            )
        if item.audio is None:
            ref = item.spec.audio or str(ctx.config.audio)
            item.audio_urls[SYNTHESIS_MODEL] = Published(ref, ref.startswith("oss://"))
        else:
            item.audio_urls[SYNTHESIS_MODEL] = await publish(ctx, item.audio, SYNTHESIS_MODEL)
    except InputRejectedError as exc:  # the upright copy: undecodable pixels, or over the size limit
        item.finish(ItemState.REJECTED_LOCALLY, f"{exc.path}: {exc.reason}")
    except OSError as exc:
        item.finish(
            ItemState.UPLOAD_FAILED,
            f"cannot write the upright copy of {item.spec.image} in {ctx.upright.folder} ({exc.strerror or exc})",
            transient=True,
        )
    except StorageError as exc:
        item.finish(ItemState.UPLOAD_FAILED, str(exc), transient=True)
    item.timings["upload"] = time.perf_counter() - started
