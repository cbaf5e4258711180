"""Live progress for a running batch: one counter object fed by `Engine(on_event=...)`, two ways to show it.

`ProgressState.on_event` runs on the event loop for every transition of every item (hundreds of thousands in a
large batch), so it only moves counters. Drawing happens elsewhere: `TtyProgress` renders in rich's refresh thread,
`JsonProgress` in a periodic task. A lock keeps the counters consistent between the two threads; it is held for a
few integer updates or one copy, never while rendering.

Wiring in a CLI::

    state = ProgressState()
    engine = Engine(config, on_event=state.on_event)
    if sys.stderr.isatty():
        with TtyProgress(state) as progress:
            logs.configure(stream=progress.log_stream)  # log lines print above the bars instead of through them
            state.set_total(planned)
            report = await engine.run()
    else:  # cron, CI: one JSON line every 30 s on stderr
        async with anyio.create_task_group() as tg:
            tg.start_soon(JsonProgress(state, sys.stderr).run, 30.0)
            report = await engine.run()
            tg.cancel_scope.cancel()
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TextIO, cast

import anyio
from rich.console import Console, Group, RenderableType
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from lpengine.models import ItemState, Stage
from lpengine.stages.context import ProgressEvent

__all__ = ["JsonProgress", "ProgressState", "TtyProgress", "failure_code", "reason_key"]

_ORDER = tuple(Stage)
_INDEX = {stage: i for i, stage in enumerate(_ORDER)}
SHOWN_STAGES = (Stage.UPLOAD, Stage.DETECT, Stage.SUBMIT, Stage.POLL, Stage.DOWNLOAD)
"""The stages that get a bar; PLAN is instantaneous and has nothing to watch."""
TOP_REASONS = 5
MAX_REASON_KEYS = 1000
"""Distinct failure reasons tracked before the rest are folded into "other", so memory stays bounded even when
every reason is unique."""

STATE_STYLES: dict[ItemState, str] = {
    ItemState.SUCCEEDED: "green",
    ItemState.REJECTED_LOCALLY: "yellow",
    ItemState.UPLOAD_FAILED: "red",
    ItemState.DETECT_FAILED: "magenta",
    ItemState.SUBMIT_FAILED: "red",
    ItemState.TASK_FAILED: "red",
    ItemState.DOWNLOAD_FAILED: "red",
    ItemState.TIMED_OUT: "dark_orange",
    ItemState.CANCELLED: "bright_black",
}

_CODE = re.compile(r"(?:^|: )([A-Z][A-Za-z]*(?:\.[A-Za-z]+)*): ")
_SOURCE_PREFIX = re.compile(r"^(?:[^:]*[/\\][^:]*|[^:\s]+:\d+): ")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def failure_code(reason: str) -> str | None:
    """The service (or exception) code in a reason written as `… <Code>: <message>`, the shape every stage uses,
    so that reasons differing only in their message or file name group together."""
    match = _CODE.search(reason)
    return match.group(1) if match else None


def reason_key(state: ItemState, reason: str) -> str:
    """A short, low-cardinality label for a failure: the code when there is one, otherwise the reason without
    its leading file/line reference and with numbers blanked, cut before the advice part."""
    code = failure_code(reason)
    if code is None:
        text = _SOURCE_PREFIX.sub("", reason, count=1)
        text = re.split(r" — |; ", text, maxsplit=1)[0]
        code = _NUMBER.sub("N", text)[:60].strip()
    return f"{state.value}: {code}" if code else state.value


@dataclass(frozen=True, slots=True)
class _Outcome:
    state: ItemState
    reason: str
    cost_cny: float


class ProgressState:
    """Counters over the event stream, shared by the renderers.

    Per stage: `reached` counts items seen at that stage or later; `active` counts unfinished items whose furthest
    stage is that one; `done` counts items past it, finished ones included (an item rejected before upload is done
    with every stage, so every bar ends at the total).
    """

    def __init__(self, total: int = 0) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._total = total
        self._furthest: dict[str, int] = {}
        self._outcomes: dict[str, _Outcome] = {}
        self._reached = [0] * len(_ORDER)
        self._active = [0] * len(_ORDER)
        self._states = dict.fromkeys(ItemState, 0)
        self._reasons: dict[str, int] = {}
        self._cost = 0.0

    def set_total(self, n: int) -> None:
        """Items planned so far; the engine plans lazily, so callers may raise it as planning advances."""
        with self._lock:
            self._total = n

    def on_event(self, event: ProgressEvent) -> None:
        index = _INDEX[event.stage]
        if event.stage is Stage.SUBMIT and event.task_id:
            # The engine says nothing when polling starts; a task id is the sign the submit is behind the item.
            index = _INDEX[Stage.POLL]
        with self._lock:
            before = self._furthest.get(event.item, -1)
            after = max(before, index)
            for i in range(before + 1, after + 1):
                self._reached[i] += 1
            self._furthest[event.item] = after
            previous = self._outcomes.pop(event.item, None)
            if previous is not None:
                self._count(previous, -1)
            elif before >= 0:
                self._active[before] -= 1
            if event.state is None:
                self._active[after] += 1
            else:
                key = "" if event.state is ItemState.SUCCEEDED else reason_key(event.state, event.reason)
                outcome = _Outcome(event.state, key, event.cost_cny)
                self._outcomes[event.item] = outcome
                self._count(outcome, +1)

    def _count(self, outcome: _Outcome, sign: int) -> None:
        self._states[outcome.state] += sign
        self._cost += sign * outcome.cost_cny
        if not outcome.reason:
            return
        key = outcome.reason
        if key not in self._reasons and len(self._reasons) >= MAX_REASON_KEYS:
            key = "other"
        count = self._reasons.get(key, 0) + sign
        if count > 0:
            self._reasons[key] = count
        else:
            self._reasons.pop(key, None)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            seen = len(self._furthest)
            finished = len(self._outcomes)
            reached = list(self._reached)
            active = list(self._active)
            states = {state.value: n for state, n in self._states.items() if n}
            reasons = self._reasons.copy()
            cost = self._cost
            total = self._total
        stages = {}
        for stage in SHOWN_STAGES:
            i = _INDEX[stage]
            stages[stage.value] = {"reached": reached[i], "active": active[i], "done": finished + sum(active[i + 1 :])}
        top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS]
        return {
            "total": max(total, seen),
            "seen": seen,
            "finished": finished,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "stages": stages,
            "states": states,
            "failures": sum(n for state, n in states.items() if state != ItemState.SUCCEEDED),
            "top_reasons": [{"reason": reason, "count": n} for reason, n in top],
            "cost_cny": round(cost, 6),
        }


class _RateColumn(ProgressColumn):
    """Items per minute below one per second: a LivePortrait task takes minutes, so "0.0/s" would say nothing."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        if not speed:
            return Text("–/min", style="progress.data.speed")
        shown = f"{speed:.1f}/s" if speed >= 1 else f"{speed * 60:.1f}/min"
        return Text(shown, style="progress.data.speed")


class TtyProgress:
    """Bars per stage on a terminal (stderr by default), with failures by reason and spend so far underneath.

    Log lines must reach the terminal through `console.print`, or they tear the bars; hand `log_stream` to the
    logging setup. Stray writes to `sys.stderr` (warnings, third-party prints) are redirected by rich while the
    display is live. stdout is left alone: it may be piped to a file and must not end up on the terminal.
    """

    def __init__(self, state: ProgressState, *, console: Console | None = None, refresh_per_second: float = 4) -> None:
        self.state = state
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TextColumn("[cyan]{task.fields[active]:>5} active"),
            _RateColumn(),
            TimeRemainingColumn(),
            console=self.console,
            auto_refresh=False,
            expand=True,
        )
        self._tasks = {
            stage: self._progress.add_task(stage.value, total=None, active=0, start=True) for stage in SHOWN_STAGES
        }
        self._live = Live(
            get_renderable=self._render,
            console=self.console,
            refresh_per_second=refresh_per_second,
            redirect_stdout=False,
            redirect_stderr=True,
            transient=False,
        )
        # TextIOBase at runtime; typeshed's TextIO is nominal, hence the cast.
        self.log_stream = cast(TextIO, FileProxy(self.console, self.console.file))
        """A text stream that prints through the console, for `logs.configure(stream=...)`."""

    def set_total(self, n: int) -> None:
        self.state.set_total(n)

    def __enter__(self) -> Self:
        self._live.start(refresh=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.log_stream.flush()
        self._live.stop()

    def _render(self) -> RenderableType:
        snap = self.state.snapshot()
        total = snap["total"] or None
        for stage, task_id in self._tasks.items():
            counts = snap["stages"][stage.value]
            self._progress.update(task_id, completed=counts["done"], total=total, active=counts["active"])
        return Group(self._progress, _summary_line(snap), *_reason_lines(snap))


def _summary_line(snap: dict[str, Any]) -> Text:
    line = Text.assemble(("finished ", "bold"), f"{snap['finished']}/{snap['total']}")
    for state in ItemState:
        n = snap["states"].get(state.value)
        if n:
            line.append("  ")
            line.append(f"{state.value} {n}", style=STATE_STYLES[state])
    line.append(f"   this run ≈ {snap['cost_cny']:.3f} CNY", style="bold")
    return line


def _reason_lines(snap: dict[str, Any]) -> Iterator[Text]:
    for entry in snap["top_reasons"]:
        yield Text.assemble(("  ✗ ", "red"), (f"{entry['count']:>5}  ", "bold"), entry["reason"])


class JsonProgress:
    """One JSON line per interval for logs nobody watches live (cron, CI), so a stuck batch is visible in them."""

    def __init__(self, state: ProgressState, stream: TextIO) -> None:
        self.state = state
        self.stream = stream

    def emit_once(self) -> None:
        line = json.dumps({"event": "progress", "ts": round(time.time(), 3), **self.state.snapshot()})
        self.stream.write(line + "\n")
        self.stream.flush()

    async def run(self, interval: float = 30.0) -> None:
        """Forever, until cancelled; the caller cancels it when the run ends."""
        while True:
            await anyio.sleep(interval)
            self.emit_once()
