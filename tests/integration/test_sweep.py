"""Sweeps from the command line: the estimate first, photos × combinations named by combination, a re-run that pays
nothing, the contact sheet, and the recipe each video carries back into a preset."""

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
from lpengine.errors import ConfigError
from lpengine.presets import load_library
from lpengine.recipe_tags import read_recipe
from lpengine.sweep import parse_sweeps
from tests.helpers import ROOT, write_batch

KEY = "sk-test-sweep-0123456789"
SPEEDUP = 200.0


def lpengine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lpengine", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "DASHSCOPE_API_KEY": KEY},
    )


def test_sweep_counts_and_names() -> None:
    """The product of the axes, duplicates dropped, each combination named the same way every time."""
    sweep = parse_sweeps(["video.mouth_move_strength=0.6,1,1.4,1.0", "template_id=calm,active", "video.video_fps=30"])
    assert len(sweep.combinations) == 3 * 2 * 1
    labels = [sweep.label(c) for c in sweep.combinations]
    assert labels[:2] == ["mouth0.6_calm_fps30", "mouth0.6_active_fps30"]
    assert len(set(labels)) == len(labels)
    assert parse_sweeps(["video.paste_back=true,false"]).combinations == [{"paste_back": True}, {"paste_back": False}]


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("video.mouth_move_strength=0.6,2", "--sweep video.mouth_move_strength: '2': Input should be less than"),
        ("video.mouth_move_strenght=1", "--sweep video.mouth_move_strenght: not a video parameter"),
        ("video.template_id", "--sweep 'video.template_id': write video.KEY=VALUE1,VALUE2"),
        ("video.template_id=calm,wild", "--sweep video.template_id: 'wild': Input should be 'normal', 'calm'"),
        ("video.video_fps=24.5", "--sweep video.video_fps: '24.5': Input should be a valid integer"),
    ],
)
def test_bad_sweeps_are_refused_with_one_line_each(option: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_sweeps([option])
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(expected), info.value.problems


@pytest.fixture
async def emulator() -> AsyncIterator[object]:
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, seed=7, video="stub")) as emu:
        yield emu


@pytest.mark.anyio
async def test_sweep_runs_once_pays_once_and_saves_a_column(
    tmp_path: Path, emulator: object, _own_user_presets: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted(p for p in (ROOT / "lpengine/assets/portraits").glob("*") if "noface" not in p.name)[:3]:
        (photos / src.name).write_bytes(src.read_bytes())
    config = write_batch(tmp_path, emulator.base_url, SPEEDUP, video="{preset: news-anchor}")  # type: ignore[attr-defined]
    args = ["run", str(config), "--limit", "2", "--sweep", "video.mouth_move_strength=0.6,1.4"]
    args += ["--sweep", "video.template_id=calm,active"]

    def submits() -> int:
        return int(emulator.stats().requests.get("submit", 0))  # type: ignore[attr-defined]

    dry = await anyio.to_thread.run_sync(lambda: lpengine(*args, "--dry-run"))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("will make 8 videos, about ")
    assert submits() == 0 and not (tmp_path / "out" / "sweep" / "report.json").exists()

    first = await anyio.to_thread.run_sync(lambda: lpengine(*args))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("will make 8 videos, about ")
    assert submits() == 8
    out = tmp_path / "out" / "sweep"
    videos = sorted(p.name for p in out.glob("*.mp4"))
    assert len(videos) == 8
    stems = sorted(p.stem for p in photos.iterdir())[:2]
    assert videos[0] == f"{stems[0]}__mouth0.6_active.mp4"
    assert {re.sub(r"^.*__", "", v) for v in videos} == {
        "mouth0.6_calm.mp4",
        "mouth0.6_active.mp4",
        "mouth1.4_calm.mp4",
        "mouth1.4_active.mp4",
    }
    assert not (tmp_path / "out" / "report.json").exists()  # the batch's own reports are not the sweep's

    again = await anyio.to_thread.run_sync(lambda: lpengine(*args))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("will make 0 videos, about 0.00 CNY")
    assert submits() == 8  # a re-run pays nothing
    assert sorted(p.name for p in out.glob("*.mp4")) == videos

    page = (out / "sweep.html").read_text()
    assert page.count("<video ") == 8
    assert "lpengine presets save NAME --from-sweep" in page and "--pick mouth1.4_active" in page

    # every video carries its recipe, and either way back makes the same preset
    recipe = read_recipe(out / f"{stems[0]}__mouth1.4_active.mp4")
    assert recipe is not None
    assert recipe["preset"] == "news-anchor"
    assert (recipe["params"]["mouth_move_strength"], recipe["params"]["template_id"]) == (1.4, "active")
    saved = await anyio.to_thread.run_sync(
        lambda: lpengine("presets", "save", "loud", "--from-sweep", str(out), "--pick", "mouth1.4_active")
    )
    assert saved.returncode == 0, saved.stderr
    from_video = await anyio.to_thread.run_sync(
        lambda: lpengine("presets", "save", "loud2", "--from-video", str(out / f"{stems[0]}__mouth1.4_active.mp4"))
    )
    assert from_video.returncode == 0, from_video.stderr
    library = load_library()
    loud, loud2 = library.get("loud"), library.get("loud2")
    assert loud is not None and loud2 is not None
    assert loud.chain == ("loud", "news-anchor")  # the sweep's base preset stays its base
    assert loud.params() == loud2.params()
    refused = await anyio.to_thread.run_sync(
        lambda: lpengine("presets", "save", "loud", "--from-sweep", str(out), "--pick", "mouth9_calm")
    )
    assert refused.returncode == 2 and "is not a column of this sweep" in refused.stderr
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["counts"] == {"succeeded": 8}
