"""`Engine`: the embeddable entry point. Wires config → emulator? → client → storage → state → orchestrator.

    async with Engine(config) as engine:
        report = await engine.run()                  # the batch from the config
        result = await engine.process("a.jpg")       # or one item at a time, from a long-running service

No `asyncio.run`, no signal handlers, no global state: cancelling the caller's task cancels the pipeline, and every
write already started still reaches the state store (shielded), so the next run resumes where this one stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import SecretStr

from lpengine.client.api import DashScopeClient
from lpengine.client.limits import account_of
from lpengine.config import BatchConfig, Secrets, VideoParams, is_url, load_secrets
from lpengine.errors import (
    AuthError,
    ConfigError,
    InputRejectedError,
    LPEngineError,
    QuotaError,
    StorageError,
)
from lpengine.logs import BatchLog, Redactor
from lpengine.models import Item, ItemResult, ItemSpec, ItemState, RunReport, Stage
from lpengine.orchestrator import Orchestrator, drain, handoff
from lpengine.plan import Namer, PlanProblem, input_problems, iter_plan
from lpengine.reports import result_from_state, write_reports
from lpengine.reports.spool import ResultSpool, spool_dir
from lpengine.stages.context import ProgressEvent, StageContext
from lpengine.stages.redo import reset_for_redo
from lpengine.stages.upload import load_audio, prepare
from lpengine.stages.upright import upright_folder
from lpengine.state import BatchLock, open_store, state_secrets, state_url
from lpengine.state.base import Coordinator
from lpengine.storage import open_storage
from lpengine.storage.base import Storage

__all__ = ["REDO_BAD", "DryRunReport", "Engine"]

_MAX_AUDIO_S = 180.0
REDO_BAD = frozenset({"bad"})
"""The verdicts `--redo bad` and the console's Redo bad make again (`dry_run(redo=...)`)."""
_AWAIT_OTHERS_S = 2.0  # how often a worker done with its own items looks at those others hold (two statements)


@dataclass
class _Batch:
    """Collects the results of one `run()` without holding an event per item, or its results: they go to the
    spool file as they finish (a 100k-item run must not grow with the batch)."""

    spool: ResultSpool
    remaining: int = 0
    fed_all: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)

    def check(self) -> None:
        if self.fed_all and self.remaining == 0:
            self.done.set()


@dataclass(frozen=True, slots=True)
class DryRunReport:
    """What a run would send and roughly cost, from local checks only. Every planned item is in exactly one of
    `already_done`, `finished_failed`, `rejected`, `in_progress` and `would_submit`."""

    items: tuple[ItemResult, ...]
    would_detect: int
    """Of `would_submit`, the items whose image has no face verdict yet."""
    would_submit: int
    video_seconds: float
    estimated_cost_cny: float
    already_done: int
    finished_failed: int = 0
    """Ended with a final failure in an earlier run (a refusal, a failed task): not retried, nothing paid."""
    rejected: int = 0
    """Refused by a local check or the plan: never sent."""
    in_progress: int = 0
    """Tasks an earlier run submitted: this run collects them, paying nothing new."""
    redo: tuple[str, ...] = ()
    """With `dry_run(redo=...)`: the ids of the finished items whose verdict asks for a redo (pass them to
    `run(redo=...)`), counted in `would_submit`. Empty while an earlier redo request is unfinished."""
    redo_names: tuple[str, ...] = ()
    """Their output names, in the same order."""
    redo_seconds: float = 0.0
    """Of `video_seconds`, what the redo makes again."""
    redo_cost_cny: float = 0.0
    """Of `estimated_cost_cny`, what the redo pays: its videos only (its photos' face verdicts are on record)."""
    redo_resuming: int = 0
    """Items of the latest redo request not finished yet (a run stopped mid-redo): this run finishes them, and
    selects nothing new until they are."""

    @property
    def redo_digest(self) -> str:
        """Names the selection: a confirmation given for one selection is refused for another."""
        return hashlib.sha256("\n".join(sorted(self.redo)).encode()).hexdigest()[:16]


class Engine:
    """A batch engine bound to one configuration. Use as an async context manager."""

    def __init__(
        self,
        config: BatchConfig,
        *,
        api_key: str | SecretStr | None = None,
        on_event: Callable[[ProgressEvent], None] | None = None,
        lock: bool = True,
    ) -> None:
        self.config = config
        secrets_ = load_secrets(config.base_dir)
        if api_key is not None:
            key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
            secrets_ = secrets_.model_copy(update={"api_key": key})
        self._secrets: Secrets = secrets_
        self._on_event = on_event
        self._lock = lock
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._intake: MemoryObjectSendStream[Item] | None = None
        self._ctx: StageContext | None = None
        self._pipeline_scope = anyio.CancelScope()
        self._orchestrator: Orchestrator | None = None
        self._cancel_pending = False
        self._inflight: dict[int, Item] = {}
        self._waiters: dict[int, Callable[[Item], None]] = {}
        self._fatal: LPEngineError | None = None
        self._namer = Namer()
        self.emulator_url: str | None = None

    def __repr__(self) -> str:
        return f"Engine(output={self.config.output_dir})"

    @classmethod
    def estimating(cls, config: BatchConfig) -> Engine:
        """An engine for `dry_run` only, beside a run that may hold the batch: no lock, no emulator, and a key that
        no service accepts, so nothing it could do would be paid for."""
        api = config.api.model_copy(update={"emulator": None})
        return cls(config.model_copy(update={"api": api}), api_key="dry-run-sends-nothing", lock=False)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("Engine is already open")
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._open(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def _open(self, stack: AsyncExitStack) -> None:
        config = self.config
        if problems := input_problems(config):
            raise ConfigError(problems)
        out = config.output_dir
        try:
            await anyio.Path(out).mkdir(parents=True, exist_ok=True)
            await anyio.to_thread.run_sync(_probe_writable, out)
        except OSError as exc:
            raise ConfigError(
                [f"output.dir: cannot write in {out} ({exc.strerror}); choose a writable folder or fix its permissions"]
            ) from None
        shared = state_url(config, self._secrets) is not None  # cooperative workers: no run lock, no sweeping
        if self._lock and not shared:
            stack.enter_context(BatchLock(config.state_path.with_suffix(".lock")))
            # Holding the lock, nobody else writes here: partial downloads of a killed run can go.
            for stale in await anyio.to_thread.run_sync(lambda: list(out.glob(".*.part"))):
                await anyio.Path(stale).unlink(missing_ok=True)
            await anyio.to_thread.run_sync(shutil.rmtree, upright_folder(config), True)  # a killed run's copies
        # Before anything that could reach DashScope: an unusable state database stops the run with nothing sent.
        store = await stack.enter_async_context(open_store(config, self._secrets, worker=self._lock))
        base_url, api_key = config.api.base_url, self._secrets.api_key
        if config.api.emulator is not None:
            from lpengine.emulator import EmulatorSettings, run_emulator

            key = SecretStr(f"sk-emulator-{secrets.token_hex(8)}")
            emu_cfg = config.api.emulator
            emulator = await stack.enter_async_context(
                run_emulator(
                    EmulatorSettings(
                        api_keys=[key.get_secret_value()],
                        speedup=config.speedup,
                        realtime_factor=emu_cfg.realtime_factor,
                        detector=emu_cfg.detector,
                        video=emu_cfg.video,
                    )
                )
            )
            base_url, api_key = emulator.base_url, key
            self.emulator_url = emulator.base_url
        if api_key is None:
            raise ConfigError(
                [
                    "DASHSCOPE_API_KEY is not set: export it or put it in .env "
                    "(or run the demo: `python -m lpengine demo`, which needs no key)"
                ]
            )
        redactor = Redactor(
            [s.get_secret_value() for s in (api_key, self._secrets.oss_access_key_secret) if s is not None]
            + state_secrets(config, self._secrets)
        )
        log = BatchLog(out / f"lpengine-{time.strftime('%Y%m%d-%H%M%S')}.jsonl", redactor)
        stack.callback(log.close)
        # Workers sharing a database share each account's request rates (PostgreSQL; one atomic statement a request).
        coordinator = store.coordinator
        account = account_of(api_key.get_secret_value())
        pacer = coordinator.pacer(account) if coordinator is not None else None
        client = await stack.enter_async_context(
            DashScopeClient(config.api, api_key, base_url=base_url, speedup=config.speedup, pacer=pacer)
        )
        storage: Storage = await stack.enter_async_context(open_storage(config, client, self._secrets))
        self._ctx = StageContext(
            config=config,
            client=client,
            storage=storage,
            store=store,
            log=log,
            on_event=self._on_event,
            url_lifetime=self._url_lifetime(),
            window=asyncio.Semaphore(config.concurrency.submit_window),
            account=coordinator.account_queue(account) if coordinator is not None else None,
        )
        stack.callback(self._ctx.upright.close)
        if self._ctx.default_audio is not None:
            # The shared voice track is checked before anything else: a bad one fails every item.
            try:
                await load_audio(self._ctx, self._ctx.default_audio)
            except InputRejectedError as exc:
                raise ConfigError([f"audio: {exc.path}: {exc.reason}"]) from None
        intake_send, intake_recv = anyio.create_memory_object_stream[Item](0)
        results_send, results_recv = anyio.create_memory_object_stream[Item](config.concurrency.buffer)
        self._intake = intake_send
        tg = anyio.create_task_group()
        await tg.__aenter__()

        async def close_pipeline() -> None:
            # The group never sees the caller's exception: passing it in would come back wrapped in an
            # ExceptionGroup, and callers must be able to `except AuthError` around `async with Engine(...)`.
            await tg.__aexit__(None, None, None)

        stack.push_async_callback(close_pipeline)
        self._tg = tg
        tg.start_soon(self._pipeline, intake_recv, results_send)
        tg.start_soon(self._collect, results_recv)
        if store.coordinator is not None:
            beating = anyio.CancelScope()
            stack.callback(beating.cancel)  # runs before close_pipeline, which waits for the loop to end
            tg.start_soon(_heartbeat, store.coordinator, beating)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._intake is not None:
            self._intake.close()  # no more items: the pipeline drains and ends
        if exc is not None:
            self._pipeline_scope.cancel()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    def _url_lifetime(self) -> timedelta:
        """How long a published URL must stay valid: until the item's task has fetched it.

        An item waits behind at most the buffers, workers and the submission window, each slot holding at most one
        task's run time (audio ≤ 180 s × the run-time factor), plus the request deadlines. Computed, not guessed.
        """
        c = self.config.concurrency
        slots = c.submit_window + 2 * c.buffer + c.detect + c.submit + 1
        run = _MAX_AUDIO_S * self.config.limits.expected_realtime_factor * 2
        service_s = slots * run + 2 * self.config.api.retry.total_timeout_s + 600
        return timedelta(seconds=service_s / self.config.speedup)

    # -- the pipeline -----------------------------------------------------------------------------------------

    @property
    def ctx(self) -> StageContext:
        if self._ctx is None:
            raise RuntimeError("use `async with Engine(config) as engine:` first")
        return self._ctx

    async def _pipeline(self, intake: MemoryObjectReceiveStream[Item], results: MemoryObjectSendStream[Item]) -> None:
        self._orchestrator = Orchestrator(self.ctx)
        try:
            with self._pipeline_scope:
                await self._orchestrator.run(intake, results)
        except* (AuthError, QuotaError) as group:
            fatal = group.exceptions[0]
            assert isinstance(fatal, AuthError | QuotaError)
            self._fatal = fatal
            self.ctx.log.emit("error", "batch.aborted", code=fatal.code, message=fatal.message)
        finally:
            if self._cancel_pending:
                await self._cancel_queued_tasks()
            reason = (
                f"batch stopped: {self._fatal.code}: {self._fatal.message}"
                if isinstance(self._fatal, AuthError | QuotaError)
                else "the run stopped before this item finished; a re-run resumes it"
            )
            for item in list(self._inflight.values()):
                item.finish(ItemState.CANCELLED, reason, transient=True)
                self._complete(item)

    async def _collect(self, results: MemoryObjectReceiveStream[Item]) -> None:
        async with results:
            async for item in drain(results):
                self._complete(item)

    def _complete(self, item: Item) -> None:
        if self._inflight.pop(id(item), None) is None:
            return
        waiter = self._waiters.pop(id(item), None)
        if waiter is not None:
            waiter(item)

    async def _feed(self, item: Item, waiter: Callable[[Item], None]) -> None:
        if self._intake is None or self._fatal is not None or self._pipeline_scope.cancel_called:
            item.finish(ItemState.CANCELLED, "the engine is stopping; item not started", transient=True)
            waiter(item)
            return
        self._inflight[id(item)] = item
        self._waiters[id(item)] = waiter
        try:
            await handoff(self._intake, item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._inflight.pop(id(item), None)
            self._waiters.pop(id(item), None)
            item.finish(ItemState.CANCELLED, "the engine is stopping; item not started", transient=True)
            waiter(item)

    async def _cancel_queued_tasks(self) -> None:
        """On a stop with `cancel_pending`: withdraw tasks still queued at the service (never run, never billed), and
        record that it was us, so the next run submits them again instead of reporting them cancelled."""
        assert self._orchestrator is not None
        with anyio.move_on_after(self.config.api.request_timeout_s, shield=True):
            for item in self._orchestrator.scheduler.pending_items():
                if item.task_id and await self.ctx.api.cancel_task(item.task_id):
                    item.cancelled_by_us = True
                    await self.ctx.save(item)
                    self.ctx.emit(item, "task.cancelled_on_stop", level="warning")

    def stop(self, *, cancel_pending: bool = False) -> None:
        """Stop taking items and cancel what is in flight (state already committed stays; a re-run resumes).

        `cancel_pending` also withdraws the tasks still queued (PENDING) at the service.
        """
        self._cancel_pending = cancel_pending
        self._pipeline_scope.cancel()
        if self._intake is not None:
            self._intake.close()

    # -- public API -------------------------------------------------------------------------------------------

    async def run(
        self,
        *,
        limit: int | None = None,
        on_planned: Callable[[int], None] | None = None,
        plan: Callable[[BatchConfig], Iterator[ItemSpec | PlanProblem]] = iter_plan,
        redo: Collection[str] = (),
    ) -> RunReport:
        """Run the configured batch; returns the report (also written as report.json/.csv in the output folder).

        `plan` enumerates the items (a sweep multiplies the batch's photos by its combinations). `redo`: finished
        items to make again, paying again (`DryRunReport.redo`, once whoever pays has seen its cost and agreed).

        Raises `AuthError`/`QuotaError` when the account itself refuses work (after writing the report).
        """
        ctx = self.ctx
        started = time.perf_counter()
        if redo:
            await self._start_redo(redo)
        batch = _Batch(await anyio.to_thread.run_sync(ResultSpool.create, spool_dir(self.config.state_path)))
        pricing = self.config.pricing

        deferred: dict[str, Item] = {}  # held by other workers (PostgreSQL): reported once they settle

        def done(item: Item) -> None:
            if item.deferred:
                deferred[item.item_id] = item
            else:
                batch.spool.append(item.result(pricing.detect_per_image, pricing.video_per_second))
            batch.remaining -= 1
            batch.check()

        try:
            count = 0
            async for entry in self._plan(plan):
                if (limit is not None and count >= limit) or self._pipeline_scope.cancel_called:
                    break
                count += 1
                batch.remaining += 1
                if on_planned is not None:
                    on_planned(count)
                if isinstance(entry, PlanProblem):
                    problem = _problem_item(entry, self.config.video)
                    # logged and counted live like any finished item, so stderr and the progress agree with the report
                    ctx.emit(problem, "item.finished", level="warning", state=problem.state, reason=problem.reason)
                    done(problem)
                    continue
                await self._feed(Item(spec=entry), done)
            batch.fed_all = True
            batch.check()
            await batch.done.wait()
            if deferred:
                await self._await_others(batch, deferred, done)
        finally:
            batch.spool.close()  # flushed on cancellation too: the rows so far stay readable
        client = ctx.api
        report = RunReport(
            items=batch.spool.results(),
            wall_time_s=time.perf_counter() - started,
            api_requests={m.name: m.requests for m in client.budget.stats()},
            throttled=sum(m.throttled for m in client.budget.stats()),
            retries=client.retries,
            totals=batch.spool.totals,
        )
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(write_reports, report, self.config.output_dir)
            await self._cleanup_storage(report)
        ctx.log.emit("info", "batch.finished", **report.summary())
        if self._fatal is not None:
            raise self._fatal
        return report

    async def _await_others(self, batch: _Batch, deferred: dict[str, Item], done: Callable[[Item], None]) -> None:
        """Wait for the items other workers hold: report each as they record it, and take over (and run) those
        whose worker died. With this, every live worker finishes a batch only when all of it is settled."""
        coordinator = self.ctx.store.coordinator
        assert coordinator is not None
        pricing = self.config.pricing
        while deferred and self._fatal is None and not self._pipeline_scope.cancel_called:
            settled, taken = await coordinator.deferred(list(deferred))
            for row in settled:
                deferred.pop(row.item_id)
                batch.spool.append(result_from_state(row.data, pricing.detect_per_image, pricing.video_per_second))
            if taken:
                batch.done, batch.fed_all = anyio.Event(), False
                for item_id in taken:
                    spec = deferred.pop(item_id).spec
                    self.ctx.log.emit("warning", "item.taken_over", item=spec.output_name)
                    batch.remaining += 1
                    await self._feed(Item(spec=spec), done)
                batch.fed_all = True
                batch.check()
                await batch.done.wait()
            elif deferred:
                await anyio.sleep(min(coordinator.heartbeat_every, _AWAIT_OTHERS_S))
        for item in deferred.values():  # the run was stopped meanwhile
            batch.spool.append(item.result(pricing.detect_per_image, pricing.video_per_second))

    async def process(
        self,
        image: str | Path,
        *,
        audio: str | Path | None = None,
        output_name: str | None = None,
        params: VideoParams | None = None,
    ) -> ItemResult:
        """Run one item through the pipeline and wait for its result (for long-running services)."""
        ref = str(image)
        if not is_url(ref):
            ref = str(Path.cwd() / ref)  # relative paths mean the caller's cwd, as everywhere in Python
        spec = ItemSpec(
            image=ref,
            output_name=self._namer.assign(output_name or Path(ref.split("?")[0]).stem),
            params=params or self.config.video,
            audio=str(audio) if audio is not None else None,
            source="process()",
        )
        finished = anyio.Event()
        slot: list[Item] = []

        def done(item: Item) -> None:
            slot.append(item)
            finished.set()

        await self._feed(Item(spec=spec), done)
        await finished.wait()
        pricing = self.config.pricing
        if self._fatal is not None:
            raise self._fatal
        return slot[0].result(pricing.detect_per_image, pricing.video_per_second)

    async def dry_run(
        self,
        *,
        limit: int | None = None,
        plan: Callable[[BatchConfig], Iterator[ItemSpec | PlanProblem]] = iter_plan,
        redo: Collection[str] = (),
    ) -> DryRunReport:
        """Plan and check locally; no paid request. Items already finished in the state store are counted apart.

        `redo`: verdicts ("bad") whose finished videos would be made again (`lpengine run --redo bad`); they are
        selected from the items this plan reaches, so a record no input leads to any more is never paid for.
        """
        ctx = self.ctx
        pricing = self.config.pricing
        results: list[ItemResult] = []
        would_detect = would_submit = done = failed = rejected = in_progress = resuming = 0
        seconds = 0.0
        seen_images: set[str] = set()
        count = 0
        epoch = await ctx.store.redo_epoch() if redo else 0
        selected: list[Item] = []
        async for entry in self._plan(plan):
            if limit is not None and count >= limit:
                break
            count += 1
            if isinstance(entry, PlanProblem):
                results.append(_problem_item(entry, self.config.video).result(0, 0))
                rejected += 1
                continue
            item = Item(spec=entry)
            await prepare(ctx, item)
            if item.state is None and epoch and item.redo is not None and item.redo["epoch"] == epoch:
                resuming += 1  # counted below as any unfinished item: it pays for what is left of it
            if item.state is ItemState.SUCCEEDED and (item.analysis or {}).get("verdict") in redo:
                selected.append(item)
            elif item.state is ItemState.SUCCEEDED:
                done += 1
            elif item.state is ItemState.REJECTED_LOCALLY:
                rejected += 1
            elif item.state is not None:
                failed += 1
            elif item.task_id is not None:
                in_progress += 1
            else:
                key = item.image.sha256 if item.image else item.spec.image
                if key not in seen_images and await ctx.store.detect_verdict(key) is None:
                    would_detect += 1
                seen_images.add(key)
                would_submit += 1
                seconds += item.audio_duration
            results.append(item.result(0, 0))
        if resuming:  # an unfinished request is finished first: nothing is redone twice for one request
            done, selected = done + len(selected), []
        redo_seconds = sum(item.audio_duration for item in selected)  # no face check: a video was made
        would_submit += len(selected)
        seconds += redo_seconds
        cost = would_detect * pricing.detect_per_image + seconds * pricing.video_per_second
        return DryRunReport(
            tuple(results),
            would_detect,
            would_submit,
            seconds,
            round(cost, 4),
            done,
            failed,
            rejected,
            in_progress,
            redo=tuple(item.item_id for item in selected),
            redo_names=tuple(item.spec.output_name for item in selected),
            redo_seconds=redo_seconds,
            redo_cost_cny=round(redo_seconds * pricing.video_per_second, 4),
            redo_resuming=resuming,
        )

    async def _start_redo(self, item_ids: Collection[str]) -> None:
        """Commit a redo request: its items' records reset together under a new epoch (`lpengine.stages.redo`)."""
        store = self.ctx.store
        epoch, wall = await store.redo_epoch() + 1, time.time()
        rows = [row for item_id in item_ids if (row := await store.get(item_id)) is not None]
        # only a finished video is replaced: an item made again meanwhile is not paid for twice
        rows = [r for r in rows if r.state == ItemState.SUCCEEDED.value and not r.data.get("transient")]
        if not rows:
            return
        reset = [(row, reset_for_redo(row.data, epoch, wall)) for row in rows]
        await store.start_redo([(row.item_id, data) for row, data in reset])
        log = self.ctx.log
        log.emit("info", "redo.started", epoch=epoch, items=len(reset))
        for row, data in reset:
            earlier = data["redo"]["history"][-1]
            log.emit("info", "item.redo", item=row.output_name, count=data["redo"]["count"], **earlier)

    async def _plan(
        self, plan: Callable[[BatchConfig], Iterator[ItemSpec | PlanProblem]]
    ) -> AsyncIterator[ItemSpec | PlanProblem]:
        """The plan, produced in a worker thread in chunks (folder scans and manifests are blocking I/O). The batch's
        own plan names each input as earlier runs of the batch did (`Namer`)."""
        if plan is iter_plan:
            namer = Namer()
            records: list[tuple[str, str | None, str]] = []
            async for stored in self.ctx.store.items():
                records.append((str(stored.data.get("input") or ""), stored.data.get("key"), stored.output_name))
                if len(records) >= 1000:
                    await anyio.to_thread.run_sync(namer.record, records)
                    records = []
            await anyio.to_thread.run_sync(namer.record, records)
            iterator = iter_plan(self.config, namer)
        else:
            iterator = plan(self.config)

        def chunk() -> list[ItemSpec | PlanProblem]:
            out: list[ItemSpec | PlanProblem] = []
            for entry in iterator:
                out.append(entry)
                if len(out) >= 256:
                    break
            return out

        while entries := await anyio.to_thread.run_sync(chunk):
            for entry in entries:
                yield entry

    async def _cleanup_storage(self, report: RunReport) -> None:
        policy = getattr(self.config.storage, "cleanup", "never")
        if policy == "never" or (policy == "on_success" and not report.ok):
            return
        if sum(w["live"] for w in await self.ctx.store.workers()) > 1:
            # Other workers of the batch may still have tasks fetching these objects: the last one to end cleans up.
            self.ctx.log.emit("info", "storage.cleanup_left_to_other_workers")
            return
        keys = await self.ctx.store.created_keys()
        if not keys:
            return
        try:
            deleted = await self.ctx.storage.cleanup(keys)
        except StorageError as exc:
            self.ctx.log.emit("warning", "storage.cleanup_failed", error=str(exc))
            return
        await self.ctx.store.forget_created_keys(keys)
        self.ctx.log.emit("info", "storage.cleaned", deleted=deleted)


async def _heartbeat(coordinator: Coordinator, scope: anyio.CancelScope) -> None:
    """Keep this worker's leases alive until the engine closes."""
    with scope:
        while True:
            await anyio.sleep(coordinator.heartbeat_every)
            await coordinator.heartbeat()


def _probe_writable(folder: Path) -> None:
    """Raise OSError now if `folder` takes no new file, rather than as a traceback from whichever write comes first
    (the lock, the log, the state store)."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def _problem_item(problem: PlanProblem, params: VideoParams) -> Item:
    item = Item(
        spec=ItemSpec(image=problem.image or problem.source, output_name="", params=params, source=problem.source)
    )
    item.stage = Stage.PLAN
    return item.finish(ItemState.REJECTED_LOCALLY, f"{problem.source}: {problem.message}")
