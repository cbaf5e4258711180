"""The contract's edges, each against the emulator over real HTTP: what a retried fault leaves in the log, result
URL shapes, task statuses the client does not know, Retry-After, the audio length limit, unreachable inputs."""

from __future__ import annotations

import json
import shutil
import time
import wave
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from lpengine import Engine, ItemState, RunReport, load_config
from lpengine.client import DashScopeClient
from lpengine.client.api import retry_after_s
from lpengine.client.wire import TaskStatus
from lpengine.config import ApiConfig, BatchConfig, RetryConfig
from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, ManualClock, run_emulator
from lpengine.emulator.app import RunningEmulator
from lpengine.emulator.media import FaceDetector, ImageInfo
from lpengine.media import MediaError, inspect_audio
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


# -- result URL shapes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["results", "flat"])
async def test_the_video_url_is_read_nested_or_flat(tmp_path: Path, portraits: list[Path], shape: str) -> None:
    """LivePortrait answers `output.results.video_url`; sibling video models answer a flat `output.video_url`:
    either way the video is downloaded."""
    settings = EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, video="stub", detector="rule", result_shape=shape)
    async with run_emulator(settings) as emu:
        config = make_config(tmp_path, portraits[:2], emu.base_url)
        report = await run_batch(config)
    assert report.counts == {ItemState.SUCCEEDED: 2}
    assert len(list(config.output_dir.glob("*.mp4"))) == 2


async def test_a_success_without_a_video_url_fails_the_item_once_naming_the_task(
    tmp_path: Path, portraits: list[Path]
) -> None:
    """A SUCCEEDED task with neither URL shape: the item fails with the task id in its reason, and neither this
    run nor the next one submits it again (the task was paid; a resubmit would pay again)."""
    settings = EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, video="stub", detector="rule", result_shape="none")
    async with run_emulator(settings) as emu:
        config = make_config(tmp_path, portraits[:1], emu.base_url)
        first = await run_batch(config)
        second = await run_batch(config)
        stats = emu.stats()
    (item,) = first.items
    assert item.state is ItemState.TASK_FAILED
    assert item.task_id is not None and item.task_id in item.reason
    assert "video URL" in item.reason
    assert [r.state for r in second.items] == [ItemState.TASK_FAILED]
    assert list(stats.submissions_per_image.values()) == [1]
    assert not list(config.output_dir.glob("*.mp4"))


# -- task statuses the client does not know --------------------------------------------------------------------


async def test_an_unknown_task_status_is_still_running_and_logged_once_per_task(
    tmp_path: Path, portraits: list[Path]
) -> None:
    """The service names its queued and running states differently (a status the docs do not list): tasks stay
    polled until they succeed, nothing is submitted twice, and each task's odd status is logged once."""
    settings = EmulatorSettings(
        api_keys=[KEY],
        speedup=SPEEDUP,
        video="stub",
        detector="rule",
        realtime_factor=6.0,  # tasks run 4× longer than the client first expects: it looks while they run
        status_aliases={"PENDING": "QUEUED", "RUNNING": "PROCESSING"},
    )
    async with run_emulator(settings) as emu:
        config = make_config(tmp_path, portraits[:3], emu.base_url)
        report = await run_batch(config)
        stats = emu.stats()
    assert report.counts == {ItemState.SUCCEEDED: 3}
    assert sorted(stats.submissions_per_image.values()) == [1, 1, 1]
    logged = events(config, "task.status_unrecognised")
    assert logged, "no task was seen in a status the client does not know"
    per_task = [e["task_id"] for e in logged]
    assert len(per_task) == len(set(per_task)), logged
    assert {e["status"] for e in logged} <= {"QUEUED", "PROCESSING"}


async def test_only_the_literal_unknown_means_gone(tmp_path: Path, portraits: list[Path]) -> None:
    """The documented `UNKNOWN` (purged or expired) still means gone: the item is submitted again, once."""
    settings = EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, video="stub", detector="rule")
    async with run_emulator(settings) as emu:
        emu.set_faults(FaultSettings(rules=[FaultRule(match="", action="unknown_task", times=1)]))
        config = make_config(tmp_path, portraits[:1], emu.base_url)
        report = await run_batch(config)
        stats = emu.stats()
    assert report.counts == {ItemState.SUCCEEDED: 1}
    assert list(stats.submissions_per_image.values()) == [2]
    assert len(events(config, "task.resubmit")) == 1


# -- Retry-After -----------------------------------------------------------------------------------------------


async def test_the_emulator_sends_retry_after_when_it_throttles() -> None:
    """A quota 429 carries `Retry-After` in whole seconds: how long until the quota has room again."""
    settings = EmulatorSettings(api_keys=[KEY], query_qps=1.0)
    async with run_emulator(settings, clock=ManualClock()) as emu, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {KEY}"}
        answers = []
        for _ in range(2):  # the virtual clock stands still: the second query finds the quota spent
            async with http.get(f"{emu.base_url}/tasks/t-1", headers=headers) as resp:
                answers.append((resp.status, resp.headers.get("Retry-After")))
    assert answers[0] == (200, None)
    assert answers[1] == (429, "1")


async def test_retry_after_holds_the_endpoint_before_its_next_call() -> None:
    """After a 429 with `Retry-After: 1` the client's next query waits at least that second, although its own
    backoff is zero."""
    settings = EmulatorSettings(api_keys=[KEY], speedup=1.0, video="stub", detector="rule")
    rule = FaultRule(match="", action="error", code="Throttling", endpoint="task", times=1)
    api = ApiConfig(retry=RetryConfig(attempts=3, initial_wait_s=0, max_wait_s=0))
    async with run_emulator(settings) as emu:
        emu.set_faults(FaultSettings(rules=[rule]))
        async with DashScopeClient(api, SecretStr(KEY), base_url=emu.base_url) as client:
            started = time.monotonic()
            info = await client.get_task("no-such-task")
            waited = time.monotonic() - started
        throttled = emu.stats().throttled
    assert info.status is TaskStatus.UNKNOWN
    assert (client.retries, throttled) == (1, {"task": 1})
    assert waited >= 1.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 0 ", 0.0),
        ("Wed, 21 Oct 2026 07:28:05 GMT", 5.0),
        ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0),  # a date already past: no wait
        ("soon", None),
        ("-1", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_reads_seconds_or_an_http_date(header: str | None, seconds: float | None) -> None:
    now = datetime(2026, 10, 21, 7, 28, 0, tzinfo=UTC).timestamp()
    assert retry_after_s(header, now=now) == seconds


# -- the audio length limit ----------------------------------------------------------------------------------------


def _wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(b"\x80" * round(seconds * rate))
    return path


async def test_audio_of_exactly_180_s_is_refused_locally_and_by_the_emulator(
    portraits: list[Path], static_files: tuple[Path, str]
) -> None:
    """The contract reads `1s < duration < 3min`: 179.9 s passes, 180.0 s and 180.1 s are refused, and the local
    check (which runs before anything is paid) agrees with the emulator at each length."""
    root, url = static_files
    shutil.copy(portraits[0], root / "face.png")
    settings = EmulatorSettings(api_keys=[KEY], submit_qps=1000.0, video="stub", detector="rule")
    emulator_verdicts, local_verdicts = {}, {}
    async with run_emulator(settings, clock=ManualClock()) as emu, aiohttp.ClientSession() as http:
        for seconds in (179.9, 180.0, 180.1):
            name = f"voice-{seconds}.wav"
            local = _wav(root / name, seconds)
            try:
                local_verdicts[seconds] = inspect_audio(local).duration_s == pytest.approx(seconds)
            except MediaError:
                local_verdicts[seconds] = False
            body = {"model": "liveportrait", "input": {"image_url": f"{url}/face.png", "audio_url": f"{url}/{name}"}}
            headers = {"Authorization": f"Bearer {KEY}", "X-DashScope-Async": "enable"}
            async with http.post(
                f"{emu.base_url}/services/aigc/image2video/video-synthesis", json=body, headers=headers
            ) as resp:
                answer = await resp.json()
            emulator_verdicts[seconds] = resp.status == 200
            if resp.status != 200:
                assert (resp.status, answer["code"]) == (400, "InvalidFile.AudioLengthError")
    assert local_verdicts == emulator_verdicts == {179.9: True, 180.0: False, 180.1: False}


# -- unreachable inputs ----------------------------------------------------------------------------------------


async def test_an_audio_url_the_service_cannot_download_fails_the_item_with_a_clear_message(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, closed_port_url: str
) -> None:
    """§6's synchronous `InvalidParameter.InputDownloadFailed` at submit: no task is created, and the item's reason
    names the URL and the likely causes (a private bucket, an expired link)."""
    dead = closed_port_url.removesuffix("/gone.png")
    audio = f"{dead}/voice.wav?Expires=1&Signature=abc"
    config = make_config(tmp_path, [], emulator.base_url)
    async with Engine(config, api_key=KEY) as engine:
        item = await engine.process(portraits[0], audio=audio)
    assert item.state is ItemState.SUBMIT_FAILED
    assert item.reason.startswith("the service could not download the image oss://")
    assert f" or the audio {dead}/voice.wav: " in item.reason
    assert "is the bucket private / the link expired?" in item.reason
    assert "Signature" not in item.reason  # a signed URL's query is not repeated in reports
    assert item.task_id is None
    stats = emulator.stats()
    assert stats.tasks_by_status == {} and stats.requests["submit"] == 1  # refused at once, not retried


async def test_an_image_url_the_service_cannot_download_fails_at_detect_with_a_clear_message(
    tmp_path: Path, emulator: RunningEmulator, closed_port_url: str
) -> None:
    config = make_config(tmp_path, [], emulator.base_url)
    async with Engine(config, api_key=KEY) as engine:
        result = await engine.process(closed_port_url)
    assert result.state is ItemState.DETECT_FAILED
    assert result.reason.startswith(f"the service could not download the image {closed_port_url}: ")
    assert emulator.stats().requests["detect"] == 1
