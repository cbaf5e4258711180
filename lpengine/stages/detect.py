"""Stage 2: the paid `liveportrait-detect` check (§2), at most once per image content, ever.

Verdicts are cached in the state store by the image's hash, so a renamed copy or a re-run reuses them.
"""

from __future__ import annotations

import time

from lpengine.errors import ApiError, AuthError, LPEngineError, QuotaError
from lpengine.models import Item, ItemState, Stage
from lpengine.stages.context import StageContext
from lpengine.storage.base import DETECT_MODEL


async def detect(ctx: StageContext, item: Item) -> None:
    item.stage = Stage.DETECT
    started = time.perf_counter()
    key = item.image.sha256 if item.image else item.spec.image
    verdict = await ctx.store.detect_verdict(key)
    if verdict is None:
        try:
            result = await ctx.api.detect(item.image_urls[DETECT_MODEL].url)
        except (AuthError, QuotaError):
            raise  # account-level: the whole batch stops
        except ApiError as exc:
            item.finish(
                ItemState.DETECT_FAILED,
                f"detect refused the image: {exc.code}: {exc.message}",
                transient=exc.is_retryable,
            )
            return
        except LPEngineError as exc:
            item.finish(ItemState.DETECT_FAILED, f"detect did not answer after retries: {exc}", transient=True)
            return
        verdict = (result.passed, result.message)
        item.detect_paid = True
        await ctx.store.put_detect(key, *verdict)
    passed, message = verdict
    item.detect_message = message
    item.timings["detect"] = time.perf_counter() - started
    if not passed:
        item.finish(ItemState.DETECT_FAILED, message or "the service found no usable face")
        return
    await ctx.save(item)
