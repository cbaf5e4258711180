"""Stage 3: submit the `liveportrait` task (§3) — once per item, never twice by accident.

Submits go out one at a time (the quota is 5 QPS and a submit takes a fraction of a second, so this costs no
throughput) and the marker `submit_inflight_wall` is committed before each request leaves. So after any crash at
most one send per run is unaccounted for, and runs are separated by their restart. If an answer is lost (timeout,
reset, crash), the marker stays, and `reconcile` looks for the task in the task list (§5) before anything is resent:

0. If the store already binds a task to this item since the send (the crash fell between the claim and the item's
   own save), that is the task.
1. List this account's `liveportrait` tasks of the last 24 h (paged) and drop those claimed by this batch.
2. Calibrate the service clock against ours from the tasks we do know (their `gmt_create` against the local time
   their id came back; the latest-biased estimate is kept), and map every lost send of the batch onto it.
3. Match lost sends and unclaimed tasks one to one, closest pairs first, a task only after its send (within a
   clock slop, and then only when no send it follows claims it) and within the request timeout (`match_sends`).
   Without any known task to calibrate, match by order when the counts are equal.
4. A send left without a task never created one, so submitting again is safe. Anything that cannot be matched
   one-to-one ends the item `submit_failed` rather than risk paying twice.
"""

from __future__ import annotations

import time

from lpengine.client.wire import TaskListEntry
from lpengine.errors import AmbiguousSubmitError, ApiError, AuthError, LPEngineError, QuotaError
from lpengine.models import Item, ItemState, Stage
from lpengine.stages.context import INPUT_DOWNLOAD_FAILED, StageContext, undownloadable
from lpengine.storage.base import SYNTHESIS_MODEL

_MAX_LIST_PAGES = 50


async def submit(ctx: StageContext, item: Item) -> None:
    """Get the item a task id: adopt a reconciled one, or submit (bounded by `state.max_submit_attempts`)."""
    item.stage = Stage.SUBMIT
    started = time.perf_counter()
    async with ctx.locks.hold(("submit", "")):
        await _submit_locked(ctx, item)
    item.timings["submit"] = item.timings.get("submit", 0.0) + time.perf_counter() - started


async def _submit_locked(ctx: StageContext, item: Item) -> None:
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
        image_url, audio_url = item.image_urls[SYNTHESIS_MODEL].url, item.audio_urls[SYNTHESIS_MODEL].url
        try:
            result = await ctx.api.submit(image_url, audio_url, item.spec.params)
        except AmbiguousSubmitError as exc:
            ctx.emit(item, "submit.ambiguous", level="warning", error=str(exc))
            await _adopt_or_clear(ctx, item)
            item.sent_here = item.task_id is not None  # the lost send was this process's, with its URLs
            continue
        except (AuthError, QuotaError):
            # Refused with an answer: no task exists, so the mark is resolved here (else the next run reconciles
            # against the task list for nothing) and the attempt, never made, is not counted.
            item.submit_inflight_wall = None
            item.submit_attempts -= 1
            await ctx.save(item)
            raise
        except ApiError as exc:
            item.submit_inflight_wall = None
            if exc.code == INPUT_DOWNLOAD_FAILED:  # refused before any task existed: a re-run may try again
                item.finish(ItemState.SUBMIT_FAILED, undownloadable(image=image_url, audio=audio_url), transient=True)
                break
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
        item.sent_here = True


async def _claim(ctx: StageContext, item: Item, task_id: str) -> None:
    item.task_id = task_id
    item.submit_inflight_wall = None
    item.submitted_wall = time.time()
    item.cancelled_by_us = False
    with ctx.store.together():  # the claim and the item's task id: one commit
        await ctx.store.claim_task(task_id, item.item_id, item.submitted_wall)
        await ctx.save(item)
    ctx.emit(item, "submit.accepted", attempt=item.submit_attempts)


async def _adopt_or_clear(ctx: StageContext, item: Item) -> None:
    assert item.submit_inflight_wall is not None
    own = await ctx.store.claimed_since(item.item_id, item.submit_inflight_wall)
    if own is not None:  # claimed, then killed before the item itself was saved
        await _claim(ctx, item, own)
        return
    try:
        found = await reconcile(ctx, item.item_id, item.submit_inflight_wall)
    except AmbiguousSubmitError as exc:
        # Transient: the in-flight mark stays, so a re-run reconciles again (more tasks are known by then) instead
        # of leaving a task that may be running, and billed, without anyone to collect its video.
        item.finish(ItemState.SUBMIT_FAILED, str(exc), transient=True)
        return
    except (AuthError, QuotaError):
        raise
    except LPEngineError as exc:
        # The task list did not answer: the lost send may have created a task. Keep the mark; never resend blindly.
        item.finish(
            ItemState.SUBMIT_FAILED,
            f"submit outcome unknown and the task list could not be read ({exc}); a re-run reconciles before "
            "sending again",
            transient=True,
        )
        return
    if found is not None and await ctx.store.claim_task(found, item.item_id, time.time()):
        ctx.emit(item, "submit.reconciled", adopted=found)
        await _claim(ctx, item, found)
        return
    ctx.emit(item, "submit.reconciled", adopted=None)
    item.submit_inflight_wall = None
    await ctx.save(item)


async def reconcile(ctx: StageContext, item_id: str, sent_wall: float) -> str | None:
    """The task a lost submit of `item_id` created, or None if it created none (rules in the module docstring)."""
    known = await ctx.store.claim_times()
    lost = dict(await ctx.store.inflight_submits())
    lost[item_id] = sent_wall
    early = ctx.speedup * 2.0  # clock calibration slop
    entries: list[TaskListEntry] = []
    for page in range(1, _MAX_LIST_PAGES + 1):
        listing = await ctx.api.list_tasks(model_name="liveportrait", page_no=page, page_size=100)
        entries.extend(listing.entries)
        if page * listing.page_size >= listing.total or not listing.entries:
            break
        # Newest first: once a page reaches back before the earliest lost send (on the service clock, as calibrated
        # so far; later calibration can only move it forward), older pages cannot hold a match. Without this, each
        # reconciliation would read the whole day's task list: requests growing with the account, not the batch.
        base = _clock_offset(ctx, entries, known)
        created = [e.gmt_create_ms for e in listing.entries if e.gmt_create_ms is not None]
        if base is not None and created and min(created) / 1000 < base + ctx.speedup * min(lost.values()) - early:
            break
    unclaimed = [e for e in entries if e.task_id not in known and e.gmt_create_ms is not None]
    if not unclaimed:
        return None
    base = _clock_offset(ctx, entries, known)
    if base is None:
        if len(unclaimed) != len(lost):
            raise AmbiguousSubmitError(
                f"a submit's answer was lost and {len(unclaimed)} unclaimed task(s) exist for {len(lost)} lost "
                "send(s), with no way to tell which is ours; not resubmitting to avoid paying twice "
                "(check the console, then re-run)",
                sent_at=sent_wall,
            )
        tasks = sorted(unclaimed, key=lambda e: (e.gmt_create_ms or 0, e.task_id))
        sends = sorted(lost, key=lambda iid: lost[iid])
        return tasks[sends.index(item_id)].task_id
    late = ctx.speedup * (ctx.config.api.request_timeout_s + 5.0)
    sent_at = {iid: base + ctx.speedup * wall for iid, wall in lost.items()}
    made_at = {e.task_id: (e.gmt_create_ms or 0) / 1000 for e in unclaimed}
    return match_sends(sent_at, made_at, early=early, late=late).get(item_id)


def match_sends(sends: dict[str, float], created: dict[str, float], *, early: float, late: float) -> dict[str, str]:
    """Lost sends (item id → send time) to unclaimed tasks (task id → creation time), one to one, both on the
    service clock as calibrated; a task from `early` before its send to `late` after it.

    The calibration is a lower bound of the service clock (see `_clock_offset`), so every send is mapped a little
    early and a send's own task always lands at or after it; a task that lands before a send (allowed by the
    `early` slop, for a local clock that stepped) is only a send's when no send it follows claims it. Closest
    first among the rest. Ranking by distance alone let a later send, written ahead but killed before it left,
    take the task of an earlier lost send that landed just before it when the calibration was late (a busy
    client records its claims late): that task's own item then found nothing and paid again (and two lost sends
    that both left could swap their tasks, and so their videos).
    """
    pairs = sorted(
        (diff < 0, abs(diff), iid, task_id)
        for iid, sent in sends.items()
        for task_id, made in created.items()
        if -early <= (diff := made - sent) <= late
    )
    matched: dict[str, str] = {}
    taken: set[str] = set()
    for _, _, iid, task_id in pairs:
        if iid not in matched and task_id not in taken:
            matched[iid] = task_id
            taken.add(task_id)
    return matched


def _clock_offset(ctx: StageContext, entries: list[TaskListEntry], known: dict[str, float]) -> float | None:
    """Service clock minus (speedup x) local clock, from the listed tasks whose claim time is known; None if none.

    Each known task was created before its id came back, so every estimate is late; the largest is the closest.
    """
    offsets = [
        e.gmt_create_ms / 1000 - ctx.speedup * known[e.task_id]
        for e in entries
        if e.task_id in known and e.gmt_create_ms is not None
    ]
    return max(offsets) if offsets else None
