"""The console's batches: folders on disk, a queue that runs them one at a time, and views read from the state store.

Each batch is a folder in the workspace with its own `batch.yaml`, inputs and output folder, so it is an ordinary
lpengine batch: `lpengine run <workspace>/<id>/batch.yaml` resumes one the console started, and the console shows
(and can resume) what a CLI run of that file did. Everything shown comes from the batch's state store and
`console.json` (name, wanted state, estimate), so the history survives a restart of the console.

Batches run one after another through one queue. The account runs one LivePortrait task at a time and its quotas
are per account: a second batch running beside the first would finish no sooner, and two engines would each pace
themselves to the whole quota. One at a time, two batches together can never exceed it.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import yaml

from lpengine.config import BatchConfig, PricingConfig, VideoParams, load_config
from lpengine.engine import REDO_BAD, DryRunReport, Engine
from lpengine.errors import BatchLockedError, ConfigError, LPEngineError
from lpengine.models import ItemState, RunReport
from lpengine.progress import ProgressState
from lpengine.reports import result_from_state
from lpengine.stages.context import ProgressEvent
from lpengine.state import SqliteStateStore
from lpengine.state.base import StoredItem
from lpengine.web.uploads import Intake

__all__ = ["BATCH_ID", "STATES", "BatchBusy", "BatchManager", "EngineOpener"]

BATCH_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
STATES = ("queued", "running", "paused", "done", "failed", "cancelled")
"""`done`: the run ended with every item in a final state (some may have failed: see the counts); `failed`: the
batch itself stopped (key refused, quota, config, another run holding it), with `error` saying why."""
_COPIED_SECTIONS = ("api", "storage", "concurrency", "pricing", "limits", "logging")
_LOG_TAIL_BYTES = 16 * 1024

EngineOpener = Callable[[BatchConfig, Callable[[ProgressEvent], None]], Engine]
"""Makes the engine for a batch's config (the console decides the key and, in demo mode, the shared emulator)."""


class BatchBusy(Exception):
    """The batch is queued or running: what was asked needs it stopped."""


@dataclass
class _Live:
    """The running batch's counters, fed by the engine's events: a few integer updates per transition."""

    progress: ProgressState = field(default_factory=ProgressState)
    version: int = 0

    def on_event(self, event: ProgressEvent) -> None:
        self.progress.on_event(event)
        self.version += 1


@dataclass
class _Scan:
    """One read of a batch's state store, kept until the store's files change."""

    stamp: tuple[int, ...]
    rows: list[dict[str, Any]]
    by_state: dict[str, int]
    spent: float


class BatchManager:
    def __init__(self, workspace: Path, base_config: Path, open_engine: EngineOpener) -> None:
        self.workspace = workspace
        self.base_config = base_config
        self._open_engine = open_engine
        self._queue: list[str] = []
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self._running: str | None = None
        self._engine: Engine | None = None
        self._stop_as: str | None = None
        self._live: _Live | None = None
        self._scans: dict[str, _Scan] = {}
        # Per-batch caches: an SSE tick must not parse YAML, JSON or list a folder of 10 000 videos, ten times over.
        self._metas: dict[str, dict[str, Any]] = {}
        self._configs: dict[str, BatchConfig] = {}
        self._logs: dict[str, tuple[Path, int, list[str]]] = {}
        self._live_summary: tuple[tuple[str, int, str], dict[str, Any]] | None = None
        self._redo: dict[str, str] = {}
        """Batches queued by Redo bad, with the selection (`DryRunReport.redo_digest`) whose cost was agreed to."""
        base = load_config(base_config)
        self.pricing = base.pricing
        self.video_defaults = base.video
        self.presets: dict[str, dict[str, Any]] = {
            **{t: {"template_id": t} for t in ("normal", "calm", "active")},
            **base.preset_context.values,
        }
        """The service's three motion templates, then every named preset the base config sees (docs/presets.md);
        a batch's parameters are resolved from them when it is created and written out in full."""

    # -- folders and metadata ---------------------------------------------------------------------------------

    def folder(self, bid: str) -> Path:
        if not BATCH_ID.match(bid):
            raise KeyError(bid)
        path = self.workspace / bid
        if not (path / "console.json").is_file():
            raise KeyError(bid)
        return path

    def meta(self, bid: str) -> dict[str, Any]:
        """The batch's console record; only this process writes it, so it is read from disk once."""
        if (data := self._metas.get(bid)) is None:
            data = json.loads((self.folder(bid) / "console.json").read_text(encoding="utf-8"))
            self._metas[bid] = data
        return data

    def _save_meta(self, bid: str, **changes: Any) -> None:
        path = self.workspace / bid / "console.json"
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        data.update(changes)
        self._metas[bid] = data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        self._notify()

    def ids(self) -> list[str]:
        if not self.workspace.is_dir():
            return []
        found = [p.name for p in self.workspace.iterdir() if BATCH_ID.match(p.name) and (p / "console.json").is_file()]
        return sorted(found, reverse=True)

    def config(self, bid: str) -> BatchConfig:
        if (cfg := self._configs.get(bid)) is None:
            cfg = self._configs[bid] = load_config(self.folder(bid) / "batch.yaml")
        return cfg

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self, timeout: float) -> None:
        """Until a batch changes state, or `timeout`: SSE streams wake on this, never per item."""
        with anyio.move_on_after(timeout):
            await self._changed.wait()

    # -- creating and controlling -----------------------------------------------------------------------------

    def create(self, intake: Intake, params: VideoParams, preset: str | None, estimate: dict[str, Any]) -> str:
        """Turn a checked upload into a batch folder with its own batch.yaml, and queue it."""
        bid = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder = self.workspace / bid
        raw = yaml.safe_load(self.base_config.read_text(encoding="utf-8")) or {}
        doc: dict[str, Any] = {key: raw[key] for key in _COPIED_SECTIONS if key in raw}
        state = {k: v for k, v in (raw.get("state") or {}).items() if k != "path"}  # never share a state store
        if state:
            doc["state"] = state
        images = str(intake.server_folder) if intake.server_folder else "images"
        doc.update(inputs={"images": images}, video=params.model_dump(), output={"dir": "output"})
        if intake.audio is not None:
            doc["audio"] = intake.audio.name
        self.workspace.mkdir(parents=True, exist_ok=True)
        os.replace(intake.folder, folder)
        (folder / "batch.yaml").write_text(
            "# Written by `lpengine serve`; `lpengine run` on this file resumes the batch.\n"
            + yaml.safe_dump(doc, allow_unicode=True, sort_keys=False),
            encoding="utf-8",
        )
        try:
            load_config(folder / "batch.yaml")
        except ConfigError:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            raise
        name = intake.server_folder.name if intake.server_folder else f"{estimate['images']} photo(s)"
        self._save_meta(
            bid,
            id=bid,
            name=name,
            created=time.time(),
            state="queued",
            count=estimate["images"],
            preset=preset,
            params=params.model_dump(),
            estimate=estimate,
            error=None,
        )
        self._enqueue(bid)
        return bid

    def _enqueue(self, bid: str) -> None:
        if bid not in self._queue and bid != self._running:
            self._queue.append(bid)
            self._wake.set()

    def cancel(self, bid: str) -> str:
        """Stop the batch and withdraw its tasks still queued at the service (never billed)."""
        return self._stop(bid, "cancelled", cancel_pending=True)

    def pause(self, bid: str) -> str:
        """Stop taking work; tasks already at the service are kept and polled again on resume."""
        return self._stop(bid, "paused", cancel_pending=False)

    def _stop(self, bid: str, as_state: str, *, cancel_pending: bool) -> str:
        state = self.meta(bid)["state"]
        if bid == self._running:
            self._stop_as = as_state
            if self._engine is not None:
                self._engine.stop(cancel_pending=cancel_pending)
            return "running"
        if state in ("queued", "paused") or (as_state == "cancelled" and state == "failed"):
            if bid in self._queue:
                self._queue.remove(bid)
            self._redo.pop(bid, None)  # a Redo bad still queued is withdrawn too: Resume alone never pays again
            self._save_meta(bid, state=as_state)
            return as_state
        return str(state)

    def resume(self, bid: str) -> str:
        """Queue the batch again: the engine's resume rules decide what is left to do, and nothing is paid twice."""
        if self.meta(bid)["state"] != "running":
            self._save_meta(bid, state="queued", error=None)
            self._enqueue(bid)
        return str(self.meta(bid)["state"])

    retry = resume
    """Retry failed: a re-run retries every temporary and retryable failure (within `state.max_submit_attempts`)
    and keeps final answers, which would fail again and be paid again (docs/cron.md)."""

    async def redo_estimate(self, bid: str) -> DryRunReport:
        """What Redo bad would make again and pay: the engine's own dry run, as `lpengine run --redo bad` prints it.
        Nothing is locked, sent or changed."""
        async with Engine.estimating(self.config(bid)) as engine:
            return await engine.dry_run(redo=REDO_BAD)

    async def redo_bad(self, bid: str, confirm: str) -> tuple[bool, DryRunReport]:
        """Queue the batch to make its bad videos again, if `confirm` names the selection priced now; else
        (False, the estimate as it is now), nothing queued. The run checks the selection again under its lock."""
        if self.meta(bid)["state"] in ("queued", "running"):
            raise BatchBusy("the batch is queued or running: Redo bad once it has stopped")
        estimate = await self.redo_estimate(bid)
        if not estimate.redo or estimate.redo_digest != confirm:
            return False, estimate
        self._redo[bid] = confirm
        self.resume(bid)
        return True, estimate

    # -- the queue --------------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run queued batches one at a time, until cancelled. A batch left running or queued by a console that
        stopped is shown paused: starting paid work again is the user's choice, not a side effect of a restart."""
        for bid in self.ids():
            if self.meta(bid)["state"] in ("queued", "running"):
                self._save_meta(bid, state="paused", error="the console stopped; Resume to continue")
        while True:
            while not self._queue:
                await self._wake.wait()
                self._wake = anyio.Event()
            bid = self._queue.pop(0)
            await self._run(bid)

    async def _run(self, bid: str) -> None:
        self._running, self._stop_as, self._live = bid, None, _Live()
        self._configs.pop(bid, None)  # batch.yaml may have been edited for this run
        self._logs.pop(bid, None)  # each run starts a new log file
        self._save_meta(bid, state="running", started=time.time(), error=None)
        report: RunReport | None = None
        error: str | None = None
        try:
            engine = self._open_engine(self.config(bid), self._live.on_event)
            async with engine:
                self._engine = engine
                if (stop_as := self._stop_requested()) is not None:
                    engine.stop(cancel_pending=stop_as == "cancelled")
                live = self._live
                redo: tuple[str, ...] = ()
                if (confirmed := self._redo.pop(bid, None)) is not None:
                    # the selection again, under the run's lock: only what was priced and agreed to is paid for
                    estimate = await engine.dry_run(redo=REDO_BAD)
                    if estimate.redo_digest != confirmed:
                        raise LPEngineError(
                            "the videos judged bad changed since their cost was shown; nothing was redone: "
                            "press Redo bad again"
                        )
                    redo = estimate.redo
                report = await engine.run(on_planned=live.progress.set_total, redo=redo)
        except BatchLockedError:
            error = "another run of this batch (the CLI?) holds it; its progress shows here as it goes"
        except ConfigError as exc:
            error = "; ".join(exc.problems)
        except LPEngineError as exc:
            error = str(exc)
        finally:
            self._engine = None
            self._running = None
            self._live = None
            if (stop_as := self._stop_requested()) is not None:
                state = stop_as
            elif report is not None and error is None:
                state = "done"  # every item reached its final state; the counts say how many failed
            else:
                state = "failed"
            self._scans.pop(bid, None)
            self._save_meta(bid, state=state, error=error, finished=time.time())

    def _stop_requested(self) -> str | None:
        """The state a stop asked for while the batch ran (set from request handlers, read by the runner)."""
        return self._stop_as

    # -- views ------------------------------------------------------------------------------------------------

    async def _scan(self, bid: str) -> _Scan:
        """The batch's items from its state store; re-read only when the store's files changed."""
        state_path = self.config(bid).state_path
        stamp: tuple[int, ...] = ()
        for path in (state_path, state_path.with_name(state_path.name + "-wal")):
            try:
                st = path.stat()
                stamp += (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp += (0, 0)
        cached = self._scans.get(bid)
        if cached is not None and cached.stamp == stamp:
            return cached
        stored: list[StoredItem] = []
        if state_path.exists():
            async with SqliteStateStore(state_path) as store:
                stored = [row async for row in store.items()]
        # Turning 10 000 records into rows is ~1 s of CPU on a cold page: in a thread, other requests and the
        # event streams are served between its GIL switches instead of waiting for the whole page.
        rows, by_state, spent = await anyio.to_thread.run_sync(_rows, bid, stored, self.pricing)
        scan = _Scan(stamp, rows, by_state, round(spent, 6))
        self._scans[bid] = scan
        return scan

    async def summary(
        self, bid: str, *, page: int = 1, per_page: int = 100, needs_review: bool = False, items: bool = True
    ) -> dict[str, Any]:
        """The batch as the API and pages show it; `items` paginated (a 10 000-item batch answers one page)."""
        meta = self.meta(bid)
        live = self._live if bid == self._running else None
        memo_key = (bid, live.version, meta["state"]) if live is not None and not items else None
        if memo_key is not None and self._live_summary is not None and self._live_summary[0] == memo_key:
            return self._live_summary[1]  # every listener of a tick gets the one summary
        snapshot = live.progress.snapshot() if live is not None else None
        scan: _Scan | None = None
        if snapshot is not None and not items:
            # A live stream's tick reads the counters only: ten listeners must not re-read the store.
            final, spent, known = dict(snapshot["states"]), float(snapshot["cost_cny"]), int(snapshot["total"])
        else:
            scan = await self._scan(bid)
            final = {k: v for k, v in scan.by_state.items() if k != "in_progress"}
            spent, known = scan.spent, len(scan.rows)
        total = max(int(meta.get("count") or 0), known, snapshot["total"] if snapshot else 0)
        finished = sum(final.values())
        # What is left, at the estimate's price per item: a finished or stopped batch will not spend more.
        estimate = float((meta.get("estimate") or {}).get("cost_cny") or 0.0)
        per_item = estimate / max(int(meta.get("count") or 0), 1)
        open_ = meta["state"] in ("queued", "running", "paused")
        counts: dict[str, Any] = {
            "total": total,
            "finished": finished,
            "succeeded": final.get("succeeded", 0),
            "failed": finished - final.get("succeeded", 0),
            "in_progress": total - finished,
            "by_state": final,
            "stages": snapshot["stages"] if snapshot else None,
        }
        eta = None
        if snapshot and snapshot["finished"] and total > finished:
            rate = snapshot["finished"] / max(snapshot["elapsed_s"], 1e-3)
            eta = round((total - finished) / rate, 1)
        out: dict[str, Any] = {
            "id": bid,
            "name": meta.get("name"),
            "state": meta["state"],
            "error": meta.get("error"),
            "created": meta.get("created"),
            "params": meta.get("params"),
            "counts": counts,
            "cost": {
                "spent_cny": round(spent, 6),
                "estimate_cny": estimate,
                "projected_remaining_cny": round(per_item * (total - finished), 4) if open_ else 0.0,
            },
            "service_queue": snapshot["stages"]["poll"]["active"] if snapshot else 0,
            "eta_s": eta,
            "version": [live.version if live else 0, finished, meta["state"]],
        }
        if memo_key is not None:
            self._live_summary = (memo_key, out)
        if scan is not None and items:
            rows = [r for r in scan.rows if _needs_review(r)] if needs_review else scan.rows
            pages = max(1, math.ceil(len(rows) / per_page))
            page = min(max(page, 1), pages)
            out.update(items=rows[(page - 1) * per_page : page * per_page], page=page, pages=pages, matching=len(rows))
        return out

    def log_tail(self, bid: str, lines: int = 30) -> list[str]:
        """The last lines of the newest JSONL log, as short text (already redacted by the engine's log).

        The log's name is looked up once per run (the output folder may hold thousands of videos), and its tail
        is read again only when the file grew."""
        cached = self._logs.get(bid)
        if cached is None:
            out_dir = self.config(bid).output_dir
            logs = sorted(out_dir.glob("lpengine-*.jsonl")) if out_dir.is_dir() else []
            if not logs:
                return []
            cached = (logs[-1], -1, [])
        path, seen, shown = cached
        try:
            size = path.stat().st_size
        except OSError:
            self._logs.pop(bid, None)
            return []
        if size != seen:
            shown = self._read_tail(path, size)
            self._logs[bid] = (path, size, shown)
        return shown[-lines:]

    @staticmethod
    def _read_tail(path: Path, size: int, lines: int = 30) -> list[str]:
        with path.open("rb") as fh:
            fh.seek(max(0, size - _LOG_TAIL_BYTES))
            raw = fh.read().splitlines()[-lines:]
        shown = []
        for line in raw:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            at = time.strftime("%H:%M:%S", time.localtime(entry.pop("ts", 0)))
            level, event = entry.pop("level", ""), entry.pop("event", "")
            details = " ".join(f"{k}={v}" for k, v in entry.items() if v not in (None, "", [], {}))
            shown.append(f"{at} {level:<7} {event} {details}"[:300])
        return shown

    def video_path(self, bid: str, name: str) -> Path | None:
        """A result MP4 of this batch by file name, or None: nothing outside its output folder is ever served."""
        out_dir = self.config(bid).output_dir.resolve()
        if "/" in name or "\\" in name or not name.endswith(".mp4"):
            return None
        path = (out_dir / name).resolve()
        if path.parent != out_dir or not path.is_file():
            return None
        return path


def _rows(
    bid: str, stored: list[StoredItem], pricing: PricingConfig
) -> tuple[list[dict[str, Any]], dict[str, int], float]:
    """The items as the pages list them (sorted by name), their count per status and what they cost."""
    rows: list[dict[str, Any]] = []
    by_state: dict[str, int] = {}
    spent = 0.0
    for row in stored:
        data = row.data
        result = result_from_state(data, pricing.detect_per_image, pricing.video_per_second)
        final = bool(row.state) and not data.get("transient")
        status = result.state.value if final else "in_progress"
        by_state[status] = by_state.get(status, 0) + 1
        spent += result.cost_cny
        video = result.output if result.state is ItemState.SUCCEEDED else None
        # The result analysis' judgement, where the engine ran it (`analysis` in the item's record).
        judged: dict[str, Any] = analysis if isinstance(analysis := data.get("analysis"), dict) else {}
        # os.path, not Path: building 10 000 Path objects was most of a cold 10k-item page
        rows.append(
            {
                "name": row.output_name or os.path.basename(result.input),
                "status": status,
                "stage": row.stage,
                "error": _plain(result.reason, result.input) if status != "succeeded" else "",
                "video_url": f"/api/batches/{bid}/videos/{os.path.basename(video)}" if video else None,
                "verdict": judged.get("verdict"),
                "flags": [str(f) for f in judged.get("flags") or []],
                "score": judged.get("score"),
            }
        )
    rows.sort(key=lambda r: r["name"])
    return rows, by_state, spent


def _needs_review(row: dict[str, Any]) -> bool:
    """Finished videos the analysis did not pass, and failed items: what a person should look at."""
    if row["status"] == "succeeded":
        return bool(row["verdict"] not in (None, "ok") or row["flags"])
    return bool(row["status"] != "in_progress")


def _plain(reason: str, image: str) -> str:
    """The reason with the image's full path shortened to its name (the page already says which batch)."""
    return reason.replace(image, os.path.basename(image)) if image else reason
