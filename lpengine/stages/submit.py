"""Stage 3: submit the `liveportrait` task (§3) — once per item, never twice by accident.

The marker `submit_inflight_wall` is committed before the request leaves. If the answer is lost (timeout, reset,
crash), the marker stays and `reconcile` looks for the task in the task list (§5) before anything is resent:

1. List this account's `liveportrait` tasks of the last 24 h (paged).
2. Drop every task already claimed by an item of this batch (the store's `task_claims`).
3. Map our send time onto the service clock, using the tasks we do know (their list `gmt_create` against the
   local time we recorded when their id came back), and adopt the unclaimed task created closest after the send,
   within the request timeout. Without any known task to calibrate, match by order instead: when the unclaimed
   tasks are exactly as many as this batch's lost submits, the k-th oldest task belongs to the k-th oldest send.
4. No candidate: the request never created a task, so submitting again is safe. Anything else that cannot be
   matched one-to-one ends the item `submit_failed` rather than risk paying twice.
"""

from __future__ import annotations

import statistics
import time

from lpengine.client.wire import TaskListEntry
from lpengine.errors import AmbiguousSubmitError, ApiError, AuthError, LPEngineError, QuotaError
from lpengine.models import Item, ItemState, Stage
from lpengine.stages.context import StageContext
from lpengine.storage.base import SYNTHESIS_MODEL

_MAX_LIST_PAGES = 50


async def submit(ctx: StageContext, item: Item) -> None:
    """Get the item a task id: adopt a reconciled one, or submit (bounded by `state.max_submit_attempts`)."""
    item.stage = Stage.SUBMIT
    started = time.perf_counter()
    if item.task_id is None and item.submit_inflight_wall is not None:
        await _adopt_or_clear(ctx, item)
    while item.task_id is None and item.state is None:
        if item.submit_attempts >= ctx.config.state.max_submit_attempts:
            item.finish(
                ItemState.SUBMIT_FAILED,
                f"submitted {item.submit_attempts} time(s) already (state.max_submit_attempts); not paying again",
            )
            break
        item.submit_attempts += 1
        item.submit_inflight_wall = time.time()
        await ctx.save(item)  # write-ahead: a crash from here on is reconciled, never blindly resent
        try:
            result = await ctx.api.submit(
                item.image_urls[SYNTHESIS_MODEL].url, item.audio_urls[SYNTHESIS_MODEL].url, item.spec.params
            )
        except AmbiguousSubmitError as exc:
            ctx.emit(item, "submit.ambiguous", level="warning", error=str(exc))
            await _adopt_or_clear(ctx, item)
            continue
        except (AuthError, QuotaError):
            raise
        except ApiError as exc:
            item.submit_inflight_wall = None
            item.finish(
                ItemState.SUBMIT_FAILED,
                f"the service refused the task: {exc.code}: {exc.message}",
                transient=exc.is_retryable,
            )
            break
        except LPEngineError as exc:
            item.submit_inflight_wall = None
            item.finish(ItemState.SUBMIT_FAILED, f"no answer after retries: {exc}", transient=True)
            break
        await _claim(ctx, item, result.task_id)
    item.timings["submit"] = item.timings.get("submit", 0.0) + time.perf_counter() - started


async def _claim(ctx: StageContext, item: Item, task_id: str) -> None:
    await ctx.store.claim_task(task_id, item.item_id, time.time())
    item.task_id = task_id
    item.submit_inflight_wall = None
    item.submitted_wall = time.time()
    item.cancelled_by_us = False
    await ctx.save(item)
    ctx.emit(item, "submit.accepted", attempt=item.submit_attempts)


async def _adopt_or_clear(ctx: StageContext, item: Item) -> None:
    assert item.submit_inflight_wall is not None
    try:
        found = await reconcile(ctx, item.submit_inflight_wall)
    except AmbiguousSubmitError as exc:
        item.finish(ItemState.SUBMIT_FAILED, str(exc))
        return
    if found is not None and await ctx.store.claim_task(found, item.item_id, time.time()):
        ctx.emit(item, "submit.reconciled", adopted=found)
        await _claim(ctx, item, found)
        return
    ctx.emit(item, "submit.reconciled", adopted=None)
    item.submit_inflight_wall = None
    await ctx.save(item)


async def reconcile(ctx: StageContext, sent_wall: float) -> str | None:
    """The task a lost submit created, or None if it created none. See the module docstring for the rule."""
    entries: list[TaskListEntry] = []
    for page in range(1, _MAX_LIST_PAGES + 1):
        listing = await ctx.api.list_tasks(model_name="liveportrait", page_no=page, page_size=100)
        entries.extend(listing.entries)
        if page * listing.page_size >= listing.total or not listing.entries:
            break
    known = await ctx.store.claim_times()
    offsets = [
        e.gmt_create_ms / 1000 - ctx.speedup * known[e.task_id]
        for e in entries
        if e.task_id in known and e.gmt_create_ms is not None
    ]
    unclaimed = [e for e in entries if e.task_id not in known]
    if not unclaimed:
        return None
    if not offsets:
        lost = sorted(wall for _, wall in await ctx.store.inflight_submits())
        if len(unclaimed) == len(lost) and sent_wall in lost:
            ordered = sorted(unclaimed, key=lambda e: (e.gmt_create_ms or 0, e.task_id))
            return ordered[lost.index(sent_wall)].task_id
        raise AmbiguousSubmitError(
            f"a submit's answer was lost and {len(unclaimed)} unclaimed tasks exist on the account with no way to "
            "tell which is ours; not resubmitting to avoid paying twice (check the console, then re-run)",
            sent_at=sent_wall,
        )
    expected = statistics.median(offsets) + ctx.speedup * sent_wall
    slack = ctx.speedup * (ctx.config.api.request_timeout_s + 5.0)
    candidates = [
        e
        for e in unclaimed
        if e.gmt_create_ms is not None and expected - slack <= e.gmt_create_ms / 1000 <= expected + slack
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda e: abs((e.gmt_create_ms or 0) / 1000 - expected)).task_id
