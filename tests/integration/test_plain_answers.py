"""What confused users, answered where it happens: this run's cost apart from the batch's, no key claimed for the
emulator, a hint for an empty folder, plan problems on stderr and in the live count, failures named by file,
batch-wide problems said once, a bad `.env` line said once with its file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lpengine import Engine, ItemState, ProgressEvent, load_config
from lpengine.cli import _summary_lines
from lpengine.demo_assets import make_portraits
from lpengine.models import ItemResult, RunReport

ROOT = Path(__file__).resolve().parents[2]
VOICE = ROOT / "lpengine" / "assets" / "voice.wav"
EMULATED = "api:\n  emulator: {}\n  speedup: 200\nstorage:\n  backend: fileserver\noutput:\n  dir: out\n"


def lpengine(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lpengine", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=cwd,
        env={**os.environ, "DASHSCOPE_API_KEY": ""},
    )


def batch(root: Path, inputs: str = "images: photos", audio: bool = True) -> Path:
    config = root / "batch.yaml"
    config.write_text(f"inputs:\n  {inputs}\n" + (f"audio: {VOICE}\n" if audio else "") + EMULATED)
    return config


@pytest.mark.anyio
async def test_a_rerun_that_sends_nothing_costs_nothing_this_run(tmp_path: Path) -> None:
    """`cost_cny` is the batch total (a re-run that sent nothing printed 0.498 CNY again, and a cron user summing
    nightly lines counted it again); `cost_this_run_cny` is what this run paid."""
    make_portraits(tmp_path / "photos", 2)
    config = load_config(batch(tmp_path))
    async with Engine(config) as engine:
        first = await engine.run()
    async with Engine(config) as engine:
        second = await engine.run()
    assert first.cost_cny > 0 and first.cost_this_run_cny == first.cost_cny
    assert second.cost_cny == first.cost_cny and second.cost_this_run_cny == 0
    assert second.summary()["cost_this_run_cny"] == 0 and second.summary()["cost_cny"] == first.cost_cny
    assert "cost this run 0.000 CNY (batch total" in "\n".join(_summary_lines(second, config))


def test_check_with_the_emulator_does_not_claim_a_key_is_set(tmp_path: Path) -> None:
    make_portraits(tmp_path / "photos", 1)
    proc = lpengine("check", str(batch(tmp_path)))
    assert "DASHSCOPE_API_KEY is set" not in proc.stdout
    assert "api key" in proc.stdout and "not needed: api.emulator" in proc.stdout


@pytest.mark.parametrize("layout", ["empty", "in subfolders"])
def test_an_empty_images_folder_gets_a_hint(tmp_path: Path, layout: str) -> None:
    """0 items and exit 0 said nothing; now a warning says why, and for images in subfolders, the glob to use."""
    (tmp_path / "photos").mkdir()
    if layout == "in subfolders":
        make_portraits(tmp_path / "photos" / "2024", 1)
    proc = lpengine("run", str(batch(tmp_path)), "--dry-run")
    assert proc.returncode == 0
    hint = "use `images: 'photos/**/*'`" if layout == "in subfolders" else "no images in"
    assert proc.stderr.count("warning: ") == 1 and hint in proc.stderr, proc.stderr


@pytest.mark.anyio
async def test_plan_problems_are_counted_live_as_in_the_report(tmp_path: Path) -> None:
    """A manifest's bad rows reached the report as `rejected_locally` but never the live counter or stderr."""
    make_portraits(tmp_path / "photos", 1)
    (tmp_path / "m.csv").write_text("image,video_fps\nphotos/portrait-0000.jpg,\nphotos/portrait-0000.jpg,99\n")
    events: list[ProgressEvent] = []
    async with Engine(load_config(batch(tmp_path, "manifest: m.csv")), on_event=events.append) as engine:
        report = await engine.run()
    # An item may report its final state more than once (its video lands, then is judged): count it once, as the
    # live counter does.
    live = Counter({e.item: e.state for e in events if e.state is not None}.values())
    assert report.counts == {"succeeded": 1, "rejected_locally": 1}
    assert live[ItemState.REJECTED_LOCALLY] == 1 and live[ItemState.SUCCEEDED] == 1
    proc = lpengine("run", str(tmp_path / "batch.yaml"))
    assert "m.csv:3" in proc.stderr and "video_fps" in proc.stderr
    assert json.loads(proc.stdout)["counts"]["rejected_locally"] == 1


def test_the_summary_names_the_files_of_each_failure(tmp_path: Path) -> None:
    """ "1× detect_failed: No human face detected." said which, of a thousand photos? Now it names up to three."""

    def row(name: str, state: ItemState, reason: str) -> ItemResult:
        return ItemResult(f"/p/{name}", None, state, reason, None, None, None, None, 0, {}, 0.0)

    report = RunReport(
        items=[
            row("cup.jpg", ItemState.DETECT_FAILED, "No human face detected."),
            *(row(f"dog{i}.jpg", ItemState.DETECT_FAILED, "The face is too small.") for i in range(5)),
            row("x.gif", ItemState.REJECTED_LOCALLY, "/p/x.gif: unsupported format GIF"),
        ],
        wall_time_s=1.0,
    )
    lines = _summary_lines(report, load_config(batch(tmp_path)))
    assert "  ✗ 1× detect_failed: No human face detected. — cup.jpg" in lines
    assert "  ✗ 5× detect_failed: The face is too small. — dog0.jpg, dog1.jpg, dog2.jpg, …" in lines
    assert "  ✗ 1× rejected_locally: /p/x.gif: unsupported format GIF" in lines  # the reason names it already


@pytest.mark.parametrize("problem", ["no audio", "no image column"])
def test_a_batch_wide_problem_is_one_line_exit_2(tmp_path: Path, problem: str) -> None:
    """No `audio:`, or a manifest without an `image` column, failed every item with the same line, exit 1."""
    make_portraits(tmp_path / "photos", 3)
    if problem == "no audio":
        config = batch(tmp_path, audio=False)
        words = "audio: not set"
    else:
        (tmp_path / "m.csv").write_text("photo,output\nphotos/portrait-0000.jpg,a\nphotos/portrait-0001.jpg,b\n")
        config = batch(tmp_path, "manifest: m.csv")
        words = "has no `image` column (its first line names: photo, output)"
    for args in (("run", str(config)), ("run", str(config), "--dry-run")):
        proc = lpengine(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr


def test_a_bad_env_line_is_reported_once_naming_the_file(tmp_path: Path) -> None:
    make_portraits(tmp_path / "photos", 1)
    config = batch(tmp_path)
    (tmp_path / ".env").write_text("OSS_ACCESS_KEY_ID=x\nthis line is not NAME=value\n")
    proc = lpengine("run", str(config), "--dry-run", cwd=tmp_path)
    assert proc.stderr.count(".env:2") == 1, proc.stderr
    assert f"{tmp_path / '.env'}:2: not a NAME=value line" in proc.stderr
