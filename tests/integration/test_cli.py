"""The CLI as users run it: exit codes, one-line messages, dry runs that send nothing, the demo, the example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from lpengine.emulator import EmulatorSettings, run_emulator

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-cli-0123456789"


def lpengine(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lpengine", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_bad_config_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    """A config with three mistakes gives three `error:` lines naming file and field, exit 2, no traceback."""
    config = tmp_path / "bad.yaml"
    config.write_text(
        "inputs:\n  images: photos\nvideo:\n  video_fps: 99\n  template: calm\napi:\n  retry:\n    attempts: 0\n"
    )
    proc = lpengine("run", str(config))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert all(line.startswith(f"error: {config}: ") for line in lines)
    assert any("video.video_fps" in line and "30" in line for line in lines)
    assert any("video.template: unknown key; did you mean `template_id`?" in line for line in lines)
    assert "Traceback" not in proc.stderr


def test_missing_api_key_is_one_clear_line(tmp_path: Path) -> None:
    """Without DASHSCOPE_API_KEY the run refuses at once with the fix, exit 2."""
    (tmp_path / "photos").mkdir()
    config = tmp_path / "b.yaml"
    config.write_text(f"inputs:\n  images: photos\naudio: {ROOT / 'lpengine/assets/voice.wav'}\n")
    proc = lpengine("run", str(config), env={"DASHSCOPE_API_KEY": ""})
    assert proc.returncode == 2
    assert "DASHSCOPE_API_KEY is not set" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
async def emulator() -> AsyncIterator[object]:
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=100.0, video="stub")) as emu:
        yield emu


@pytest.mark.anyio
async def test_dry_run_sends_nothing_and_estimates_cost(tmp_path: Path, emulator: object) -> None:
    """`--dry-run` checks locally and prints the estimate; the emulator sees zero requests."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted((ROOT / "lpengine/assets/portraits").glob("*"))[:3]:
        (photos / src.name).write_bytes(src.read_bytes())
    (photos / "broken.jpg").write_text("not an image")
    config = tmp_path / "b.yaml"
    config.write_text(
        f"inputs:\n  images: photos\naudio: {ROOT / 'lpengine/assets/voice.wav'}\n"
        f"api:\n  base_url: {emulator.base_url}\n  speedup: 100\nstorage:\n  backend: fileserver\n"  # type: ignore[attr-defined]
    )
    proc = await anyio.to_thread.run_sync(
        lambda: lpengine("run", str(config), "--dry-run", env={"DASHSCOPE_API_KEY": KEY})
    )
    assert proc.returncode == 1  # one file is rejected locally
    assert "nothing was sent" in proc.stdout
    assert "of which face checks  3" in proc.stdout and "would submit            3" in proc.stdout
    planned = re.search(r"(\d+) item\(s\) planned", proc.stdout)
    rows = [re.match(r"  \S.+?\s{2,}(\d+)", line) for line in proc.stdout.splitlines()[1:6]]
    assert planned is not None and all(rows), proc.stdout
    assert sum(int(row.group(1)) for row in rows if row) == int(planned.group(1)) == 4  # the five rows add up
    assert "broken.jpg" in proc.stdout
    assert "estimated cost" in proc.stdout
    stats = emulator.stats()  # type: ignore[attr-defined]
    assert sum(stats.requests.values()) == 0


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`lpengine demo` needs no key and writes playable videos and the three reports."""
    proc = lpengine("demo", "--output", str(tmp_path / "demo"), env={"DASHSCOPE_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr  # the coffee cup is refused by detect, on purpose: not a failure
    assert "as intended: noface-coffee.jpg refused by the face check" in proc.stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["summary"]["counts"] == {"succeeded": 6, "detect_failed": 1}
    assert {"report.html", "report.csv"} <= {p.name for p in (tmp_path / "demo").iterdir()}
    assert len(list((tmp_path / "demo").glob("*.mp4"))) == 6

    demo_yaml = str(ROOT / "configs/demo.yaml")
    status = lpengine("status", demo_yaml, "--output", str(tmp_path / "demo"), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["finished"] == {"succeeded": 6, "detect_failed": 1}
    (tmp_path / "demo" / "report.json").unlink()
    rebuilt = lpengine("report", demo_yaml, "--output", str(tmp_path / "demo"))
    assert rebuilt.returncode == 0, rebuilt.stderr
    again = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert again["summary"]["counts"] == {"succeeded": 6, "detect_failed": 1}


def test_library_example_runs() -> None:
    """docs/examples/service.py, the embedding example, runs as shipped."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs/examples/service.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "astronaut.png: succeeded" in proc.stdout


@pytest.mark.anyio
async def test_check_passes_with_s3_and_names_each_failure(tmp_path: Path, emulator: object, s3_server: object) -> None:
    """`lpengine check`: a good setup passes every row (storage written, read via its URL, deleted); a wrong key
    and a missing bucket each get a ✗ row with the fix, exit 1."""
    from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, unique_bucket_name

    bucket = s3_server.create_bucket(unique_bucket_name())  # type: ignore[attr-defined]
    (tmp_path / "photos").mkdir()
    config = tmp_path / "b.yaml"
    config.write_text(
        f"inputs:\n  images: photos\naudio: {ROOT / 'lpengine/assets/voice.wav'}\n"
        f"api:\n  base_url: {emulator.base_url}\n  speedup: 100\n"  # type: ignore[attr-defined]
        f"storage:\n  backend: s3\n  endpoint_url: {s3_server.endpoint_url}\n  region: us-east-1\n"  # type: ignore[attr-defined]
        f"  bucket: {bucket}\n  addressing_style: path\n"
    )
    env = {"DASHSCOPE_API_KEY": KEY, "OSS_ACCESS_KEY_ID": ACCESS_KEY_ID, "OSS_ACCESS_KEY_SECRET": SECRET_ACCESS_KEY}
    good = await anyio.to_thread.run_sync(lambda: lpengine("check", str(config), env=env))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "✗" not in good.stdout
    assert "storage (s3)" in good.stdout
    assert s3_server.list_keys(bucket) == []  # type: ignore[attr-defined]  # the probe cleaned up after itself
    bad = await anyio.to_thread.run_sync(
        lambda: lpengine("check", str(config), env={**env, "DASHSCOPE_API_KEY": "sk-no"})
    )
    assert bad.returncode == 1
    assert "✗ api" in bad.stdout and "InvalidApiKey" in bad.stdout and "Beijing-region key" in bad.stdout
    assert "sk-no" not in bad.stdout and SECRET_ACCESS_KEY not in bad.stdout + bad.stderr
