"""Presets through the real pipeline: the manifest column, recipes recorded in the store and reports, and a preset
edited under a batch never changing (or paying again for) items already submitted."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lpengine import Engine, ItemState, load_config
from lpengine.emulator import EmulatorSettings, run_emulator
from lpengine.state import SqliteStateStore
from tests.conftest import write
from tests.helpers import cancel_after_first_submit, write_batch

pytestmark = pytest.mark.anyio

KEY = "sk-test-presets-0123456789"
SPEEDUP = 200.0


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from lpengine.demo_assets import make_portraits

    return make_portraits(tmp_path_factory.mktemp("faces"), 6)


@pytest.fixture
async def emulator() -> AsyncIterator[object]:
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, seed=5, video="stub")) as emu:
        yield emu


def photos(tmp_path: Path, faces: list[Path], n: int) -> None:
    (tmp_path / "photos").mkdir(exist_ok=True)
    for path in faces[:n]:
        shutil.copy(path, tmp_path / "photos" / path.name)


def submits(emulator: object) -> int:
    return int(emulator.stats().requests.get("submit", 0))  # type: ignore[attr-defined]


async def test_manifest_preset_column_and_recorded_recipes(tmp_path: Path, faces: list[Path], emulator: object) -> None:
    """Each row's preset and resolved parameters reach the store, report.json, report.csv and report.html; an
    unknown preset rejects its row alone, naming the manifest line and the field, before anything is paid."""
    photos(tmp_path, faces, 3)
    names = sorted(p.name for p in (tmp_path / "photos").iterdir())
    write(
        tmp_path / "rows.csv",
        "image,preset,mouth_move_strength\n"
        f"photos/{names[0]},news-anchor,\n"
        f"photos/{names[1]},song,0.5\n"
        f"photos/{names[2]},,\n"
        f"photos/{names[2]},sogn,\n",
    )
    config_path = write_batch(tmp_path, emulator.base_url, SPEEDUP)  # type: ignore[attr-defined]
    text = config_path.read_text().replace("  images: photos", "  manifest: rows.csv")
    config_path.write_text(text + "video:\n  preset: presenter\n  video_fps: 20\n")
    config = load_config(config_path)
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    rows = {(r.preset, r.state): r for r in report.items}
    anchor = rows[("news-anchor", ItemState.SUCCEEDED)]
    assert anchor.params == {
        "template_id": "calm",
        "eye_move_freq": 0.5,
        "video_fps": 24,  # a row naming a preset takes its whole look, not the batch's video:
        "mouth_move_strength": 1.0,
        "paste_back": True,
        "head_move_strength": 0.5,
    }
    song = rows[("song", ItemState.SUCCEEDED)]
    assert song.params is not None
    assert (song.params["template_id"], song.params["mouth_move_strength"]) == ("active", 0.5)  # the column wins
    batch = rows[("presenter", ItemState.SUCCEEDED)]
    assert batch.params is not None and batch.params["video_fps"] == 20  # the batch's own key over its preset
    bad = [r for r in report.items if r.state is ItemState.REJECTED_LOCALLY]
    assert len(bad) == 1
    assert bad[0].reason.startswith("rows.csv:5: preset: unknown preset 'sogn'; did you mean `song`?")
    assert submits(emulator) == 3
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["items"]
    assert {r["preset"] for r in saved} == {"news-anchor", "song", "presenter", None}
    with (tmp_path / "out" / "report.csv").open() as fh:
        csv_rows = {r["preset"]: r for r in csv.DictReader(fh)}
    assert json.loads(csv_rows["song"]["params"])["mouth_move_strength"] == 0.5
    assert "recipe" in (tmp_path / "out" / "report.html").read_text()
    async with SqliteStateStore(config.state_path) as store:
        recorded = {row.data["preset"]: row.data["params"] async for row in store.items()}
    assert recorded["song"] == song.params


async def test_a_preset_edited_under_a_batch_keeps_what_was_submitted(
    tmp_path: Path, faces: list[Path], emulator: object
) -> None:
    """Stopped after the first submits, the preset file is edited, and the batch resumed: items already submitted
    keep their recorded parameters (and say so), the others take the new values, and no image is paid twice.
    A third run after another edit pays nothing at all."""
    photos(tmp_path, faces, 6)
    preset = write(tmp_path / "presets" / "look.yaml", "description: ours\nmouth_move_strength: 0.8\n")
    config = load_config(
        write_batch(tmp_path, emulator.base_url, SPEEDUP, video="{preset: look}")  # type: ignore[attr-defined]
    )
    assert config.video.mouth_move_strength == 0.8
    await cancel_after_first_submit(config, KEY)
    assert 1 <= submits(emulator) < 6
    async with SqliteStateStore(config.state_path) as store:  # sent, or about to be (a send may be in flight)
        before = sum([bool(row.data.get("submit_attempts")) async for row in store.items()])
    write(preset, "description: ours, louder\nmouth_move_strength: 1.2\n")
    edited = load_config(tmp_path / "batch.yaml")
    assert edited.video.mouth_move_strength == 1.2
    async with Engine(edited, api_key=KEY) as engine:
        report = await engine.run()
    assert report.ok and len(report.items) == 6
    strengths = sorted(r.params["mouth_move_strength"] for r in report.items if r.params)
    assert strengths == [0.8] * before + [1.2] * (6 - before)
    assert set(emulator.stats().submissions_per_image.values()) == {1}  # type: ignore[attr-defined]
    log = "".join(p.read_text() for p in (tmp_path / "out").glob("lpengine-*.jsonl"))
    assert log.count('"event":"preset.changed_since_submit"') == before
    # every item is finished now: another edit changes nothing and pays nothing
    write(preset, "mouth_move_strength: 0.3\n")
    paid = submits(emulator)
    async with Engine(load_config(tmp_path / "batch.yaml"), api_key=KEY) as engine:
        again = await engine.run()
    assert submits(emulator) == paid
    assert sorted(r.params["mouth_move_strength"] for r in again.items if r.params) == strengths
    assert all(r.resumed for r in again.items)
