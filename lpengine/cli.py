"""`lpengine` / `python -m lpengine`: the only place that owns the event loop, signals, logging setup and exit codes.

Exit codes: 0 all items succeeded · 1 some items failed · 2 bad config, input or environment · 3 another run of the
same batch holds the lock · 130 interrupted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import stamina
import typer

from lpengine import logs
from lpengine.config import BatchConfig, Secrets, load_config, load_secrets
from lpengine.engine import REDO_BAD, DryRunReport, Engine
from lpengine.errors import AuthError, BatchLockedError, ConfigError, LPEngineError, QuotaError, StorageError
from lpengine.models import ItemSpec, ItemState, RunReport
from lpengine.plan import PlanProblem, empty_hint, iter_plan
from lpengine.preset_commands import app as presets_app
from lpengine.progress import JsonProgress, ProgressState, TtyProgress
from lpengine.state import open_store, state_url, state_where, upgrade_schema

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    name="lpengine",
    help="Batch talking-portrait videos with DashScope LivePortrait.\n\n"
    "Examples:\n\n  lpengine demo\n\n  lpengine run configs/batch.yaml --dry-run\n\n"
    "  lpengine run configs/batch.yaml --limit 10\n\n  lpengine status configs/batch.yaml",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

app.add_typer(presets_app, name="presets")

T = TypeVar("T")

ConfigArg = Annotated[Path, typer.Argument(help="Batch YAML file (see configs/batch.yaml).")]
LogFormat = Annotated[str | None, typer.Option("--log-format", help="stderr log format: console or json.")]
LogLevel = Annotated[str | None, typer.Option("--log-level", help="debug, info, warning, error.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", help="Override output.dir.")]
PresetsOpt = Annotated[
    Path | None, typer.Option("--presets", help="A folder of preset files; default: presets/ beside the config.")
]


def _fail(lines: list[str], code: int) -> typer.Exit:
    for line in lines:
        typer.echo(f"error: {line}", err=True)
    return typer.Exit(code)


def _load(path: Path, output: Path | None = None, presets: Path | None = None) -> BatchConfig:
    overrides: dict[str, Any] = {}
    if output is not None:
        overrides["output.dir"] = str(output.absolute())
    if presets is not None:
        overrides["presets_dir"] = str(presets.absolute())
    try:
        return load_config(path, overrides=overrides)
    except ConfigError as exc:
        raise _fail(exc.problems, EXIT_CONFIG) from None


def _setup_logging(fmt: str | None, level: str | None, cfg: BatchConfig | None = None) -> tuple[str, str]:
    """Flags over the config's `logging:` section. Default level warning: on a TTY the progress bars show the rest,
    and under cron only warnings and the final JSON summary are printed."""
    fmt = fmt or (cfg.logging.format if cfg else "console")
    level = level or (cfg.logging.level if cfg and cfg.logging.level else "warning")
    if fmt not in ("console", "json"):
        raise _fail([f"--log-format: {fmt!r} is not allowed; use console or json"], EXIT_CONFIG)
    if level not in ("debug", "info", "warning", "error"):
        raise _fail([f"--log-level: {level!r} is not allowed; use debug, info, warning or error"], EXIT_CONFIG)
    logs.configure(fmt=fmt, level=level)
    # The engine logs each retry itself (`request.retry`, with the item and the attempt); stamina's own warning
    # would only repeat it on the terminal without saying which item it was.
    stamina.instrumentation.set_on_retry_hooks([])
    return fmt, level


# The command line owns its event loop, so it takes uvloop where it exists (not on Windows): ~6 % less CPU per item
# at 100k items (docs/benchmarks.md). The library runs on whatever loop its host chose.
LOOP_OPTIONS: dict[str, object] = {"use_uvloop": True} if importlib.util.find_spec("uvloop") else {}


def _run_async(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main` with SIGINT/SIGTERM handling: the first signal stops the engine gracefully, the second exits."""
    try:
        return anyio.run(main, backend_options=LOOP_OPTIONS)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


async def _with_signals(
    engine: Engine,
    body: Callable[[], Awaitable[T]],
    *,
    cancel_pending: bool = False,
    background: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> tuple[T | None, bool]:
    """Await `body` while watching for signals (and running `background`, e.g. periodic progress lines)."""
    interrupted = False

    async def watch() -> None:
        nonlocal interrupted
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if interrupted:
                    os._exit(EXIT_INTERRUPTED)  # second signal: now. State on disk is already consistent.
                interrupted = True
                typer.echo(
                    f"\n{signal.Signals(signum).name}: stopping; state is saved, re-run to resume "
                    "(signal again to exit at once)",
                    err=True,
                )
                engine.stop(cancel_pending=cancel_pending)

    result: T | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        if background is not None:
            tg.start_soon(background)
        try:
            result = await body()
        except Exception as exc:  # re-raised below as itself: inside the group it would come out as a group
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result, interrupted


def _summary_lines(report: RunReport, config: BatchConfig) -> list[str]:
    lines = [
        f"{len(report.items)} item(s) in {report.wall_time_s:.1f} s — cost this run {report.cost_this_run_cny:.3f} CNY"
        f" (batch total {report.cost_cny:.3f} CNY)"
    ]
    for state, n in report.counts.items():
        lines.append(f"  {state:<17} {n}")
    reasons: dict[str, tuple[int, list[str]]] = {}
    if not report.ok:  # a clean run's rows need not be read back from disk at all
        for r in report.items:
            if r.state is not ItemState.SUCCEEDED:
                # keyed by the text shown: a key per distinct reason, each at most one line long
                text = f"{r.state.value}: {r.reason}"[:160]
                n, names = reasons.get(text, (0, []))
                if len(names) < 3 and Path(r.input).name not in text:  # which files, unless the reason says
                    names.append(Path(r.input).name)
                reasons[text] = (n + 1, names)
    for text, (n, names) in sorted(reasons.items(), key=lambda kv: -kv[1][0])[:8]:
        which = f" — {', '.join(names)}{', …' if n > len(names) else ''}" if names else ""
        lines.append(f"  ✗ {n}× {text}{which}")
    review, names = report.needs_review
    if review:
        more = f" (+{review - len(names)} more)" if review > len(names) else ""
        lines.append(f"{review} video(s) need review: {', '.join(names)}{more} (report.html → needs review)")
    lines.append(f"videos and report.json / report.csv in {config.output_dir}")
    return lines


@app.command()
def run(
    config: ConfigArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check locally, estimate cost, send nothing.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Process at most N items.")] = None,
    output: OutputOpt = None,
    presets: PresetsOpt = None,
    log_format: LogFormat = None,
    log_level: LogLevel = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Debug logs, with the traceback of any internal error.")
    ] = False,
    progress_interval: Annotated[
        float | None, typer.Option("--progress-interval", help="Off a TTY: print a JSON progress line every N s.")
    ] = None,
    cancel_pending: Annotated[
        bool, typer.Option("--cancel-pending", help="On SIGINT/SIGTERM also withdraw tasks still queued (PENDING).")
    ] = False,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="video.KEY=V1,V2,… : make each photo (see --limit) with every combination, into OUTPUT/sweep/ "
            "with a sweep.html contact sheet (docs/presets.md). Repeatable.",
        ),
    ] = None,
    redo: Annotated[
        str | None,
        typer.Option(
            "--redo",
            help="bad: make again the videos result analysis judged bad, paying again; shows the cost and asks "
            "first (docs/analysis.md).",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="With --redo: pay without asking (cron).")] = False,
) -> None:
    """Run a batch: upload → detect → submit → poll → download, then write the reports.

    Examples: lpengine run configs/batch.yaml --dry-run · lpengine run configs/batch.yaml --limit 10 ·
    lpengine run configs/batch.yaml --limit 3 --sweep video.template_id=calm,active ·
    lpengine run configs/batch.yaml --redo bad
    """
    cfg = _load(config, output, presets)
    verdicts = _redo_verdicts(redo, yes=yes, limit=limit, sweep=bool(sweep), dry_run=dry_run)
    log_format, log_level = _setup_logging(log_format, "debug" if debug else log_level, cfg)
    plan: Callable[[BatchConfig], Iterator[ItemSpec | PlanProblem]] = iter_plan
    swept = None
    if sweep:
        from lpengine.sweep import parse_sweeps, sweep_config

        try:
            swept = parse_sweeps(sweep)
        except ConfigError as exc:
            raise _fail(exc.problems, EXIT_CONFIG) from None
        cfg, plan, limit = sweep_config(cfg), partial(swept.plan, photos=limit), None
        _run_async(lambda: _dry_run(cfg, None, plan=plan, quiet=True))
        if dry_run:
            raise typer.Exit(EXIT_OK)
    if dry_run:
        raise typer.Exit(_run_async(lambda: _dry_run(cfg, limit, redo=verdicts)))
    code = _run_async(
        lambda: _run(
            cfg,
            limit,
            log_format=log_format,
            log_level=log_level,
            progress_interval=progress_interval,
            cancel_pending=cancel_pending,
            plan=plan,
            redo=verdicts,
            ask=not yes,
        )
    )
    if swept is not None:
        from lpengine.sweep import save_command, write_sweep_page

        page = write_sweep_page(cfg, swept)
        if page is not None:
            typer.echo(f"contact sheet: {page}", err=True)
            typer.echo(f"keep a column: {save_command(cfg.output_dir, '<column label>')}", err=True)
    raise typer.Exit(code)


def _redo_verdicts(redo: str | None, *, yes: bool, limit: int | None, sweep: bool, dry_run: bool) -> frozenset[str]:
    """The verdicts `--redo` makes again, after refusing what it cannot be combined with: paying again is only
    ever an explicit choice, so without a terminal to ask on it must be said with --yes."""
    if redo is None:
        if yes:
            raise _fail(["--yes confirms --redo, and nothing else asks: leave it out, or add --redo bad"], EXIT_CONFIG)
        return frozenset()
    if redo != "bad":
        raise _fail(
            [f"--redo: {redo!r} is not allowed; use --redo bad (videos judged warn or ok are kept)"], EXIT_CONFIG
        )
    if limit is not None or sweep:
        raise _fail(["--redo bad goes over the whole batch: leave out --limit and --sweep"], EXIT_CONFIG)
    if not (dry_run or yes or sys.stdin.isatty()):
        raise _fail(
            [
                "--redo bad pays again for every video judged bad and asks first; with no terminal to ask on, add "
                "--yes to confirm (nothing was sent)"
            ],
            EXIT_CONFIG,
        )
    return REDO_BAD


def _redo_lines(report: DryRunReport, cfg: BatchConfig) -> list[str]:
    """What a --redo will pay, before it pays: the items, seconds of video and CNY (the dry run's own figures)."""
    if report.redo_resuming:
        return [
            f"redo: {report.redo_resuming} item(s) of the last redo are not finished (a run stopped); this run "
            "finishes them, paying only for what is left, and selects nothing new until they are done"
        ]
    if not report.redo:
        return ["redo bad: no video is judged bad; nothing to make again"]
    names = ", ".join(report.redo_names[:5]) + (", …" if len(report.redo) > 5 else "")
    lines = [
        f"redo bad: {len(report.redo)} item(s) ({names}): {report.redo_seconds:.1f} s of video × "
        f"{cfg.pricing.video_per_second} CNY/s = about {report.redo_cost_cny:.3f} CNY, paid again; each earlier "
        "video is kept as NAME.prevN.mp4"
    ]
    if (others := report.would_submit - len(report.redo)) > 0:
        lines.append(
            f"this run also makes {others} item(s) not made yet: about {report.estimated_cost_cny:.3f} CNY in all"
        )
    return lines


async def _confirm_redo(engine: Engine, redo: frozenset[str], cfg: BatchConfig, *, ask: bool) -> tuple[str, ...] | None:
    """The items to redo, once their cost is printed and agreed to; None if the answer was no."""
    report = await engine.dry_run(redo=redo)
    for line in _redo_lines(report, cfg):
        typer.echo(line)
    if report.redo and ask and not await _yes(f"pay about {report.estimated_cost_cny:.3f} CNY for this run?"):
        typer.echo("nothing was sent, nothing paid")
        return None
    return report.redo


async def _yes(question: str) -> bool:
    """A [y/N] answer from the terminal, read by the event loop: a thread blocked in input() would keep the process
    from exiting on Ctrl-C until Enter was pressed."""
    typer.echo(f"{question} [y/N]: ", nl=False)
    await anyio.wait_readable(sys.stdin.fileno())
    return sys.stdin.readline().strip().lower() in ("y", "yes")


async def _run(
    cfg: BatchConfig,
    limit: int | None,
    *,
    log_format: str,
    log_level: str,
    progress_interval: float | None = None,
    cancel_pending: bool = False,
    plan: Callable[[BatchConfig], Iterator[ItemSpec | PlanProblem]] = iter_plan,
    expected_refusals: frozenset[str] = frozenset(),
    redo: frozenset[str] = frozenset(),
    ask: bool = True,
) -> int:
    """`expected_refusals`: file names whose detect refusal is the point (the demo's coffee cup), not a failure.
    `redo`: verdicts to make again (`--redo`), asking first unless `ask` is False."""
    state = ProgressState()
    try:
        async with Engine(cfg, on_event=state.on_event) as engine:
            redo_ids: tuple[str, ...] = ()
            if redo:
                # inside the run's lock: what was priced is what is redone
                confirmed = await _confirm_redo(engine, redo, cfg, ask=ask)
                if confirmed is None:
                    return EXIT_OK
                redo_ids = confirmed
            if sys.stderr.isatty():
                with TtyProgress(state) as bars:
                    # logs must go through the live display, or they would tear the bars apart
                    logs.configure(fmt=log_format, level=log_level, stream=bars.log_stream)
                    report, interrupted = await _with_signals(
                        engine,
                        lambda: engine.run(limit=limit, on_planned=bars.set_total, plan=plan, redo=redo_ids),
                        cancel_pending=cancel_pending,
                    )
            else:
                # cron output stays quiet unless asked (docs/cron.md)
                interval = progress_interval
                report, interrupted = await _with_signals(
                    engine,
                    lambda: engine.run(limit=limit, on_planned=state.set_total, plan=plan, redo=redo_ids),
                    cancel_pending=cancel_pending,
                    background=(lambda: JsonProgress(state, sys.stderr).run(interval)) if interval else None,
                )
    except BatchLockedError as exc:
        raise _fail([str(exc)], EXIT_LOCKED) from None
    except ConfigError as exc:
        raise _fail(exc.problems, EXIT_CONFIG) from None
    except (AuthError, QuotaError) as exc:
        raise _fail([f"{exc.code}: {exc.message} — the batch stopped; state is saved"], EXIT_CONFIG) from None
    except StorageError as exc:
        raise _fail([f"storage: {exc}"], EXIT_CONFIG) from None
    except LPEngineError as exc:
        raise _fail([str(exc)], EXIT_CONFIG) from None
    assert report is not None
    _hint_if_empty(cfg, len(report.items))
    if sys.stdout.isatty():
        typer.echo("\n".join(_summary_lines(report, cfg)))
    else:
        typer.echo(json.dumps({"event": "batch.summary", **report.summary()}, ensure_ascii=False))
    if interrupted:
        return EXIT_INTERRUPTED
    if report.ok:
        return EXIT_OK
    failed = [r for r in report.items if r.state is not ItemState.SUCCEEDED]
    expected = [r for r in failed if r.state is ItemState.DETECT_FAILED and Path(r.input).name in expected_refusals]
    if expected_refusals and len(expected) == len(failed):
        names = ", ".join(Path(r.input).name for r in expected)
        typer.echo(f"as intended: {names} refused by the face check (the demo shows what a refusal looks like)")
        return EXIT_OK
    return EXIT_FAILED


async def _dry_run(
    cfg: BatchConfig,
    limit: int | None,
    *,
    plan: Callable[[BatchConfig], Iterator[ItemSpec | PlanProblem]] = iter_plan,
    quiet: bool = False,
    redo: frozenset[str] = frozenset(),
) -> int:
    """Local checks and the cost of what would be sent; `quiet` prints only the one-line estimate (a sweep's)."""
    try:
        async with Engine.estimating(cfg) as engine:
            report: DryRunReport = await engine.dry_run(limit=limit, plan=plan, redo=redo)
    except ConfigError as exc:
        raise _fail(exc.problems, EXIT_CONFIG) from None
    except LPEngineError as exc:
        raise _fail([str(exc)], EXIT_CONFIG) from None
    _hint_if_empty(cfg, len(report.items))
    rejected = [r for r in report.items if r.state is ItemState.REJECTED_LOCALLY]
    if quiet:
        typer.echo(
            f"will make {report.would_submit} videos, about {report.estimated_cost_cny:.2f} CNY "
            f"({len(report.items)} planned: {report.already_done} already made, {len(rejected)} refused locally)"
        )
        return EXIT_OK
    typer.echo(f"dry run — nothing was sent. {len(report.items)} item(s) planned:")  # the five rows add up to it
    typer.echo(f"  already done (skipped)  {report.already_done}")
    typer.echo(f"  failed before, final    {report.finished_failed}  (not retried; see report.csv)")
    typer.echo(f"  rejected locally        {report.rejected}")
    typer.echo(f"  at the service already  {report.in_progress}  (collected, nothing new to pay)")
    typer.echo(
        f"  would submit            {report.would_submit}  ({report.video_seconds:.1f} s of video "
        f"× {cfg.pricing.video_per_second} CNY/s)"
    )
    typer.echo(f"    of which face checks  {report.would_detect}  (× {cfg.pricing.detect_per_image} CNY)")
    typer.echo(f"  estimated cost          {report.estimated_cost_cny:.3f} CNY  (what this run would pay)")
    if redo:
        for line in _redo_lines(report, cfg):
            typer.echo(line)
    for r in rejected[:50]:
        typer.echo(f"  ✗ {r.reason}")
    return EXIT_OK if not rejected else EXIT_FAILED


def _hint_if_empty(cfg: BatchConfig, planned: int) -> None:
    """A run of nothing is not an error (a nightly folder may be empty), but a newcomer needs to hear why."""
    if planned == 0 and (hint := empty_hint(cfg)) is not None:
        typer.echo(f"warning: {hint}", err=True)


def main() -> None:
    app()


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", help="Where the demo's videos and reports go.")] = Path(
        "lpengine-demo"
    ),
    log_format: LogFormat = None,
    log_level: LogLevel = None,
) -> None:
    """Run the bundled demo (sample portraits + a voice clip) against the in-process emulator. No key, no cost.

    Exit 0 when every portrait made a video and the coffee-cup photo was refused by the face check, as it is meant
    to be; 1 if anything else failed.
    """
    demo_yaml = Path(__file__).parent / "assets" / "demo.yaml"
    cfg = _load(demo_yaml, output)
    log_format, log_level = _setup_logging(log_format, log_level, cfg)
    refusals = frozenset(p.name for p in (demo_yaml.parent / "portraits").glob("noface-*"))
    code = _run_async(lambda: _run(cfg, None, log_format=log_format, log_level=log_level, expected_refusals=refusals))
    typer.echo(f"demo videos and report.html / report.json / report.csv are in {cfg.output_dir.absolute()}")
    raise typer.Exit(code)


@app.command()
def status(
    config: ConfigArg,
    output: OutputOpt = None,
    presets: PresetsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of a table.")] = False,
) -> None:
    """Show the batch's progress from the state store, without calling the API.

    Example: lpengine status configs/batch.yaml --json
    """
    cfg = _load(config, output, presets)
    secrets = _state_secrets(cfg)
    summary = _state_command(lambda: _status(cfg, secrets))
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False))
        return
    typer.echo(f"batch state {state_where(cfg, secrets)}")
    typer.echo(f"  items known            {summary['items']}")
    for state, n in sorted(summary["finished"].items()):
        typer.echo(f"  {state:<22} {n}")
    for stage, n in sorted(summary["in_progress"].items()):
        typer.echo(f"  in progress at {stage:<7} {n}")
    typer.echo(f"  tasks at the service   {summary['tasks_outstanding']}")
    for w in summary.get("workers", []):
        lease = "live" if w["live"] else "lease expired"
        typer.echo(
            f"  worker {w['host']} pid {w['pid']}: {lease} ({w['lease_s']:g} s), last heartbeat "
            f"{w['last_heartbeat_s_ago']:g} s ago, {w['items_in_progress']} item(s) in progress"
        )


async def _status(cfg: BatchConfig, secrets: Secrets) -> dict[str, Any]:
    finished: dict[str, int] = {}
    in_progress: dict[str, int] = {}
    outstanding = total = 0
    async with open_store(cfg, secrets) as store:
        async for row in store.items():
            total += 1
            if row.state and not row.data.get("transient"):
                finished[row.state] = finished.get(row.state, 0) + 1
            else:
                in_progress[row.stage] = in_progress.get(row.stage, 0) + 1
                outstanding += bool(row.task_id)
        workers = await store.workers()
    summary: dict[str, Any] = {
        "items": total,
        "finished": finished,
        "in_progress": in_progress,
        "tasks_outstanding": outstanding,
    }
    if workers:
        summary["workers"] = workers
    return summary


def _state_secrets(cfg: BatchConfig) -> Secrets:
    """The environment's secrets, after checking there is a state to read (a SQLite file that was never written is
    not created by a read-only command)."""
    secrets = load_secrets(cfg.base_dir)
    if state_url(cfg, secrets) is None and not cfg.state_path.exists():
        raise _fail([f"no state yet at {cfg.state_path}: this batch has not run"], EXIT_FAILED)
    return secrets


def _state_command(main: Callable[[], Awaitable[T]]) -> T:
    """A state store or output folder that cannot be used: one `error:` line and exit 2, as `run` does."""
    try:
        return _run_async(main)
    except ConfigError as exc:
        raise _fail(exc.problems, EXIT_CONFIG) from None
    except LPEngineError as exc:
        raise _fail([str(exc)], EXIT_CONFIG) from None
    except OSError as exc:
        where = exc.filename or "the output folder"
        raise _fail([f"cannot write {where} ({exc.strerror}); fix the folder's permissions"], EXIT_CONFIG) from None


@app.command()
def report(config: ConfigArg, output: OutputOpt = None, presets: PresetsOpt = None) -> None:
    """Rebuild report.json, report.csv and report.html from the state store, without calling the API.

    Example: lpengine report configs/batch.yaml
    """
    cfg = _load(config, output, presets)
    secrets = _state_secrets(cfg)
    rebuilt = _state_command(lambda: _rebuild(cfg, secrets))
    typer.echo(f"{len(rebuilt.items)} item(s): report.json, report.csv, report.html written to {cfg.output_dir}")


async def _rebuild(cfg: BatchConfig, secrets: Secrets) -> RunReport:
    """The rows go through a spool file as in a run, so a 100k-item rebuild holds none of them in memory."""
    from lpengine.reports import result_from_state, write_reports
    from lpengine.reports.spool import ResultSpool, spool_dir

    pricing = cfg.pricing
    async with open_store(cfg, secrets) as store:
        spool = await anyio.to_thread.run_sync(ResultSpool.create, spool_dir(cfg.state_path))
        try:
            async for row in store.items():
                spool.append(result_from_state(row.data, pricing.detect_per_image, pricing.video_per_second))
        finally:
            spool.close()
    rebuilt = RunReport(items=spool.results(), wall_time_s=0.0, totals=spool.totals)
    await anyio.to_thread.run_sync(write_reports, rebuilt, cfg.output_dir)
    return rebuilt


@app.command()
def analyze(
    videos: Annotated[list[Path], typer.Argument(help="Video files, or one batch output folder (with report.json).")],
    audio: Annotated[Path | None, typer.Option("--audio", help="The voice track the videos should carry.")] = None,
    fps: Annotated[int | None, typer.Option("--fps", min=1, max=240, help="The frame rate asked for.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"videos": [...]} only.')] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Worker processes.")] = 2,
) -> None:
    """Judge videos without watching them: verdict ok/warn/bad, flags, metrics (docs/analysis.md).

    Exit 0 all ok · 1 some warn or bad · 2 bad usage (a missing, empty or non-video file: one line each).
    Examples: lpengine analyze out/a.mp4 --audio voice.wav --fps 25 · lpengine analyze output/demo
    """
    from lpengine.analysis import missing_extra
    from lpengine.analysis.files import BadInput, analyze_files, expectations
    from lpengine.config import AnalysisConfig
    from lpengine.reports.verdicts import judge_batch, looks_like_batch, read_rows

    if hint := missing_extra():
        raise _fail([hint], EXIT_CONFIG)
    expect = expectations(audio, fps)
    if isinstance(expect, BadInput):
        raise _fail([f"--audio {expect}"], EXIT_CONFIG)
    config = AnalysisConfig(workers=workers)
    batch = len(videos) == 1 and looks_like_batch(videos[0])
    if batch:
        rows = read_rows(videos[0])
        if isinstance(rows, BadInput):
            raise _fail([str(rows)], EXIT_CONFIG)
        folder = videos[0]
        results = _run_async(lambda: judge_batch(folder, *rows, config))
    else:
        results = _run_async(lambda: analyze_files(videos, expect, config))
    judged = [r for r in results if not isinstance(r, BadInput)]
    for bad in (r for r in results if isinstance(r, BadInput)):
        typer.echo(f"error: {bad}", err=True)
    if as_json:
        typer.echo(json.dumps({"videos": [r.to_dict() for r in judged]}, ensure_ascii=False))
    else:
        for r in judged:
            typer.echo(f"{r.verdict:<4} {r.score:>3}  {r.path}  {', '.join(r.flags) or '-'}")
    if len(judged) < len(results) and not batch:  # in a batch, a vanished video is a finding, not bad usage
        raise typer.Exit(EXIT_CONFIG)
    raise typer.Exit(EXIT_OK if all(r.verdict == "ok" for r in judged) else EXIT_FAILED)


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8089,
    host: Annotated[str, typer.Option(help="Bind address; loopback unless you mean it.")] = "127.0.0.1",
    speedup: Annotated[float, typer.Option(help="Divide every duration, quota and expiry by this.")] = 1.0,
    realtime_factor: Annotated[float, typer.Option(help="Task run time = audio duration × this.")] = 1.5,
    detector: Annotated[str, typer.Option(help="auto, haar, rule or always_pass.")] = "auto",
    video: Annotated[str, typer.Option(help="real (encode MP4) or stub.")] = "real",
    seed: Annotated[int, typer.Option(help="Seed for noise and fault injection.")] = 0,
) -> None:
    """Serve the DashScope LivePortrait emulator (docs/emulator.md). Keys: DASHSCOPE_API_KEY or sk-emulator."""
    from pydantic import ValidationError

    from lpengine.emulator import EmulatorSettings, serve_forever

    try:
        settings = EmulatorSettings(
            host=host,
            port=port,
            speedup=speedup,
            realtime_factor=realtime_factor,
            detector=detector,
            video=video,
            seed=seed,
        )
    except ValidationError as exc:
        raise _fail([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()], EXIT_CONFIG) from None
    _run_async(lambda: serve_forever(settings))


@app.command()
def check(config: ConfigArg) -> None:
    """Check the environment before spending money: key, endpoint, storage round trip, audio, disk. Exit 0 if all pass.

    Example: lpengine check configs/batch.yaml
    """
    from lpengine.doctor import run_checks

    logs.configure(level="error")
    cfg = _load(config)
    results = _run_async(lambda: run_checks(cfg))
    width = max(len(c.name) for c in results)
    for c in results:
        mark = "✓" if c.ok else "✗"
        typer.echo(f"{mark} {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            typer.echo(f"  {'':<{width}}  → {c.fix}")
    raise typer.Exit(EXIT_OK if all(c.ok for c in results) else EXIT_FAILED)


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Argument(help="Base batch YAML: API, storage, pricing and defaults for new batches.")
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Run every batch on the embedded emulator (no key).")] = False,
    host: Annotated[str, typer.Option(help="Bind address; a non-loopback one needs LPENGINE_CONSOLE_TOKEN.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8710,
    workspace: Annotated[Path, typer.Option(help="Folder holding the console's batches.")] = Path("lpengine-console"),
) -> None:
    """Serve the web console: upload photos and a voice track, watch batches, play and download the videos.

    Examples: lpengine serve --demo · lpengine serve configs/batch.yaml --port 8710
    """
    from lpengine.web import ConsoleSettings, serve_forever

    if config is None and not demo:
        raise _fail(["give a base batch YAML (see configs/batch.yaml), or --demo for the emulator"], EXIT_CONFIG)
    logs.configure(level="warning")
    settings = ConsoleSettings(config=config, demo=demo, host=host, port=port, workspace=workspace)
    try:
        _run_async(lambda: serve_forever(settings))
    except ConfigError as exc:
        raise _fail(exc.problems, EXIT_CONFIG) from None


db_app = typer.Typer(help="The shared PostgreSQL state database (docs/scaling.md).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(config: ConfigArg) -> None:
    """Create or upgrade lpengine's tables in the configured PostgreSQL database (safe to run again, from any host).

    Example: LPENGINE_STATE_URL=postgresql://lpengine@db/lpengine lpengine db upgrade configs/batch.yaml
    """
    cfg = _load(config)
    typer.echo(_state_command(lambda: upgrade_schema(cfg, load_secrets(cfg.base_dir))))
