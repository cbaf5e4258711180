"""The money rules end to end, counted by the emulator (what the service itself was paid for): one file is paid
once however many paths reach it; a finished item is never paid again because other files appeared; an error
answer never leaves a write-ahead mark that would skip the paid face check."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from lpengine import Engine, ItemState, load_config
from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, run_emulator
from lpengine.emulator.app import RunningEmulator
from lpengine.errors import AuthError, QuotaError
from lpengine.stages.detect import LOST_VERDICT
from tests.helpers import write_batch

pytestmark = pytest.mark.anyio

KEY = "sk-test-paid-once-0123456789"
SPEEDUP = 200.0


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, seed=5, video="stub")) as emu:
        yield emu


@pytest.fixture(scope="module")
def portraits(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from lpengine.demo_assets import make_portraits

    return make_portraits(tmp_path_factory.mktemp("faces"), 3)


def paid(emulator: RunningEmulator) -> tuple[int, int]:
    stats = emulator.stats()
    return sum(stats.detect_per_image.values()), sum(stats.submissions_per_image.values())


async def test_a_photo_reached_by_many_paths_is_paid_once(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator
) -> None:
    """`photos/**/*.jpg` with `photos/x → .` and `photos/sub/up → ..` paid each photo ~40 times (or planned
    forever); now each is detected and rendered once, and each link is one refused line."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(portraits[0], photos / "one.jpg")
    shutil.copy(portraits[1], photos / "sub" / "two.jpg")
    (photos / "x").symlink_to(".")
    (photos / "sub" / "up").symlink_to("..")
    config = load_config(write_batch(tmp_path, emulator.base_url, SPEEDUP))
    config = config.model_copy(update={"inputs": config.inputs.model_copy(update={"images": "photos/**/*.jpg"})})
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    assert Counter(r.state for r in report.items) == {ItemState.SUCCEEDED: 2, ItemState.REJECTED_LOCALLY: 2}
    assert all("symlink loop" in r.reason for r in report.items if r.state is ItemState.REJECTED_LOCALLY)
    assert paid(emulator) == (2, 2)
    assert max(emulator.stats().submissions_per_image.values()) == 1


async def test_a_finished_item_is_not_paid_again_when_another_file_takes_its_stem(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator
) -> None:
    """`a.png` finished as `a.mp4`; adding `a.jpg` (sorted first) re-submitted `a.png` as a new item `a_png`.
    Now `a.png` stays `a` and finished, and only `a.jpg` is paid, as `a_jpg`."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(portraits[0]).save(photos / "a.png")
    config = load_config(write_batch(tmp_path, emulator.base_url, SPEEDUP))
    async with Engine(config, api_key=KEY) as engine:
        first = await engine.run()
    assert [Path(r.output or "").name for r in first.items] == ["a.mp4"]
    assert paid(emulator) == (1, 1)
    shutil.copy(portraits[1], photos / "a.jpg")
    async with Engine(config, api_key=KEY) as engine:
        second = await engine.run()
    outputs = {Path(r.input).name: (Path(r.output or "").name, r.resumed) for r in second.items}
    assert outputs == {"a.png": ("a.mp4", True), "a.jpg": ("a_jpg.mp4", False)}
    assert paid(emulator) == (2, 2)


@pytest.mark.parametrize("refusal", ["wrong key", "arrears"])
async def test_a_detect_refused_for_the_account_clears_its_mark_so_the_next_run_detects(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, refusal: str
) -> None:
    """A wrong key (or arrears) left the detect's write-ahead mark behind: after the fix, the images went to synthesis
    unchecked and the report blamed "an interrupted run". An error answer holds no verdict: the mark goes, the next
    run pays the face check, and the lost-answer rule stays for truly unknown outcomes only."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(portraits[0], photos / "a.jpg")
    # a local file server: the detect is the first request the key signs (a temporary upload would be refused first)
    config = load_config(write_batch(tmp_path, emulator.base_url, SPEEDUP, storage="\n  backend: fileserver"))
    if refusal == "arrears":
        emulator.set_faults(
            FaultSettings(rules=[FaultRule(match="", action="error", code="Arrearage", endpoint="detect")])
        )
    with pytest.raises(AuthError if refusal == "wrong key" else QuotaError):
        async with Engine(config, api_key="sk-wrong" if refusal == "wrong key" else KEY) as engine:
            await engine.run()
    emulator.set_faults(FaultSettings())
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    [result] = report.items
    assert result.state is ItemState.SUCCEEDED
    assert result.detect_message != LOST_VERDICT
    assert sum(emulator.stats().detect_per_image.values()) == 1


async def test_a_hard_linked_copy_is_one_item(tmp_path: Path, portraits: list[Path], emulator: RunningEmulator) -> None:
    """Two names of one file (a hard link) are one item: rendered and paid once."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(portraits[0], photos / "b.jpg")
    os.link(photos / "b.jpg", photos / "a.jpg")
    config = load_config(write_batch(tmp_path, emulator.base_url, SPEEDUP))
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    assert [r.state for r in report.items] == [ItemState.SUCCEEDED]
    assert paid(emulator) == (1, 1)
