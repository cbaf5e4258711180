"""The one place that owns concurrency: a task group of stage workers joined by bounded memory streams.

    intake ─▶ upload×N ─▶ detect×N ─▶ submit×N ─▶ PollScheduler ◀─ poll×N ─▶ download×N ─▶ analysis×N ─▶ results
                 │            │           │                           │            │
                 └────────────┴───────────┴───── finished items ──────┴────────────┴──────▶ results

Downloaded videos are judged (`analysis:`) on their way to the results. That queue never pushes back: a full
one would stall downloads, then polls, then the submission window, so a video that finds it full (analysis
`ANALYSIS_BACKLOG` videos behind the service) ends unjudged, which `lpengine analyze OUTPUT_DIR` can fix later.

Each stream holds at most `concurrency.buffer` items, so a slow stage pushes back on the ones before it instead of
queueing the batch in memory. The submission window is a semaphore taken before a submit and given back when the
task leaves the scheduler: it bounds the tasks outstanding at the service. Items flow one by one, so the first
video can be on disk before the last image is uploaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from lpengine.analysis import Analyzer, missing_extra
from lpengine.errors import AuthError, LeaseLostError, QuotaError
from lpengine.models import Item, ItemState, Stage
from lpengine.stages import PollScheduler, detect, download, poll_once, prepare, submit, upload
from lpengine.stages.analyse import analyse
from lpengine.stages.context import StageContext, current_item
from lpengine.stages.upload import defer

_PLACE_WAIT_MIN = 0.02
_PLACE_WAIT_MAX = 1.0
"""Seconds between two attempts at a place in a full account window, at least and at most."""

ANALYSIS_BACKLOG = 1000
"""Downloaded videos waiting for judgement, at most (a few hundred bytes each)."""

Step = Callable[[StageContext, Item], Awaitable[None]]

# The state an unexpected error in a stage ends the item with (transient: a re-run tries again).
_STAGE_FAILURE = {
    Stage.PLAN: ItemState.REJECTED_LOCALLY,
    Stage.UPLOAD: ItemState.UPLOAD_FAILED,
    Stage.DETECT: ItemState.DETECT_FAILED,
    Stage.SUBMIT: ItemState.SUBMIT_FAILED,
    Stage.POLL: ItemState.TASK_FAILED,
    Stage.DOWNLOAD: ItemState.DOWNLOAD_FAILED,
}


async def handoff(stream: MemoryObjectSendStream[Item], item: Item) -> None:
    """`stream.send(item)`, minus its trip round the event loop when the buffer has room or a receiver waits.

    anyio's `send` and `receive` each yield to the loop first; six hand-offs per item made that ~3 % of the
    engine's CPU at 100k items. Only a full buffer waits here (back-pressure as before); every stage yields in its
    own I/O, so no worker can hog the loop for more than a buffer's worth of items.
    """
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)
    except anyio.BrokenResourceError:
        # Every receiver has left, which only a stop does (workers leave on cancellation): raise that cancellation,
        # as `send` would have at its first checkpoint, not a broken stream that reads like a bug.
        await anyio.lowlevel.checkpoint_if_cancelled()
        raise


async def drain(inbox: MemoryObjectReceiveStream[Item]) -> AsyncIterator[Item]:
    """`async for item in inbox`, minus the trip round the event loop when an item is already waiting."""
    while True:
        try:
            item = inbox.receive_nowait()
        except anyio.WouldBlock:
            try:
                item = await inbox.receive()
            except anyio.EndOfStream:
                return
        except anyio.EndOfStream:
            return
        yield item


class _SchedulerSink:
    """Lets submit workers hand items to the poll scheduler as if it were the next stream."""

    def __init__(self, scheduler: PollScheduler) -> None:
        self._scheduler = scheduler
        self._producer = scheduler.producer()

    async def send(self, item: Item, queued: float | None = None) -> None:
        self._scheduler.add(item, resumed=item.resumed and item.submitted_wall is not None, queued=queued)

    async def __aenter__(self) -> _SchedulerSink:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._producer.__aexit__(exc_type, exc, tb)


class Orchestrator:
    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.scheduler = PollScheduler(speedup=ctx.speedup, ratio=ctx.config.limits.expected_realtime_factor)
        self.analyzer: Analyzer | None = None
        self._slot_freed = asyncio.Event()
        self._warming = False
        self._tg: anyio.abc.TaskGroup | None = None
        if ctx.config.analysis.enabled:
            if hint := missing_extra():
                ctx.log.emit("warning", "analysis.unavailable", reason=hint)
            else:
                self.analyzer = Analyzer(ctx.config.analysis)

    async def run(self, intake: MemoryObjectReceiveStream[Item], results: MemoryObjectSendStream[Item]) -> None:
        """Run every stage until the intake is closed and drained. Fatal account errors propagate."""
        c = self.ctx.config.concurrency
        to_detect, from_upload = anyio.create_memory_object_stream[Item](c.buffer)
        to_submit, from_detect = anyio.create_memory_object_stream[Item](c.buffer)
        to_download, from_poll = anyio.create_memory_object_stream[Item](c.buffer)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for _ in range(c.upload):
                tg.start_soon(self._stage, (prepare, upload), intake.clone(), to_detect.clone(), results.clone())
            for _ in range(c.detect):
                tg.start_soon(self._stage, (detect,), from_upload.clone(), to_submit.clone(), results.clone())
            for _ in range(c.submit):
                tg.start_soon(self._submit_worker, from_detect.clone(), _SchedulerSink(self.scheduler), results.clone())
            for _ in range(c.poll):
                tg.start_soon(self._poll_worker, to_download.clone(), results.clone())
            to_judge, from_download = anyio.create_memory_object_stream[Item](ANALYSIS_BACKLOG)
            for _ in range(c.download):
                judge = to_judge.clone() if self.analyzer is not None else None
                tg.start_soon(self._stage, (download,), from_poll.clone(), None, results.clone(), judge)
            if self.analyzer is not None:
                for _ in range(self.ctx.config.analysis.workers):
                    tg.start_soon(self._analysis_worker, self.analyzer, from_download.clone(), results.clone())
            # Workers hold clones; closing the originals lets each stream end when its last producer is done.
            for stream in (
                intake,
                results,
                to_detect,
                from_upload,
                to_submit,
                from_detect,
                to_download,
                from_poll,
                to_judge,
                from_download,
            ):
                stream.close()

    async def _run_step(self, step: Step, item: Item) -> None:
        current_item.set(item)  # each worker is its own task: this names the item in its client retries
        try:
            await step(self.ctx, item)
        except (AuthError, QuotaError):
            raise
        except LeaseLostError as exc:
            self.ctx.emit(item, "item.taken_over", level="warning")
            defer(item, str(exc))
        except Exception as exc:  # a bug or an unforeseen fault must not sink the other items of the batch
            self.ctx.emit(item, "stage.internal_error", level="error", error=repr(exc), exc_info=True)
            item.finish(_STAGE_FAILURE[item.stage], f"internal error: {exc.__class__.__name__}: {exc}", transient=True)

    async def _finish(self, item: Item, results: MemoryObjectSendStream[Item]) -> None:
        self.ctx.release_inputs(item)
        try:
            await self.ctx.save_finished(item)
        except LeaseLostError as exc:  # taken over while polling or downloading: its successor finishes it
            defer(item, str(exc))
        if item.deferred:  # not finished: another worker holds it (no progress event: it is not this one's)
            self.ctx.log.emit("debug", "item.deferred", item=item.spec.output_name, reason=item.reason)
        else:
            level = "info" if item.state is ItemState.SUCCEEDED else "warning"
            self.ctx.emit(item, "item.finished", level=level, state=item.state, reason=item.reason)
        await handoff(results, item)

    async def _stage(
        self,
        steps: tuple[Step, ...],
        inbox: MemoryObjectReceiveStream[Item],
        outbox: MemoryObjectSendStream[Item] | None,
        results: MemoryObjectSendStream[Item],
        judge: MemoryObjectSendStream[Item] | None = None,
    ) -> None:
        """`judge`: where succeeded items go to be analysed before they are finished."""
        async with inbox, results:
            try:
                async for item in drain(inbox):
                    for step in steps:
                        await self._run_step(step, item)
                        if item.state is not None:
                            break
                    if item.state is not None or outbox is None:
                        if judge is None or not self._to_judge(judge, item):
                            await self._finish(item, results)
                    else:
                        self.ctx.emit(item, "stage.done", level="debug")
                        await handoff(outbox, item)
            finally:
                for stream in (outbox, judge):
                    if stream is not None:
                        stream.close()

    def _to_judge(self, judge: MemoryObjectSendStream[Item], item: Item) -> bool:
        """Queue a succeeded, unjudged item for analysis without waiting (see the module docstring)."""
        if item.state is not ItemState.SUCCEEDED or item.analysis is not None or item.output_path is None:
            return False
        try:
            judge.send_nowait(item)
            # the video is on disk and verified: progress shows the item succeeded while its verdict is made
            self.ctx.emit(item, "stage.done", level="debug")
        except anyio.WouldBlock:
            self.ctx.emit(
                item,
                "analysis.skipped",
                level="warning",
                reason=f"analysis is {ANALYSIS_BACKLOG} videos behind; `lpengine analyze OUTPUT_DIR` judges it later",
            )
            return False
        return True

    async def _warm_up(self, analyzer: Analyzer) -> None:
        try:
            await analyzer.warm_up()
        except Exception as exc:  # the first analysis will meet the same problem and record it on its item
            self.ctx.log.emit("warning", "analysis.warm_up_failed", error=repr(exc))

    async def _analysis_worker(
        self, analyzer: Analyzer, inbox: MemoryObjectReceiveStream[Item], results: MemoryObjectSendStream[Item]
    ) -> None:
        async with inbox, results:
            async for item in drain(inbox):
                await analyse(self.ctx, analyzer, item)
                await self._finish(item, results)

    async def _submit_worker(
        self,
        inbox: MemoryObjectReceiveStream[Item],
        sink: _SchedulerSink,
        results: MemoryObjectSendStream[Item],
    ) -> None:
        async with inbox, sink, results:
            async for item in drain(inbox):
                await self.ctx.window.acquire()
                if self.ctx.account is not None:
                    await self._take_place(item)
                await self._run_step(submit, item)
                if self.analyzer is not None and not self._warming and item.task_id is not None:
                    self._warming = True  # a video is coming: start the analysis worker while it is made
                    assert self._tg is not None
                    self._tg.start_soon(self._warm_up, self.analyzer)
                if item.state is not None:
                    await self._release(item)
                    await self._finish(item, results)
                elif self.ctx.account is not None:
                    await sink.send(item, await self.ctx.account.submitted(item.item_id))
                else:
                    await sink.send(item)

    async def _take_place(self, item: Item) -> None:
        """Wait for a place in the account's window (shared by every worker on the account). A place frees when a
        task leaves the service, so between attempts wait for the next task predicted to end (with every worker's
        tasks in the prediction), or for this worker to free one itself."""
        account = self.ctx.account
        assert account is not None
        window = self.ctx.config.concurrency.submit_window
        while not await account.take(item.item_id, window, item.audio_duration or 10.0):
            self.scheduler.set_view(await account.view())
            self.scheduler.replan()
            end = self.scheduler.next_end()
            # Its owner notices the task's end a poll margin later; past that, look again every few hundredths.
            wait = _PLACE_WAIT_MAX if end is None else (end - anyio.current_time()) * 1.05
            freed = self._slot_freed
            with anyio.move_on_after(min(max(wait, 0.0) + _PLACE_WAIT_MIN, _PLACE_WAIT_MAX)):
                await freed.wait()

    async def _release(self, item: Item) -> None:
        """The item's task left the service (or was never sent): its place in the window is free."""
        self.ctx.window.release()
        if self.ctx.account is not None and item.item_id:
            with anyio.CancelScope(shield=True):
                await self.ctx.account.release(item.item_id, self.scheduler.runner_free)
            self._slot_freed.set()
            self._slot_freed = asyncio.Event()

    async def _poll_worker(self, outbox: MemoryObjectSendStream[Item], results: MemoryObjectSendStream[Item]) -> None:
        async with outbox, results:
            while (tracked := await self.scheduler.next_due()) is not None:
                if self.ctx.account is not None:
                    # Other workers' tasks run in the same queue: look at them before spending a query.
                    self.scheduler.set_view(await self.ctx.account.view())
                    if not self.scheduler.recheck(tracked):
                        continue
                item = tracked.item
                current_item.set(item)
                try:
                    left = await poll_once(self.ctx, self.scheduler, tracked)
                except (AuthError, QuotaError):
                    raise
                except Exception as exc:
                    self.scheduler.release(tracked)
                    self.ctx.emit(item, "stage.internal_error", level="error", error=repr(exc), exc_info=True)
                    left = item.finish(ItemState.TASK_FAILED, f"internal error: {exc!r}", transient=True)
                if left is None:
                    continue
                await self._release(left)
                if left.state is not None:
                    await self._finish(left, results)
                else:
                    await handoff(outbox, left)
