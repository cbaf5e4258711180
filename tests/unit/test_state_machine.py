"""The per-item state machine, checked against a model over generated sequences of runs.

Each example is a batch of a few items and a script of several runs of the same command. In every run each item
meets a scripted fate at each paid stage: it passes, fails transiently (network trouble, a retryable code), fails
finally (a refusal that would cost the same again), or the stage crashes with an unexpected exception. Between runs
a finished video may be deleted, and a run may be stopped half-way. The real engine, orchestrator, `prepare` and
SQLite state store run it; only the five paid stages are replaced by the script.

The model says what each run must report: exactly one `ItemState` per item, each item finished once, the state
the script chose, and on resume: final outcomes kept without touching a stage (no money spent), transient ones
tried again, a succeeded item re-made only when its video is gone. No submission-window slot may leak.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lpengine import Engine, ItemState
from lpengine.config import (
    AnalysisConfig,
    ApiConfig,
    BatchConfig,
    ConcurrencyConfig,
    FileServerStorageConfig,
    InputsConfig,
    OutputConfig,
)
from lpengine.models import Item, ItemSpec, Stage
from lpengine.orchestrator import _STAGE_FAILURE, Orchestrator
from lpengine.stages.context import StageContext, dump_item, restore_item
from lpengine.stages.poll import PollScheduler, Tracked
from lpengine.stages.upload import prepare
from lpengine.state.sqlite import SqliteStateStore

VOICE = Path(__file__).resolve().parents[2] / "lpengine" / "assets" / "voice.wav"
PAID_STAGES = (Stage.UPLOAD, Stage.DETECT, Stage.SUBMIT, Stage.POLL, Stage.DOWNLOAD)
Kind = Literal["ok", "transient", "final", "crash"]


@dataclass(frozen=True)
class Fate:
    """What happens to one item in one run: `kind` at `stage` (None: it goes through every stage)."""

    stage: Stage | None
    kind: Kind

    def state(self) -> ItemState:
        if self.stage is None:
            return ItemState.SUCCEEDED
        if self.stage is Stage.POLL and self.kind == "final":
            return ItemState.TIMED_OUT  # a final poll outcome: the task never finished in time
        return _STAGE_FAILURE[self.stage]

    @property
    def transient(self) -> bool:
        return self.kind in ("transient", "crash")


fates = st.just(Fate(None, "ok")) | st.builds(
    Fate, st.sampled_from(PAID_STAGES), st.sampled_from(["transient", "final", "crash"])
)


@dataclass
class Script:
    """Plays the fates; records every stage call and every time the orchestrator finishes an item."""

    fates: dict[str, list[Fate]]
    run: int = 0
    stop_at: tuple[str, Stage] | None = None
    engine: Engine | None = None
    calls: Counter[tuple[str, Stage]] = field(default_factory=Counter)
    finished: Counter[str] = field(default_factory=Counter)

    def step(self, item: Item, stage: Stage) -> bool:
        """Run `stage` for `item`; True when the item ends here."""
        item.stage = stage
        name = item.spec.output_name
        self.calls[(name, stage)] += 1
        if self.stop_at == (name, stage) and self.engine is not None:
            self.engine.stop()  # as on SIGINT: from inside the pipeline, mid-stage
        fate = self.fates[name][self.run]
        if fate.stage is not stage:
            return False
        if fate.kind == "crash":
            raise RuntimeError(f"bug in {stage.value}")
        item.finish(fate.state(), f"{stage.value}: scripted {fate.kind}", transient=fate.transient)
        return True

    # the five paid stages, with the signatures the orchestrator calls

    async def upload(self, ctx: StageContext, item: Item) -> None:
        self.step(item, Stage.UPLOAD)

    async def detect(self, ctx: StageContext, item: Item) -> None:
        if not self.step(item, Stage.DETECT):
            item.detect_paid = True
            await ctx.save(item)

    async def submit(self, ctx: StageContext, item: Item) -> None:
        if not self.step(item, Stage.SUBMIT):
            item.submit_attempts += 1
            item.task_id = f"task-{item.spec.output_name}-{self.run}"
            await ctx.save(item)

    async def poll_once(self, ctx: StageContext, scheduler: PollScheduler, tracked: Tracked) -> Item | None:
        item = tracked.item
        self.step(item, Stage.POLL)  # a crash propagates with the task still in hand, as a real bug would
        scheduler.release(tracked)
        return item

    async def download(self, ctx: StageContext, item: Item) -> None:
        if self.step(item, Stage.DOWNLOAD):
            return
        target = ctx.config.output_dir / f"{item.spec.output_name}.mp4"
        await anyio.Path(target).write_bytes(b"\x00\x00\x00\x08free")
        item.output_path, item.output_size = str(target), 8
        item.finish(ItemState.SUCCEEDED)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original_finish = Orchestrator._finish

        async def counting_finish(orchestrator: Orchestrator, item: Item, results: Any) -> None:
            self.finished[item.spec.output_name] += 1
            await original_finish(orchestrator, item, results)

        with (
            mock.patch.multiple(
                "lpengine.orchestrator",
                upload=self.upload,
                detect=self.detect,
                submit=self.submit,
                poll_once=self.poll_once,
                download=self.download,
            ),
            mock.patch.object(Orchestrator, "_finish", counting_finish),
        ):
            yield


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(6):
        path = folder / f"item{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(path)
        paths.append(path)
    return paths


def batch_config(root: Path, images: list[Path], concurrency: ConcurrencyConfig) -> BatchConfig:
    photos = root / "photos"
    photos.mkdir()
    for image in images:
        shutil.copy(image, photos / image.name)
    return BatchConfig(
        inputs=InputsConfig(images=str(photos)),
        audio=str(VOICE),
        # never contacted (the paid stages are scripted); the speedup makes the poll scheduler's waits instant
        api=ApiConfig(base_url="http://127.0.0.1:9/api/v1", speedup=100_000),
        storage=FileServerStorageConfig(),
        concurrency=concurrency,
        output=OutputConfig(dir=root / "out"),
        # the scripted videos are 8-byte stand-ins; a worker process started per example to judge them would only
        # slow 40 examples down (analysis is tested in test_analysis_stage.py)
        analysis=AnalysisConfig(enabled=False),
        base_dir=root,
    )


@dataclass
class Stored:
    state: ItemState
    transient: bool


def expected(stored: Stored | None, fate: Fate, video_there: bool) -> tuple[ItemState, bool, bool]:
    """(state, transient, stages run) for one item in one run, by the resume rules of `prepare`."""
    if stored is not None and not stored.transient and (stored.state is not ItemState.SUCCEEDED or video_there):
        return stored.state, stored.transient, False
    return fate.state(), fate.transient, True


scenarios = st.integers(min_value=1, max_value=5).flatmap(
    lambda n: st.tuples(
        st.integers(min_value=1, max_value=4).flatmap(
            lambda runs: st.lists(st.lists(fates, min_size=runs, max_size=runs), min_size=n, max_size=n)
        ),
        st.lists(st.sets(st.integers(min_value=0, max_value=n - 1)), min_size=4, max_size=4),  # videos deleted
        st.none() | st.tuples(st.integers(0, 3), st.integers(0, n - 1), st.sampled_from(PAID_STAGES)),  # a stop
        st.builds(
            ConcurrencyConfig,
            upload=st.integers(1, 3),
            detect=st.integers(1, 3),
            submit=st.integers(1, 2),
            poll=st.integers(1, 3),
            download=st.integers(1, 3),
            submit_window=st.integers(1, 4),
            buffer=st.integers(0, 2),
        ),
    )
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios)
def test_every_item_ends_in_exactly_one_state_and_resumes_by_the_rules(
    images: list[Path], scenario: tuple[list[list[Fate]], list[set[int]], tuple[int, int, Stage] | None, Any]
) -> None:
    play(images, scenario)


def play(
    images: list[Path], scenario: tuple[list[list[Fate]], list[set[int]], tuple[int, int, Stage] | None, Any]
) -> None:
    plan, deletions, stop, concurrency = scenario
    n, runs = len(plan), len(plan[0])
    with tempfile.TemporaryDirectory() as tmp:
        config = batch_config(Path(tmp), images[:n], concurrency)
        names = [p.stem for p in images[:n]]
        script = Script(fates=dict(zip(names, plan, strict=True)))
        stored: dict[str, Stored | None] = dict.fromkeys(names)
        with script.installed():
            for run in range(runs):
                script.run = run
                script.calls.clear()
                script.finished.clear()
                for index in deletions[run]:
                    (config.output_dir / f"{names[index]}.mp4").unlink(missing_ok=True)
                video = {name: (config.output_dir / f"{name}.mp4").exists() for name in names}
                stopping = stop is not None and stop[0] == run
                script.stop_at = (names[stop[1]], stop[2]) if stop is not None and stopping else None
                report = anyio.run(_run, config, script, not stopping)
                results = {Path(r.input).stem: r for r in report.items}

                # exactly one terminal state per item, each finished at most once by the pipeline (a stopped run
                # reports the items it had started; the others were never planned)
                assert len(report.items) == len(results) and set(results) <= set(names)
                assert stopping or set(results) == set(names)
                assert all(isinstance(r.state, ItemState) for r in report.items)
                assert all(count == 1 for count in script.finished.values()), script.finished
                for name in names:
                    fate = plan[names.index(name)][run]
                    want_state, want_transient, stages_run = expected(stored[name], fate, video[name])
                    got = results.get(name)
                    ran = any(script.calls[(name, stage)] for stage in PAID_STAGES)
                    if stopping and (got is None or got.state is ItemState.CANCELLED):
                        assert got is None or got.reason  # says the run stopped
                        stored[name] = _read_store(config, name)  # whatever was committed before the stop
                        continue
                    assert got is not None
                    assert got.state is want_state, (run, name, fate, stored[name], got)
                    assert ran == stages_run, (run, name, fate, stored[name], script.calls)
                    if not stages_run:
                        assert got.resumed
                    if want_state is ItemState.SUCCEEDED:
                        assert got.output and Path(got.output).is_file()
                    elif stages_run:
                        assert got.reason, got
                    if fate.kind == "crash" and stages_run:
                        assert got.reason.startswith("internal error: RuntimeError")
                    stored[name] = Stored(want_state, want_transient)
                    assert _read_store(config, name) == stored[name]


async def _run(config: BatchConfig, script: Script, check_window: bool) -> Any:
    async with Engine(config, api_key="sk-state-machine") as engine:
        script.engine = engine
        report = await engine.run()
        if check_window:  # every slot of the submission window came back, whatever happened to the items
            window = engine.ctx.window
            for _ in range(config.concurrency.submit_window):
                assert not window.locked()  # a free slot (`acquire` below returns at once)
                await window.acquire()
            assert window.locked()  # and no more than the configured number
    return report


def _read_store(config: BatchConfig, name: str) -> Stored | None:
    async def read() -> Stored | None:
        async with SqliteStateStore(config.state_path) as store:
            rows = [(row.state, row.data) async for row in store.items() if row.output_name == name and row.state]
        return Stored(ItemState(rows[0][0]), bool(rows[0][1].get("transient"))) if rows else None

    return anyio.run(read)


# -- the resume rules of `prepare`, one stored record at a time ------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    state=st.sampled_from([None, *ItemState]),
    transient=st.booleans(),
    task_id=st.none() | st.just("task-1"),
    video=st.sampled_from(["there", "gone", "changed"]),
)
def test_prepare_keeps_final_outcomes_and_reopens_transient_ones(
    images: list[Path], state: ItemState | None, transient: bool, task_id: str | None, video: str
) -> None:
    """A stored record → what `prepare` leaves: final outcomes are returned as they are (no stage runs); transient
    ones and in-progress items are reopened with their progress (task id) kept; a succeeded item whose video is gone
    or changed is reopened."""

    async def scenario(root: Path) -> None:
        config = batch_config(root, images[:1], ConcurrencyConfig())
        spec = ItemSpec(image=str(root / "photos" / images[0].name), output_name="x", params=config.video)
        target = config.output_dir / "x.mp4"
        await anyio.Path(config.output_dir).mkdir(parents=True)
        async with Engine(config, api_key="sk-state-machine", lock=False) as engine:
            ctx = engine.ctx
            first = Item(spec=spec)
            await prepare(ctx, first)
            assert first.state is None and first.item_id
            first.task_id = task_id
            if state is not None:
                first.finish(state, "stored reason", transient=transient)
            if state is ItemState.SUCCEEDED:
                await anyio.Path(target).write_bytes(b"12345678")
                first.output_path, first.output_size = str(target), 8
                if video == "gone":
                    await anyio.Path(target).unlink()
                elif video == "changed":
                    await anyio.Path(target).write_bytes(b"123")
            await ctx.save(first)

            again = Item(spec=spec)
            await prepare(ctx, again)
        assert again.resumed and again.item_id == first.item_id
        assert again.task_id == task_id  # progress survives, whatever the outcome
        keeps = state is not None and not transient and (state is not ItemState.SUCCEEDED or video == "there")
        if keeps:
            assert again.state is state and again.reason == "stored reason"
        else:
            assert again.state is None and again.reason == "" and not again.transient

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(scenario, Path(tmp))


@given(state=st.sampled_from([None, *ItemState]), transient=st.booleans(), attempts=st.integers(0, 10))
def test_a_record_survives_the_store_format(state: ItemState | None, transient: bool, attempts: int) -> None:
    """`dump_item` → JSON → `restore_item` keeps the state, its transience and the paid-step markers."""
    import json

    from lpengine.config import VideoParams

    item = Item(spec=ItemSpec(image="a.jpg", output_name="a", params=VideoParams()))
    item.submit_attempts, item.task_id, item.submit_inflight_wall = attempts, "t", 12.5
    if state is not None:
        item.finish(state, "why", transient=transient)
    back = Item(spec=item.spec)
    restore_item(back, json.loads(json.dumps(dump_item(item))))
    assert (back.state, back.transient, back.reason) == (item.state, item.transient, item.reason)
    assert (back.submit_attempts, back.task_id, back.submit_inflight_wall) == (attempts, "t", 12.5)


def test_every_stage_has_a_failure_state_and_the_set_is_closed() -> None:
    """An unexpected error in any stage maps to that stage's own terminal state; the states are exactly the nine
    documented ones."""
    assert set(_STAGE_FAILURE) == set(Stage)
    assert {s.value for s in ItemState} == {
        "succeeded",
        "rejected_locally",
        "upload_failed",
        "detect_failed",
        "submit_failed",
        "task_failed",
        "download_failed",
        "timed_out",
        "cancelled",
    }
