"""The contract's edges, each against the emulator over real HTTP: what a retried fault leaves in the log, result
URL shapes, task statuses the client does not know, Retry-After, the audio length limit, unreachable inputs."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from lpengine import Engine, ItemState, RunReport, load_config
from lpengine.config import BatchConfig
from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, run_emulator
from lpengine.emulator.app import RunningEmulator
from lpengine.emulator.media import FaceDetector, ImageInfo
from tests.helpers import VOICE, write_batch

pytestmark = pytest.mark.anyio

KEY = "sk-test-edges-0123456789"
SPEEDUP = 500.0


@pytest.fixture(scope="module")
def portraits(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from lpengine.demo_assets import make_portraits

    return make_portraits(tmp_path_factory.mktemp("portraits"), 3)


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    settings = EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, seed=3, video="stub", detector="rule")
    async with run_emulator(settings) as emu:
        yield emu


def make_config(tmp_path: Path, images: list[Path], base_url: str, *, audio: Path | str = VOICE) -> BatchConfig:
    (tmp_path / "photos").mkdir(exist_ok=True)
    for image in images:
        shutil.copy(image, tmp_path / "photos" / image.name)
    storage = "\n  backend: dashscope_temp"
    return load_config(write_batch(tmp_path, base_url, SPEEDUP, storage=storage, audio=audio))


async def run_batch(config: BatchConfig) -> RunReport:
    async with Engine(config, api_key=KEY) as engine:
        return await engine.run()


def events(config: BatchConfig, name: str) -> list[dict[str, Any]]:
    """The batch's JSONL log lines of one event."""
    lines = [
        json.loads(line) for log in config.output_dir.glob("lpengine-*.jsonl") for line in log.read_text().splitlines()
    ]
    return [line for line in lines if line["event"] == name]


# -- a retried fault is a log event, not a traceback -------------------------------------------------------------


async def test_a_retried_request_is_one_event_naming_the_item_and_the_attempt(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator
) -> None:
    """A 500 on one item's detect: the item succeeds on its second attempt, and the log says which item and which
    attempt, with the error, in one structured event."""
    emulator.set_faults(FaultSettings(rules=[FaultRule(match="", action="error", endpoint="detect", times=1)]))
    config = make_config(tmp_path, portraits[:1], emulator.base_url)
    report = await run_batch(config)
    assert report.counts == {ItemState.SUCCEEDED: 1}
    retries = events(config, "request.retry")
    assert len(retries) == 1, retries
    (retry,) = retries
    assert retry["item"] == Path(report.items[0].input).stem
    assert (retry["stage"], retry["attempt"]) == ("detect", 2)
    assert retry["error"].startswith("ServerError: InternalError")
    assert "exc_info" not in retry


async def test_an_emulator_bug_is_a_500_and_one_log_line(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception inside the emulator (like OpenCV's import race) answers the service's 500 `InternalError`,
    which the client retries; the emulator logs one `emulator.internal_error` event (the traceback rides along
    as `exc_info`, which only debug rendering shows)."""
    calls = 0
    has_face = FaceDetector.has_face

    def flaky(self: FaceDetector, image: ImageInfo, url: str) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ModuleNotFoundError("No module named 'cv2.data'; 'cv2' is not a package")
        return has_face(self, image, url)

    monkeypatch.setattr(FaceDetector, "has_face", flaky)
    config = make_config(tmp_path, portraits[:1], emulator.base_url)
    with capture_logs() as logged:
        report = await run_batch(config)
    assert report.counts == {ItemState.SUCCEEDED: 1}
    bugs = [e for e in logged if e["event"] == "emulator.internal_error"]
    assert len(bugs) == 1 and "cv2.data" in bugs[0]["error"] and bugs[0]["path"].endswith("/face-detect")
    (retry,) = events(config, "request.retry")
    assert (retry["stage"], retry["attempt"]) == ("detect", 2)
    assert retry["error"].startswith("ServerError: InternalError: An internal error has occured")
