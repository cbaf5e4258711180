"""The API client against the emulator over real HTTP: every endpoint, status, error class and retry rule."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
from pydantic import SecretStr

from lpengine.client import DashScopeClient, TaskStatus
from lpengine.config import ApiConfig, FileServerStorageConfig, RateLimitConfig, RetryConfig, VideoParams
from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, run_emulator
from lpengine.errors import AmbiguousSubmitError, ApiError, AuthError, RateLimitedError
from lpengine.media import inspect_audio, inspect_image
from lpengine.storage.base import LocalFile
from lpengine.storage.fileserver import FileServerStorage

pytestmark = pytest.mark.anyio

KEY = "sk-test-client-0123456789"
VOICE = Path(__file__).resolve().parents[2] / "lpengine" / "assets" / "voice.wav"


def _api(**retry: float) -> ApiConfig:
    return ApiConfig(request_timeout_s=5, retry=RetryConfig(**{"attempts": 4, "initial_wait_s": 0.0, **retry}))


@pytest.fixture(scope="module")
def portraits(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from lpengine.demo_assets import make_non_faces, make_portraits

    folder = tmp_path_factory.mktemp("portraits")
    return make_portraits(folder, 4) + make_non_faces(folder, 1)


class World:
    """An emulator plus a loopback file server publishing the test files."""

    def __init__(self, emu: object, files: FileServerStorage) -> None:
        self.emu = emu
        self.files = files

    async def url(self, path: Path) -> str:
        info = inspect_audio(path) if path.suffix == ".wav" else inspect_image(path)
        local = LocalFile(path, info.sha256, info.size, info.content_type, info.suffix)
        return (await self.files.publish(local, model="liveportrait", valid_for=timedelta(hours=1))).url


@pytest.fixture
async def world() -> AsyncIterator[World]:
    # Real-time pace, so task states only move when a test calls advance(): deterministic, and still fast
    # because each test makes a handful of requests.
    settings = EmulatorSettings(api_keys=[KEY], speedup=1.0, seed=7)
    async with run_emulator(settings) as emu, FileServerStorage(FileServerStorageConfig()) as files:
        yield World(emu, files)


async def test_detect_pass_and_fail_are_results(world: World, portraits: list[Path]) -> None:
    """§2: pass:false is HTTP 200 and a result, not an exception."""
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        good = await client.detect(await world.url(portraits[0]))
        bad = await client.detect(await world.url(portraits[-1]))
    assert good.passed and good.message == "" and good.request_id
    assert not bad.passed and "face" in bad.message.lower()


async def test_task_lifecycle_one_running_at_a_time_and_expiry(world: World, portraits: list[Path]) -> None:
    """Submit three tasks: one RUNNING, the rest PENDING; all succeed; URL and task expire (§4, §7)."""
    audio = await world.url(VOICE)
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        ids = [
            (await client.submit(await world.url(p), audio, VideoParams(template_id="calm"))).task_id
            for p in portraits[:3]
        ]
        statuses = [(await client.get_task(t)).status for t in ids]
        assert statuses.count(TaskStatus.RUNNING) <= 1
        assert statuses.count(TaskStatus.PENDING) >= 2
        world.emu.advance(60)  # 3 × ~6 emulated s of run time
        infos = [await client.get_task(t) for t in ids]
        assert all(i.status is TaskStatus.SUCCEEDED for i in infos)
        first = infos[0]
        assert first.video_url and first.video_duration and first.scheduled_time and first.end_time
        # tasks ran one after another
        ordered = sorted(infos, key=lambda i: i.scheduled_time or first.scheduled_time)
        for a, b in itertools.pairwise(ordered):
            assert a.end_time and b.scheduled_time and a.end_time <= b.scheduled_time
        async with client.session.get(first.video_url) as resp:
            body = await resp.read()
            assert resp.status == 200 and body[4:8] == b"ftyp"
        listing = await client.list_tasks()
        assert {e.task_id for e in listing.entries} >= set(ids)
        world.emu.advance(86_400 + 10)  # result URLs live 24 h after the end; tasks 24 h
        async with client.session.get(first.video_url) as resp:
            assert resp.status == 403
        assert (await client.get_task(ids[0])).status is TaskStatus.UNKNOWN


async def test_cancel_only_while_pending(world: World, portraits: list[Path]) -> None:
    """§5: cancel works on PENDING and answers UnsupportedOperation otherwise."""
    audio = await world.url(VOICE)
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        first = await client.submit(await world.url(portraits[0]), audio, VideoParams())
        second = await client.submit(await world.url(portraits[1]), audio, VideoParams())
        assert await client.cancel_task(second.task_id) is True
        assert (await client.get_task(second.task_id)).status is TaskStatus.CANCELED
        world.emu.advance(30)
        assert (await client.get_task(first.task_id)).status is TaskStatus.SUCCEEDED
        assert await client.cancel_task(first.task_id) is False


async def test_failed_task_is_a_result(world: World, portraits: list[Path]) -> None:
    """A FAILED task carries code and message in the answer (HTTP 200)."""
    world.emu.set_faults(FaultSettings(rules=[FaultRule(match="", action="fail_task", code="InternalError.Algo")]))
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        task = await client.submit(await world.url(portraits[0]), await world.url(VOICE), VideoParams())
        world.emu.advance(30)
        info = await client.get_task(task.task_id)
    assert info.status is TaskStatus.FAILED and info.code == "InternalError.Algo" and info.message


async def test_auth_and_bad_request_are_not_retried(
    world: World, portraits: list[Path], tmp_path: Path, fast_retries: None
) -> None:
    """401 and 400 fail at once: exactly one request each reaches the service; the key never shows."""
    async with DashScopeClient(_api(), SecretStr("sk-wrong-key-000"), base_url=world.emu.base_url) as bad:
        with pytest.raises(AuthError) as info:
            await bad.detect(await world.url(portraits[0]))
    assert info.value.code == "InvalidApiKey" and info.value.status == 401 and not info.value.is_retryable
    assert "sk-wrong-key" not in str(info.value) and "sk-wrong-key" not in repr(bad)
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    local = LocalFile(text, "0" * 64, text.stat().st_size, "image/png", ".png")
    url = (await world.files.publish(local, model="m", valid_for=timedelta(hours=1))).url
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        with pytest.raises(ApiError) as err:
            await client.detect(url)
        assert err.value.status == 400 and not err.value.is_retryable
        assert client.retries == 0
    assert world.emu.stats().requests.get("detect", 0) == 2


async def test_a_stopped_caller_sends_no_new_request(world: World, portraits: list[Path]) -> None:
    """Pacing and the in-flight bound take a free slot without yielding; the stop is still seen before a billed call
    leaves."""
    url = await world.url(portraits[0])
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        assert (await client.detect(url)).passed  # a pooled connection: sending would not need to wait for one
        with anyio.CancelScope() as stop:
            stop.cancel()
            await client.detect(url)
        assert stop.cancelled_caught
    assert world.emu.stats().requests.get("detect", 0) == 1


async def test_retryable_errors_are_retried_within_bounds(
    world: World, portraits: list[Path], fast_retries: None
) -> None:
    """429 and 5xx are retried (bounded); the request then succeeds; the limiter slows down after a 429."""
    world.emu.set_faults(
        FaultSettings(
            rules=[
                FaultRule(match="", endpoint="detect", action="error", code="Throttling.RateQuota", times=1),
                FaultRule(match="", endpoint="detect", action="error", code="InternalError", times=1),
            ]
        )
    )
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        result = await client.detect(await world.url(portraits[0]))
        assert result.passed
        assert client.retries == 2
        meter = client.budget.meter("detect").stats()
        assert meter.throttled == 1 and meter.current_qps < 5
    assert world.emu.stats().requests["detect"] == 3
    world.emu.set_faults(
        FaultSettings(rules=[FaultRule(match="", endpoint="detect", action="error", code="Throttling")])
    )
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        with pytest.raises(RateLimitedError):
            await client.detect(await world.url(portraits[0]))
        assert client.retries == 3  # attempts=4: bounded


async def test_lost_submit_answer_is_ambiguous_and_never_resent(
    world: World, portraits: list[Path], fast_retries: None
) -> None:
    """A dropped connection after the service accepted the task raises AmbiguousSubmitError, no second submit."""
    world.emu.set_faults(FaultSettings(rules=[FaultRule(match="", action="lose_submit_response", times=1)]))
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        with pytest.raises(AmbiguousSubmitError):
            await client.submit(await world.url(portraits[0]), await world.url(VOICE), VideoParams())
        listing = await client.list_tasks()
    stats = world.emu.stats()
    assert sum(stats.submissions_per_image.values()) == 1
    assert len(listing.entries) == 1  # the task exists: reconciliation will find it


async def test_dropped_connections_on_idempotent_calls_are_retried(
    world: World, portraits: list[Path], fast_retries: None
) -> None:
    """Network faults on queries are retried transparently."""
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        task = await client.submit(await world.url(portraits[0]), await world.url(VOICE), VideoParams())
        world.emu.set_faults(FaultSettings(rules=[FaultRule(match="", endpoint="task", action="drop", times=2)]))
        info = await client.get_task(task.task_id)
        assert info.task_id == task.task_id
        # aiohttp itself retries a GET once on a dropped keep-alive connection; ours covers the rest
        assert 1 <= client.retries <= 2
    assert world.emu.stats().requests["task"] == 3


async def test_temporary_upload_flow(world: World, portraits: list[Path]) -> None:
    """§8: getPolicy + form upload gives an oss:// URL usable with the resolve header for its model only."""
    async with DashScopeClient(_api(), SecretStr(KEY), base_url=world.emu.base_url) as client:
        policy = await client.get_upload_policy("liveportrait-detect")
        url = await client.upload_temp(policy, portraits[0], "face.png")
        assert url.startswith("oss://")
        assert (await client.detect(url)).passed  # the client adds X-DashScope-OssResourceResolve
        synth = await client.get_upload_policy("liveportrait")
        audio = await client.upload_temp(synth, VOICE, "voice.wav")
        with pytest.raises(ApiError):  # bound to liveportrait-detect, not liveportrait
            await client.submit(url, audio, VideoParams())


async def test_burst_over_quota_is_throttled_but_paced_client_never_is(
    portraits: list[Path], fast_retries: None
) -> None:
    """A burst of submits over 5 QPS earns 429s; the client's own pacing keeps 200 requests at zero 429s."""
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=1.0, seed=1)) as emu:
        unpaced = ApiConfig(
            rate_limits=RateLimitConfig(submit_qps=1000), retry=RetryConfig(attempts=1, initial_wait_s=0)
        )
        async with DashScopeClient(unpaced, SecretStr(KEY), base_url=emu.base_url) as client:
            errors: list[BaseException] = []

            async def one() -> None:
                try:
                    await client.submit("http://127.0.0.1:9/a.png", "http://127.0.0.1:9/a.wav", VideoParams())
                except RateLimitedError as exc:
                    errors.append(exc)
                except ApiError as exc:  # let through, then refused: nothing listens where the inputs are
                    assert exc.code == "InvalidParameter.InputDownloadFailed"

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(one)
        assert errors and emu.stats().throttled.get("submit", 0) == len(errors)
    async with (
        run_emulator(EmulatorSettings(api_keys=[KEY], speedup=25.0, seed=1)) as emu,
        DashScopeClient(_api(), SecretStr(KEY), base_url=emu.base_url, speedup=25) as client,
    ):
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(client.get_task, "no-such-task")
        stats = emu.stats()
        assert stats.requests["task"] == 200
        assert sum(stats.throttled.values()) == 0
