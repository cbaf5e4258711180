"""Stage 4: one scheduler decides when each outstanding task is worth a query (§4).

The account runs one task at a time, first in, first out (§7), so the finish time of every outstanding task can be
predicted: the running one ends at its `scheduled_time` + run time, each queued one a run time after its
predecessor. Run time = learnt ratio × audio duration (the ratio is learnt from finished tasks as the batch goes).
A task is queried once, shortly after its predicted end; a task still queued is looked at only when the chain says
it should be done (or after `max_interval` at the latest). Late discovery costs no throughput: the submission
window keeps the next tasks queued at the service, so the runner never waits for us.

Service timestamps are mapped to the local clock through a calibrated offset (`submit_time` of each task against
the local time its submit was sent), so the prediction also works with the emulator's compressed time.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType

import anyio

from lpengine.client.wire import TaskInfo, TaskStatus
from lpengine.errors import AuthError, LPEngineError, QuotaError, ResultMissingError
from lpengine.models import Item, ItemState, Stage
from lpengine.stages.context import INPUT_DOWNLOAD_FAILED, StageContext
from lpengine.state.base import QueueView

_EPOCH = datetime(1970, 1, 1)


def _seconds(moment: datetime) -> float:
    return (moment - _EPOCH).total_seconds()


@dataclass(slots=True)
class Tracked:
    item: Item
    seq: int
    submitted_local: float
    audio_s: float
    queued_local: float
    """Its place in the account's queue (with other workers: when the shared queue recorded it)."""
    status: TaskStatus = TaskStatus.PENDING
    started_service: float | None = None
    polls: int = 0
    failed_rounds: int = 0
    """Consecutive query rounds that ended in an error (each round already retried by the client)."""
    last_poll_local: float = 0.0
    version: int = 0
    in_hand: bool = False
    poll_now: bool = False
    """Resumed from an earlier run: its real submit time is unknown, so look at it at once."""
    odd_status_logged: bool = False
    """An UNRECOGNISED status of this task was logged (once per task is enough to notice a contract change)."""
    due: float = 0.0
    """When it was last planned to be queried (local clock)."""


@dataclass
class PollScheduler:
    """Holds the outstanding tasks; poll workers ask it which task to query next and report back."""

    speedup: float
    ratio: float
    """Initial guess of run time ÷ audio duration (service seconds per audio second)."""
    min_interval_s: float = 2.0
    """Service seconds between two queries of one task, at least."""
    max_interval_s: float = 600.0
    """Service seconds between two queries of one task, at most (foreign tasks may occupy the account)."""
    _tasks: dict[int, Tracked] = field(default_factory=dict)
    _heap: list[tuple[float, int, int]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _idle: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)
    """Workers waiting for a task to fall due, woken one at a time."""
    _timer: asyncio.Handle | None = None
    _timer_at: float = 0.0
    _producers: int = 0
    _closed: bool = False
    _in_hand: int = 0
    _offsets: list[float] = field(default_factory=list)
    _runner_free_local: float = 0.0
    _ratios: list[float] = field(default_factory=list)
    _foreign: list[tuple[float, float]] = field(default_factory=list)
    """Other workers' tasks on the account, (queued at, audio seconds): the runner serves them in the same queue."""
    _next_end: float | None = None

    # -- producer side ----------------------------------------------------------------------------------------

    def producer(self) -> _Producer:
        """Each submit worker holds one; when the last one exits, no new task will come."""
        self._producers += 1
        return _Producer(self)

    def _producer_done(self) -> None:
        self._producers -= 1
        if self._producers == 0:
            self._closed = True
            self._wake()

    def add(self, item: Item, *, resumed: bool = False, queued: float | None = None) -> None:
        now = anyio.current_time()
        tracked = Tracked(
            item=item,
            seq=next(self._seq),
            submitted_local=now,
            audio_s=item.audio_duration or 10.0,
            queued_local=now if queued is None else queued,
            poll_now=resumed,
        )
        self._tasks[tracked.seq] = tracked
        self._replan(now)

    # -- consumer side ----------------------------------------------------------------------------------------

    def pending_items(self) -> list[Item]:
        """Items whose task was last seen queued at the service (a stop may withdraw them)."""
        return [t.item for t in self._tasks.values() if t.status is TaskStatus.PENDING]

    def _wake(self) -> None:
        """Something changed: if a task is due now, hand it to one idle worker; otherwise set the one timer for the
        earliest due time. (Waking every worker on each change, each with its own timeout, cost more CPU at 100k
        items than the queries: a wake-up and a cancel scope per worker per submitted task.)"""
        if not self._idle:
            return  # every worker is busy; each looks at the heap again when it comes back
        while self._heap and self._stale(self._heap[0]):
            heapq.heappop(self._heap)
        if not self._heap:
            if self._closed and not self._tasks and self._in_hand == 0:
                self._wake_one()  # the batch is over: each worker that leaves wakes the next
            return
        due = self._heap[0][0]
        loop = asyncio.get_running_loop()
        if due <= loop.time():
            self._wake_one()
        elif self._timer is None or due < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            # anyio.current_time() is this loop's clock (aiohttp ties the engine to asyncio anyway)
            self._timer, self._timer_at = loop.call_at(due, self._on_timer), due

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    def _wake_one(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _push(self, t: Tracked, due: float) -> None:
        t.due = due
        t.version += 1
        heapq.heappush(self._heap, (due, t.seq, t.version))
        if len(self._heap) > 4 * len(self._tasks) + 64:  # drop superseded entries now and then
            self._heap = [e for e in self._heap if not self._stale(e)]
            heapq.heapify(self._heap)

    async def next_due(self) -> Tracked | None:
        """The next task to query, when its time comes; None once the batch has no task left to watch."""
        while True:
            while self._heap and self._stale(self._heap[0]):
                heapq.heappop(self._heap)
            if not self._heap and self._closed and not self._tasks and self._in_hand == 0:
                self._wake_one()
                return None
            if not self._heap or self._heap[0][0] > anyio.current_time():
                await self._idle_until_woken()
                continue
            _, seq, _ = heapq.heappop(self._heap)
            tracked = self._tasks[seq]
            tracked.version += 1
            tracked.in_hand = True  # no other worker takes it, no replan reschedules it until it reports
            self._in_hand += 1
            self._wake()  # the next task may be due as well
            return tracked

    async def _idle_until_woken(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        self._wake()  # arms the timer for the earliest task (or wakes this very waiter if one is due)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken but cancelled before it could look: pass the turn on
            raise

    def _stale(self, entry: tuple[float, int, int]) -> bool:
        _, seq, version = entry
        t = self._tasks.get(seq)
        return t is None or t.version != version

    # -- the account's queue, shared with other workers (PostgreSQL) ----------------------------------------------

    def set_view(self, view: QueueView) -> None:
        """What the other workers on the account have queued, and when its runner was last seen free."""
        self._foreign = view.queued
        if view.runner_free is not None:
            self._runner_free_local = max(self._runner_free_local, min(view.runner_free, anyio.current_time()))

    def recheck(self, t: Tracked) -> bool:
        """Is the task a worker just took still due, now that the view may have changed? If so the worker keeps it;
        if not, it goes back to wait for its new time (no query spent on a task other workers' tasks delay)."""
        self._hand_back(t)
        now = anyio.current_time()
        self._replan(now)
        if t.due > now:
            return False
        t.version += 1  # its heap entry is void: this worker has it
        t.in_hand = True
        self._in_hand += 1
        return True

    def replan(self) -> None:
        self._replan(anyio.current_time())

    @property
    def runner_free(self) -> float | None:
        """When the runner was last seen free (local clock); None before any task was seen to finish."""
        return self._runner_free_local or None

    def next_end(self) -> float | None:
        """The predicted end of the first task in the account's queue (local clock; past when it overran), as last
        planned: when a place in the window should free next."""
        return self._next_end

    def report(self, t: Tracked, info: TaskInfo) -> bool:
        """Record a query's answer. True when the task is terminal (the caller takes the item away)."""
        now = anyio.current_time()
        self._hand_back(t)
        t.failed_rounds = 0
        t.polls += 1
        t.last_poll_local = now
        t.status = info.status
        if info.submit_time is not None and not t.poll_now:  # a resumed task's local submit time is unknown
            self._offsets.append(_seconds(info.submit_time) - self.speedup * t.submitted_local)
            del self._offsets[:-50]
        if info.scheduled_time is not None:
            t.started_service = _seconds(info.scheduled_time)
        if info.status.terminal:
            self._finished(t, info, now)
            return True
        self._replan(now)
        return False

    def report_error(self, t: Tracked) -> None:
        """The query itself failed (retries exhausted): look again later instead of dropping the task, backing off
        so that a task the service cannot answer for costs a few rounds, not one per interval until its timeout."""
        self._hand_back(t)
        now = anyio.current_time()
        t.last_poll_local = now
        t.failed_rounds += 1
        wait = min(self.min_interval_s * 5 * 2 ** (t.failed_rounds - 1), self.max_interval_s)
        self._push(t, now + wait / self.speedup)
        self._wake()

    def discard(self, t: Tracked) -> None:
        self._tasks.pop(t.seq, None)
        self._wake()

    def release(self, t: Tracked) -> None:
        """A worker gives up a task it took (timed out, or the item left the pipeline)."""
        self._hand_back(t)
        self.discard(t)

    def _hand_back(self, t: Tracked) -> None:
        if t.in_hand:
            t.in_hand = False
            self._in_hand -= 1

    def _finished(self, t: Tracked, info: TaskInfo, now: float) -> None:
        self._tasks.pop(t.seq, None)
        if info.end_time is not None:
            end_local = self._to_local(_seconds(info.end_time))
            if end_local is not None:
                self._runner_free_local = max(self._runner_free_local, min(end_local, now))
            if info.scheduled_time is not None and t.audio_s > 0 and info.status is TaskStatus.SUCCEEDED:
                run = _seconds(info.end_time) - _seconds(info.scheduled_time)
                if run >= 0:
                    self._ratios.append(run / t.audio_s)
                    del self._ratios[:-20]
                    self.ratio = statistics.median(self._ratios)
        self._replan(now)

    # -- prediction -------------------------------------------------------------------------------------------

    def _to_local(self, service_seconds: float) -> float | None:
        if not self._offsets:
            return None
        return (service_seconds - statistics.median(self._offsets)) / self.speedup

    def _replan(self, now: float) -> None:
        """Chain predicted ends through the FIFO queue (with other workers' tasks in it, when the account's queue is
        shared) and reschedule every task not in a worker's hands."""
        free = max(self._runner_free_local, 0.0)
        self._next_end = None
        queue: list[tuple[float, int, Tracked | None, float]] = [
            (t.queued_local, t.seq, t, t.audio_s) for t in self._tasks.values()
        ]
        queue.extend((at, -1, None, audio_s) for at, audio_s in self._foreign)
        queue.sort(key=lambda entry: entry[:2])
        for queued, _, t, audio_s in queue:
            run_local = self.ratio * audio_s / self.speedup
            if t is None:
                free = max(free, queued) + run_local
                if self._next_end is None:
                    self._next_end = free
                continue
            start = max(free, t.submitted_local)
            if t.started_service is not None:
                started = self._to_local(t.started_service)
                if started is not None:
                    start = started
            end = start + run_local
            free = end
            if self._next_end is None:
                self._next_end = end
            if t.in_hand:
                continue
            margin = max(self.min_interval_s / self.speedup, 0.04 * run_local)
            due = end + margin
            if t.polls:
                if t.status in _RUNNING_LIKE and due <= now:
                    # ran longer than predicted: step in fractions of its run time, not in fixed ticks, from the
                    # last look (from `now`, every replan would push the look back again: with other workers'
                    # tasks replanned before each query, a task that overran was never looked at)
                    due = t.last_poll_local + max(self.min_interval_s / self.speedup, 0.15 * run_local)
                due = max(due, t.last_poll_local + self.min_interval_s / self.speedup)
                due = min(due, t.last_poll_local + self.max_interval_s / self.speedup)
            elif t.poll_now:
                due = now
            else:
                due = min(due, t.submitted_local + self.max_interval_s / self.speedup)
            if not math.isfinite(due):
                due = now
            self._push(t, due)
        self._wake()


class _Producer:
    def __init__(self, scheduler: PollScheduler) -> None:
        self._scheduler = scheduler

    async def __aenter__(self) -> _Producer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._scheduler._producer_done()


# -- what a poll worker does with one due task ------------------------------------------------------------------

_RUNNING_LIKE = frozenset({TaskStatus.RUNNING, TaskStatus.UNRECOGNISED})
"""Statuses stepped through like a run that overran: an unknown state most likely means the task is being worked on."""

_INPUT_UNREACHABLE = frozenset({"InvalidURL", INPUT_DOWNLOAD_FAILED})
"""Task codes (§3, §6) for inputs the service could not download: the task ran nothing and is not billed."""

_RETRYABLE_TASK_PREFIXES = ("InternalError", "SystemError", "ModelServiceFailed", "ModelServingError")


def retryable_task_code(code: str | None) -> bool:
    """§6: task-level InternalError.* (Algo, Upload, Timeout) and capacity errors clear on resubmission."""
    return bool(code) and (
        str(code).startswith(_RETRYABLE_TASK_PREFIXES) or code in {"RequestTimeOut", "ModelUnavailable"}
    )


async def poll_once(ctx: StageContext, scheduler: PollScheduler, t: Tracked) -> Item | None:
    """Query one due task. Returns the item when it leaves the scheduler (to download, or finished)."""
    item = t.item
    assert item.task_id is not None
    timeout_local = ctx.config.limits.task_timeout_s / ctx.speedup
    if anyio.current_time() - t.submitted_local > timeout_local:
        scheduler.release(t)
        if t.status in (TaskStatus.PENDING, TaskStatus.SUSPENDED) and await _cancel(ctx, item):
            item.cancelled_by_us = True
        item.finish(ItemState.TIMED_OUT, f"task not finished within limits.task_timeout_s (last seen {t.status})")
        return item
    try:
        info = await ctx.api.get_task(item.task_id)
    except (AuthError, QuotaError):
        scheduler.release(t)
        raise
    except LPEngineError as exc:
        ctx.emit(item, "poll.error", level="warning", error=str(exc))
        scheduler.report_error(t)
        return None
    if info.status is TaskStatus.UNRECOGNISED and not t.odd_status_logged:
        t.odd_status_logged = True
        ctx.emit(item, "task.status_unrecognised", level="warning", status=info.raw_status, treated_as="running")
    if not scheduler.report(t, info):
        return None
    item.timings["poll"] = anyio.current_time() - t.submitted_local
    item.stage = Stage.POLL
    if info.status is TaskStatus.SUCCEEDED:
        # Not saved here: the download's write-ahead save follows and records the URL. A crash in between costs
        # one more query on the re-run (the task still answers with its URL), not a save per item on every run.
        if info.video_url is None:
            item.finish(ItemState.TASK_FAILED, str(ResultMissingError(item.task_id)))
            return item
        item.video_url = info.video_url
        item.video_duration = info.video_duration
        return item
    if info.status is TaskStatus.FAILED:
        item.task_code, item.task_message = info.code, info.message
        if retryable_task_code(info.code):
            return await _resubmit(ctx, scheduler, item, f"task failed with retryable {info.code}")
        if info.code in _INPUT_UNREACHABLE and not item.sent_here:
            # Sent by a run or worker that served the inputs itself (a file server) and died, mid-send or before
            # the task ran: nothing was billed, and a task with this process's URLs can succeed. Once only: a
            # task this process sent that fails alike has URLs the service really cannot fetch.
            why = f"task failed with {info.code}: its inputs were published by a run or worker that is gone"
            return await _resubmit(ctx, scheduler, item, why)
        item.finish(ItemState.TASK_FAILED, f"{info.code}: {info.message}")
        return item
    if info.status is TaskStatus.CANCELED:
        if item.cancelled_by_us:
            return await _resubmit(ctx, scheduler, item, "task was cancelled by an earlier stop")
        item.finish(ItemState.CANCELLED, "the task was cancelled at the service (console or another client)")
        return item
    # UNKNOWN: expired (24 h) or purged — gone; only a new task can produce the video
    return await _resubmit(ctx, scheduler, item, "task is gone at the service (UNKNOWN)")


async def _resubmit(ctx: StageContext, scheduler: PollScheduler, item: Item, why: str) -> Item | None:
    from lpengine.stages.submit import submit

    ctx.emit(item, "task.resubmit", level="warning", why=why, attempts=item.submit_attempts)
    item.task_id = None
    await ctx.save(item)
    await submit(ctx, item)
    if item.state is not None:
        if item.state is ItemState.SUBMIT_FAILED:
            item.finish(ItemState.TASK_FAILED, f"{why}; {item.reason}", transient=item.transient)
        return item
    scheduler.add(item)
    return None


async def _cancel(ctx: StageContext, item: Item) -> bool:
    assert item.task_id is not None
    try:
        with anyio.move_on_after(ctx.config.api.request_timeout_s, shield=True):
            return await ctx.api.cancel_task(item.task_id)
    except LPEngineError:
        return False
    return False
