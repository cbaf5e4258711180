"""Stage 2: the paid `liveportrait-detect` check (§2), at most once per image content, ever.

Verdicts are cached in the state store by the image's hash, so a renamed copy or a re-run reuses them. A mark is
committed before each call: if the process dies after the service answered but before the verdict was saved, the
next run finds the mark, and rather than pay for the same check twice it lets the item go on to synthesis, whose own
face check fails a faceless image (`InvalidImage.NoHumanFace`, §6) without producing a billed video. The mark stays
only when the outcome is truly unknown (the run was cancelled or killed mid-request): every answer that provably
holds no verdict (an error answer, account-level ones included; no connection at all) clears it.
"""

from __future__ import annotations

import time

from lpengine.errors import ApiError, AuthError, LPEngineError, QuotaError
from lpengine.models import Item, ItemState, Stage
from lpengine.stages.context import INPUT_DOWNLOAD_FAILED, StageContext, undownloadable
from lpengine.storage.base import DETECT_MODEL

LOST_VERDICT = "detect answer lost in an interrupted run; not repeated (no double charge), synthesis checks the face"


async def detect(ctx: StageContext, item: Item) -> None:
    item.stage = Stage.DETECT
    started = time.perf_counter()
    sent = item.sent_image
    key = sent.sha256 if sent else item.spec.image
    # Copies of one image in a batch wait for the first one's verdict instead of paying again.
    async with ctx.locks.hold(("detect", key)):
        verdict = await ctx.store.detect_verdict(key)
        if verdict is None and item.upright is not None and item.image is not None:
            verdict = await _verdict_before_upright(ctx, item.image.sha256)
        fresh = verdict is None
        if verdict is None:
            if ctx.store.shared:
                await ctx.save(item)  # fenced: still this item's worker, and live, right before paying
            await ctx.store.put_detect(key, None, "")  # write-ahead mark: the call below is billed
            try:
                result = await ctx.api.detect(item.image_urls[DETECT_MODEL].url)
            except ApiError as exc:
                # An error answer is not billed (no usage) and holds no verdict: the mark goes, so the next run asks
                # again. Left in place, a wrong key or arrears would pass as a lost answer, skipping the paid check.
                await ctx.store.forget_detect(key)
                if isinstance(exc, AuthError | QuotaError):
                    raise  # account-level: the whole batch stops
                if exc.code == INPUT_DOWNLOAD_FAILED:  # a re-run tries again, once the URL is readable
                    url = item.image_urls[DETECT_MODEL].url
                    item.finish(ItemState.DETECT_FAILED, undownloadable(image=url), transient=True)
                    return
                item.finish(
                    ItemState.DETECT_FAILED,
                    f"detect refused the image: {exc.code}: {exc.message}",
                    transient=exc.is_retryable,
                )
                return
            except LPEngineError as exc:
                await ctx.store.forget_detect(key)  # retries ended in network faults: nothing was answered
                item.finish(ItemState.DETECT_FAILED, f"detect did not answer after retries: {exc}", transient=True)
                return
            verdict = (result.passed, result.message)
            item.detect_paid = item.detect_paid_now = True
        passed, message = verdict
        item.detect_message = message if passed is not None else LOST_VERDICT
        item.timings["detect"] = time.perf_counter() - started
        with ctx.store.together():  # a new verdict and the item's progress: one commit
            if fresh:
                await ctx.store.put_detect(key, passed, message)
            if passed is False:
                item.finish(ItemState.DETECT_FAILED, message or "the service found no usable face")
            else:
                await ctx.save(item)


async def _verdict_before_upright(ctx: StageContext, stored_sha: str) -> tuple[bool | None, str] | None:
    """A verdict a run older than upright copies recorded for a turned photo as stored (it sent the file as it is).
    A pass, or an answer lost in a crash, still stands: the check is not paid twice. "No face" does not: that was
    the picture lying on its side, the very failure the copy exists to avoid."""
    verdict = await ctx.store.detect_verdict(stored_sha)
    return verdict if verdict is not None and verdict[0] is not False else None
