"""The analysis stage in a real run: defective results from the emulator are judged in the reports and the run
summary, and an analysis that fails never fails its item or loses its video."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")

from lpengine import Engine, ItemState, load_config
from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, run_emulator
from lpengine.emulator.settings import Defect
from lpengine.media import verify_mp4
from tests.helpers import write_batch

pytestmark = pytest.mark.anyio

KEY = "sk-test-analysis-0123456789"
SPEEDUP = 200.0
DEFECTS: dict[str, Defect] = {"portrait-0001": "frozen", "portrait-0002": "face_lost"}


@pytest.fixture
async def emulator() -> AsyncIterator[object]:
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, seed=5)) as emu:
        yield emu


def batch(tmp_path: Path, emulator: Any, analysis: str = "") -> Path:
    """Three portraits; the emulator makes two of them defective (the file server's URLs name the content hash,
    which the defect rules match)."""
    from lpengine.demo_assets import make_portraits

    photos = make_portraits(tmp_path / "photos", 3)
    rules = [
        FaultRule(match=hashlib.sha256(p.read_bytes()).hexdigest(), action="defect", defect=DEFECTS[p.stem])
        for p in photos
        if p.stem in DEFECTS
    ]
    emulator.set_faults(FaultSettings(rules=rules))
    extra = {"analysis": analysis} if analysis else {}
    return write_batch(tmp_path, emulator.base_url, SPEEDUP, storage="\n  backend: fileserver", **extra)


async def test_defects_are_judged_in_reports_and_summary(tmp_path: Path, emulator: object) -> None:
    config = load_config(batch(tmp_path, emulator))
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()

    assert report.ok  # a bad verdict is a judgement on the video, not a failure of the item
    by_name = {Path(r.output or "").stem: r for r in report.items}
    assert (by_name["portrait-0000"].verdict, by_name["portrait-0000"].flags) == ("ok", [])
    assert (by_name["portrait-0001"].verdict, by_name["portrait-0001"].flags) == ("bad", ["frozen"])
    assert (by_name["portrait-0002"].verdict, by_name["portrait-0002"].flags) == ("bad", ["no_face"])
    assert by_name["portrait-0000"].score == 100 and by_name["portrait-0001"].score == 60
    assert report.needs_review == (2, ["portrait-0001.mp4", "portrait-0002.mp4"]) or report.needs_review == (
        2,
        ["portrait-0002.mp4", "portrait-0001.mp4"],
    )
    assert report.summary()["needs_review"] == 2

    out = config.output_dir
    rows = {Path(r["output"]).stem: r for r in json.loads((out / "report.json").read_text())["items"]}
    assert rows["portrait-0001"]["verdict"] == "bad" and rows["portrait-0001"]["flags"] == ["frozen"]
    assert rows["portrait-0001"]["metrics"]["longest_frozen_s"] >= 2.0
    with (out / "report.csv").open(newline="") as fh:
        csv_rows = {Path(r["output"]).stem: r for r in csv.DictReader(fh)}
    assert (csv_rows["portrait-0002"]["verdict"], csv_rows["portrait-0002"]["flags"]) == ("bad", "no_face")
    assert csv_rows["portrait-0000"]["score"] == "100"
    for name in by_name:
        assert (out / ".lpengine" / "frames" / f"{name}.jpg").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "needs review 2" in html and html.count("data-review") == 2 + 1  # two rows and the CSS rule

    # `lpengine analyze OUTPUT_DIR` judges the batch again from report.json alone and writes the verdicts back
    document = json.loads((out / "report.json").read_text())
    for row in document["items"]:
        row.update(verdict=None, flags=None, score=None, metrics=None)
    (out / "report.json").write_text(json.dumps(document))
    with anyio.fail_after(300):
        proc = await anyio.run_process([sys.executable, "-m", "lpengine", "analyze", str(out), "--json"], check=False)
    assert proc.returncode == 1, proc.stderr  # two videos are bad
    assert sorted(v["verdict"] for v in json.loads(proc.stdout)["videos"]) == ["bad", "bad", "ok"]
    rejudged = {Path(r["output"]).stem: r for r in json.loads((out / "report.json").read_text())["items"]}
    assert {k: (r["verdict"], r["flags"]) for k, r in rejudged.items()} == {
        "portrait-0000": ("ok", []),
        "portrait-0001": ("bad", ["frozen"]),
        "portrait-0002": ("bad", ["no_face"]),
    }
    assert rejudged["portrait-0001"]["metrics"]["expected_fps"] == 24  # the row's parameters were used
    assert json.loads((out / "report.json").read_text())["summary"]["needs_review"] == 2

    # the verdicts live in the state store too: a report rebuilt from it keeps them
    async with Engine(config, api_key=KEY) as engine:
        again = await engine.run()
    assert {Path(r.output or "").stem: r.verdict for r in again.items} == {
        "portrait-0000": "ok",
        "portrait-0001": "bad",
        "portrait-0002": "bad",
    }


async def test_failed_analysis_marks_the_item_and_keeps_the_video(tmp_path: Path, emulator: object) -> None:
    # A lip-sync model that cannot be imported makes every analysis raise inside its worker.
    config = load_config(batch(tmp_path, emulator, "{sync_model: 'no_such_module_here:score'}"))
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    assert report.ok
    assert all(r.state is ItemState.SUCCEEDED for r in report.items)
    for r in report.items:
        assert r.verdict == "analysis_failed"
        assert "ModuleNotFoundError" in (r.metrics or {})["error"]
        assert r.output is not None
        verify_mp4(Path(r.output))
    assert report.needs_review[0] == 3
