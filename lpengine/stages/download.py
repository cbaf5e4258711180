"""Stage 5: fetch the MP4 before its URL expires (24 h after the task ends, §4) and never leave a partial file.

The body streams into a hidden `.part` file in the output folder (same filesystem, so the final rename is atomic),
is checked (HTTP status, Content-Length, MP4 box structure), and only then renamed to `<name>.mp4`.

File work happens on the loop's thread: writing a chunk into the page cache and reading a few box headers take
microseconds, less than the worker-thread hand-off each would need (aiofiles made 5–6 per item, the largest cost
of this stage at 100k items; docs/benchmarks.md).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import anyio

from lpengine.client.retry import call_with_retries
from lpengine.errors import LPEngineError, NetworkError
from lpengine.media import MediaError, check_mp4_boxes, verify_mp4
from lpengine.models import Item, ItemState, Stage
from lpengine.recipe_tags import tag_in_place, write_recipe
from lpengine.stages.context import StageContext

_CHUNK = 256 * 1024


class _Expired(LPEngineError):
    """The signed result URL is past its validity: no retry will help."""


class _BadBody(LPEngineError):
    """Truncated or corrupt body: a new attempt may get it whole."""

    retryable = True


def _target(ctx: StageContext, item: Item) -> Path:
    out = ctx.output_dir
    path = out / f"{item.spec.output_name}.mp4"
    if path.exists() and not ctx.config.output.overwrite and str(path) != item.output_path:
        # Not ours: keep the user's file and the paid video both.
        path = out / f"{item.spec.output_name}-{(item.task_id or secrets.token_hex(4))[:8]}.mp4"
    return path


async def download(ctx: StageContext, item: Item) -> None:
    item.stage = Stage.DOWNLOAD
    started = time.perf_counter()
    if item.video_url is None:
        item.finish(ItemState.DOWNLOAD_FAILED, "the task succeeded without a video URL", transient=True)
        return
    target = _target(ctx, item)
    if item.output_path == str(target) and await _already_there(target):
        # killed after the rename but before the state said so: the file only appears whole (atomic rename)
        item.output_size = target.stat().st_size
        item.finish(ItemState.SUCCEEDED)
        return
    item.output_path = str(target)
    await ctx.save(item)  # write-ahead: this path is the item's from now on, so a re-run recognises the file
    retry = ctx.config.api.retry
    url = item.video_url
    tag = (
        {"preset": item.spec.preset, "params": item.spec.params.model_dump()} if ctx.config.output.recipe_tags else None
    )
    try:
        size = await call_with_retries(
            lambda: _fetch(ctx, url, target, tag),
            retry_on=lambda exc: isinstance(exc, NetworkError | _BadBody),
            policy=retry,
            timeout_s=retry.total_timeout_s + ctx.config.api.download_timeout_s,
            on_retry=lambda error, attempt: ctx.retried(item, error, attempt),
        )
    except _Expired:
        # Only a new task can produce the video now: forget this one, so the re-run submits again (as promised)
        # instead of polling the old task for the same dead URL.
        item.task_id = item.video_url = None
        item.finish(
            ItemState.DOWNLOAD_FAILED,
            "result URL expired (valid 24 h after the task ends); a re-run submits the item again",
            transient=True,
        )
        return
    except (NetworkError, _BadBody) as exc:
        item.finish(ItemState.DOWNLOAD_FAILED, f"download failed after retries: {exc}", transient=True)
        return
    item.output_path = str(target)
    item.output_size = size
    item.timings["download"] = time.perf_counter() - started
    item.finish(ItemState.SUCCEEDED)


async def _already_there(target: Path) -> bool:
    try:
        verify_mp4(target)
    except MediaError:
        return False
    return True


async def _fetch(ctx: StageContext, url: str, target: Path, recipe: dict[str, Any] | None) -> int:
    part = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    timeout = aiohttp.ClientTimeout(total=ctx.config.api.download_timeout_s)
    renamed = False
    try:
        # No Authorization header here: the result host is OSS, not the API, and must never see the key.
        async with ctx.api.session.get(url, timeout=timeout) as resp:
            if resp.status in (403, 404, 410):
                raise _Expired(f"HTTP {resp.status}")
            if resp.status != 200:
                raise NetworkError(f"result download answered HTTP {resp.status}")
            expected = resp.content_length
            written = 0
            tagged = None
            with _create(part) as fh:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    fh.write(chunk)
                    written += len(chunk)
                if expected is not None and written != expected:
                    raise _BadBody(f"got {written} of {expected} bytes")
                try:
                    boxes = check_mp4_boxes(fh, written, part)  # through the same handle: no second open per video
                except MediaError as exc:
                    raise _BadBody(f"not a valid MP4 ({exc.reason})") from None
                # verified first: the tag is written into a whole video, never into a cut one
                if recipe is not None and (tagged := tag_in_place(fh, boxes, recipe)) is not None:
                    written = tagged
        if recipe is not None and tagged is None:  # a layout the in-place splice leaves to mutagen
            written = await anyio.to_thread.run_sync(write_recipe, part, recipe)
        os.replace(part, target)
        renamed = True
        return written
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NetworkError(f"result download: {exc.__class__.__name__}") from None
    finally:
        if not renamed:
            part.unlink(missing_ok=True)


def _create(part: Path) -> BinaryIO:
    try:
        return part.open("w+b")
    except FileNotFoundError:  # the output folder was removed during the run
        part.parent.mkdir(parents=True, exist_ok=True)
        return part.open("w+b")
