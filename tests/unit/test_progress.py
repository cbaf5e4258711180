"""Progress counters from a synthetic event stream, and both renderers driven without timing guesses."""

from __future__ import annotations

import io
import json

import anyio
import pytest
import structlog
from rich.console import Console

from lpengine.models import ItemState, Stage
from lpengine.progress import JsonProgress, ProgressState, TtyProgress, reason_key
from lpengine.stages.context import ProgressEvent

NO_FACE = "InvalidImage.NoHumanFace: No human face detected."


def events() -> list[ProgressEvent]:
    """Six items through the pipeline the way the engine reports them (several events per stage, task ids)."""
    return [
        *(ProgressEvent(name, Stage.UPLOAD, None) for name in "abcdef"),
        ProgressEvent("f", Stage.UPLOAD, ItemState.REJECTED_LOCALLY, "/photos/f.jpg: is empty (0 bytes) — x"),
        *(ProgressEvent(name, Stage.DETECT, None) for name in "abcd"),
        ProgressEvent("e", Stage.DETECT, ItemState.DETECT_FAILED, "The face is too small.", cost_cny=0.004),
        *(ProgressEvent(name, Stage.SUBMIT, None, task_id=f"t-{name}") for name in "abc"),  # submit.accepted
        ProgressEvent("a", Stage.SUBMIT, None, task_id="t-a"),  # a poll warning: no progress
        ProgressEvent("a", Stage.DOWNLOAD, ItemState.SUCCEEDED, task_id="t-a", cost_cny=0.204),
        ProgressEvent("b", Stage.POLL, ItemState.TASK_FAILED, NO_FACE, task_id="t-b", cost_cny=0.004),
    ]


def fed(total: int = 0) -> ProgressState:
    state = ProgressState(total)
    for event in events():
        state.on_event(event)
    return state


def test_counts_from_an_event_sequence() -> None:
    snap = fed(total=10).snapshot()
    assert (snap["total"], snap["seen"], snap["finished"]) == (10, 6, 4)
    assert snap["states"] == {"succeeded": 1, "rejected_locally": 1, "detect_failed": 1, "task_failed": 1}
    assert snap["failures"] == 3
    assert snap["cost_cny"] == pytest.approx(0.212)
    stages = snap["stages"]
    # c is polling (it has a task id), d waits at detect, the four others are finished
    assert stages["upload"] == {"reached": 6, "active": 0, "done": 6}
    assert stages["detect"] == {"reached": 5, "active": 1, "done": 5}
    assert stages["submit"] == {"reached": 3, "active": 0, "done": 5}
    assert stages["poll"] == {"reached": 3, "active": 1, "done": 4}
    assert stages["download"] == {"reached": 1, "active": 0, "done": 4}
    reasons = {entry["reason"]: entry["count"] for entry in snap["top_reasons"]}
    assert reasons == {
        "rejected_locally: is empty (N bytes)": 1,
        "detect_failed: The face is too small.": 1,
        "task_failed: InvalidImage.NoHumanFace": 1,
    }
    json.dumps(snap)


def test_total_never_below_items_seen_and_refinish_replaces() -> None:
    state = fed(total=2)
    state.on_event(ProgressEvent("b", Stage.POLL, ItemState.CANCELLED, "the run stopped", task_id="t-b"))
    snap = state.snapshot()
    assert snap["total"] == 6
    assert snap["states"]["cancelled"] == 1 and "task_failed" not in snap["states"]
    assert snap["cost_cny"] == pytest.approx(0.208)


@pytest.mark.parametrize(
    ("state", "reason", "key"),
    [
        (ItemState.TASK_FAILED, NO_FACE, "task_failed: InvalidImage.NoHumanFace"),
        (
            ItemState.SUBMIT_FAILED,
            "the service refused the task: InvalidParameter: bad",
            "submit_failed: InvalidParameter",
        ),
        (
            ItemState.REJECTED_LOCALLY,
            "/a b/c.jpg: is empty (0 bytes) — replace it",
            "rejected_locally: is empty (N bytes)",
        ),
        (
            ItemState.REJECTED_LOCALLY,
            "list.csv:12: duplicate of line 3; remove one",
            "rejected_locally: duplicate of line N",
        ),
        (ItemState.CANCELLED, "", "cancelled"),
    ],
)
def test_reason_key_groups_similar_failures(state: ItemState, reason: str, key: str) -> None:
    assert reason_key(state, reason) == key


def test_json_progress_emit_once_writes_one_parseable_line() -> None:
    stream = io.StringIO()
    JsonProgress(fed(total=10), stream).emit_once()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "progress" and record["finished"] == 4 and record["total"] == 10


class _LineCounter(io.StringIO):
    """Sets an event once `wanted` lines were written, so the test waits for output, not for time."""

    def __init__(self, wanted: int) -> None:
        super().__init__()
        self.wanted = wanted
        self.enough = anyio.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        if self.getvalue().count("\n") >= self.wanted:
            self.enough.set()
        return written


@pytest.mark.anyio
async def test_json_progress_run_repeats_until_cancelled() -> None:
    stream = _LineCounter(wanted=3)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(JsonProgress(fed(), stream).run, 0.001)
            await stream.enough.wait()
            tg.cancel_scope.cancel()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["event"] == "progress" for line in lines)


def test_tty_progress_renders_stages_and_routes_logs_above_the_bars() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    state = ProgressState()
    with TtyProgress(state, console=console) as progress:
        progress.set_total(10)
        for event in events():
            state.on_event(event)
        log = structlog.wrap_logger(
            structlog.PrintLogger(progress.log_stream), processors=[structlog.dev.ConsoleRenderer(colors=False)]
        )
        log.info("batch.started", items=10)
    text = out.getvalue()
    for stage in ("upload", "detect", "submit", "poll", "download"):
        assert stage in text
    assert "4/10" in text and "this run ≈ 0.212 CNY" in text
    assert "task_failed: InvalidImage.NoHumanFace" in text
    # the log line arrives whole, on a line of its own, not spliced into a bar
    assert any(line.rstrip().endswith("items=10") and "batch.started" in line for line in text.splitlines())
