"""Smoke test of scripts/bench.py (docs/benchmarks.md): a small instant-mode batch through lpengine, in separate
emulator and client processes, exactly as the real benchmark runs. Checks correctness and that every figure is
produced; no timing is asserted (CI machines vary)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"

pytestmark = pytest.mark.anyio


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lpengine_bench_script", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _instant(bench: ModuleType, tmp_path: Path, *flags: str) -> Any:
    """Settings exactly as `python scripts/bench.py --instant … --workdir tmp_path` would make them."""
    return bench.settings_from_args(bench._parser().parse_args(["--instant", *flags, "--workdir", str(tmp_path)]))


async def test_instant_batch_through_lpengine(tmp_path: Path) -> None:
    bench = _load_bench()
    settings = _instant(bench, tmp_path, "--items", "100")
    lines: list[str] = []
    report: dict[str, Any] = await anyio.to_thread.run_sync(lambda: bench.run_bench(settings, log=lines.append))

    [m] = report["results"]
    assert m["client"] == "lpengine"
    assert m["exit_code"] == 0
    assert m["succeeded"] == 100, m["failure_reasons"]
    assert m["throttled"] == 0
    assert m["tasks"] == 100
    assert m["images_submitted"] == 100
    assert m["duplicate_submissions"] == 0
    assert len(list((tmp_path / "out" / "lpengine").glob("*.mp4"))) == 100

    for key in (
        "makespan_s",
        "lower_bound_s",
        "lead_s",
        "idle_s",
        "idle_pct",
        "queries_per_task",
        "cpu_s",
        "cpu_ms_per_item",
        "batch_cpu_ms_per_item",
        "peak_rss_mb",
        "sleeps_per_item",
        "wall_s",
        "batch_wall_s",
        "items_per_wall_s",
        "loopback_rtt_cpu_us",
    ):
        assert isinstance(m[key], float | int), key
        assert math.isfinite(m[key]), key
    assert m["queries_per_task"] >= 1
    assert m["peak_rss_mb"] > 0 and m["cpu_s"] > 0 and m["loopback_rtt_cpu_us"] > 0
    assert m["sleeps_per_item"] > 0  # an asyncio client waits on its sockets: a zero means the figure is not read

    table = bench.table(report["results"], instant=True)
    assert table.splitlines()[2].startswith("| lpengine | 100 | 100 | 0 | yes |")
    json.dumps(report)  # the --json output is plain JSON
    assert any("running lpengine" in line for line in lines)


async def test_cpu_floor_comparison_runs_on_url_inputs(tmp_path: Path) -> None:
    """The documented floor comparison (`--inputs urls --clients bare,lpengine`): both clients fetch their inputs
    from the bench's own file server and finish every item; lpengine still submits each image once."""
    bench = _load_bench()
    settings = _instant(bench, tmp_path, "--items", "40", "--inputs", "urls", "--clients", "bare,lpengine")
    report: dict[str, Any] = await anyio.to_thread.run_sync(lambda: bench.run_bench(settings, log=lambda _: None))

    bare, lpengine = report["results"]
    assert (bare["client"], lpengine["client"]) == ("bare", "lpengine")
    assert bare["succeeded"] == lpengine["succeeded"] == 40, (bare["failure_reasons"], lpengine["failure_reasons"])
    assert lpengine["images_submitted"] == 40 and lpengine["duplicate_submissions"] == 0
    assert lpengine["throttled"] == 0
    manifest = (tmp_path / "manifest.csv").read_text(encoding="utf-8")
    assert manifest.count("http://127.0.0.1:") == 80  # image and audio of every row are URLs
    assert all(math.isfinite(m["batch_cpu_ms_per_item"]) for m in (bare, lpengine))
    # each client's CPU against the floor of the same run (the target: lpengine ≤ 2× bare), printed in the table
    assert bare["cpu_vs_bare"] == 1.0
    assert lpengine["cpu_vs_bare"] == pytest.approx(lpengine["cpu_ms_per_item"] / bare["cpu_ms_per_item"])
    assert math.isfinite(lpengine["batch_cpu_vs_bare"])
    row = bench.table(report["results"], instant=True).splitlines()[3]
    assert row.startswith("| lpengine |") and row.endswith(
        f"| {lpengine['cpu_vs_bare']:.2f} / {lpengine['batch_cpu_vs_bare']:.2f} |"
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_state_store_replay_reports_its_figure(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """scripts/bench_store.py runs as documented and prints one figure per repeat (again, no timing asserted)."""
    script = BENCH.with_name("bench_store.py")
    url = ["--url", request.getfixturevalue("pg_url")] if backend == "postgres" else []
    done = subprocess.run(
        [sys.executable, str(script), "--items", "20", "--repeat", "2", *url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    where = "PostgreSQL" if url else r"files \d+ MB"
    figure = re.compile(
        r"20 items: \d+ us CPU per item \(\d+ user, \d+ sys\), [\d.]+ ms wall per item, "
        rf"10 statements per item, {where}"
    )
    assert all(figure.fullmatch(line) for line in lines), lines
