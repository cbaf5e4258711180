"""Inputs given as URLs the user already has: the service fetches them, lpengine never reads them as paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lpengine import Engine, ItemState, load_config
from lpengine.demo_assets import make_portraits
from lpengine.doctor import run_checks
from lpengine.emulator import EmulatorSettings, run_emulator
from tests.helpers import VOICE, write_batch

pytestmark = pytest.mark.anyio

KEY = "sk-test-url-inputs-0123456789"


async def test_the_config_audio_as_a_url_is_left_to_the_service(tmp_path: Path, static_files: tuple[Path, str]) -> None:
    """`audio: https://…` in the batch file once became the path `https:/…` (a path's normpath folds `//`), so
    every item was refused as "does not exist" and `check` failed it too; `Engine.process(audio=URL)` worked."""
    root, url = static_files
    shutil.copy(VOICE, root / "voice.wav")
    (tmp_path / "photos").mkdir()
    make_portraits(tmp_path / "photos", 1)
    settings = EmulatorSettings(api_keys=[KEY], speedup=500.0, video="stub", detector="rule")
    async with run_emulator(settings) as emu:
        storage = "\n  backend: dashscope_temp"
        config = load_config(write_batch(tmp_path, emu.base_url, 500.0, storage=storage, audio=f"{url}/voice.wav"))
        checks = {check.name: check for check in await run_checks(config)}
        async with Engine(config, api_key=KEY) as engine:
            report = await engine.run()
        submitted = emu.stats().requests["submit"]
    assert checks["audio"].ok and "URL" in checks["audio"].detail
    assert [item.state for item in report.items] == [ItemState.SUCCEEDED]
    assert submitted == 1
