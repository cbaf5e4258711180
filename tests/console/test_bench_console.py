"""scripts/bench_console.py still runs (its figures are recorded in docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_console.py"


def test_page_bench_answers_every_page(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "page", "--items", "300", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["items"] == 300
    assert len(result["ms"]) == 5 and all(ms > 0 and size > 0 for ms, size in result["ms"].values())
