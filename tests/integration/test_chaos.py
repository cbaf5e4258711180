"""Chaos: every fault the service (or storage) can throw at a batch, over real HTTP, one deterministic rule at a time.

For each fault the batch must finish with every item in the right terminal state and the right reason, retries
within their configured bounds (counted by the client and by the emulator), request counts proportional to the
items (no busy loop), no corrupt or partial file on disk, and no task paid twice. Faults are `FaultRule`s with
`times=` (or matched to one image by its sha256, which every published URL contains), so each run is the same.
Backoff sleeps are skipped (`fast_retries`); nothing waits on a timer to observe anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import botocore.retries.standard
import pytest
from aiohttp import web
from pydantic import SecretStr

from lpengine import Engine, ItemState, RunReport, load_config
from lpengine.client import DashScopeClient
from lpengine.client.limits import MeterStats
from lpengine.config import ApiConfig, BatchConfig, RetryConfig, VideoParams
from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, run_emulator
from lpengine.emulator.app import RunningEmulator
from lpengine.errors import AmbiguousSubmitError, NetworkError
from lpengine.media import verify_mp4
from lpengine.models import ItemResult
from lpengine.stages.context import ProgressEvent
from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, unique_bucket_name

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-chaos-0123456789"
VOICE = ROOT / "lpengine" / "assets" / "voice.wav"
SPEEDUP = 500.0
ATTEMPTS = 4  # api.retry.attempts in every batch here: the bound each retried request must respect
MAX_SUBMITS = 3  # state.max_submit_attempts (the default)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def portraits(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from lpengine.demo_assets import make_portraits

    return make_portraits(tmp_path_factory.mktemp("portraits"), 8)


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    settings = EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, seed=11, video="stub", detector="rule")
    async with run_emulator(settings) as emu:
        yield emu


def make_config(
    tmp_path: Path,
    images: list[Path],
    base_url: str,
    *,
    storage: str = "backend: dashscope_temp",
    request_timeout_s: float = 5.0,
    extra: str = "",
) -> BatchConfig:
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for image in images:
        shutil.copy(image, photos / image.name)
    (tmp_path / "batch.yaml").write_text(
        f"""
inputs:
  images: photos
audio: {VOICE}
api:
  base_url: {base_url}
  speedup: {SPEEDUP}
  request_timeout_s: {request_timeout_s}
  retry:
    attempts: {ATTEMPTS}
    initial_wait_s: 0
    max_wait_s: 0
storage:
  {storage}
concurrency:
  submit_window: 4
output:
  dir: out
{extra}
"""
    )
    return load_config(tmp_path / "batch.yaml")


def with_timeout(config: BatchConfig, seconds: float) -> BatchConfig:
    return config.model_copy(update={"api": config.api.model_copy(update={"request_timeout_s": seconds})})


@dataclass
class Outcome:
    report: RunReport
    engine: Engine
    by_name: dict[str, ItemResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {Path(r.input).name: r for r in self.report.items}

    def state(self, image: Path) -> ItemState:
        return self.by_name[image.name].state

    def reason(self, image: Path) -> str:
        return self.by_name[image.name].reason

    @property
    def counts(self) -> Counter[ItemState]:
        return Counter(r.state for r in self.report.items)

    def meter(self, family: str) -> MeterStats:
        return self.engine.ctx.api.budget.meter(family).stats()


async def run_batch(config: BatchConfig, **kwargs: Any) -> Outcome:
    async with Engine(config, api_key=KEY, **kwargs) as engine:
        report = await engine.run()
    return Outcome(report, engine)


def assert_clean_output(config: BatchConfig, succeeded: int) -> None:
    """Every MP4 on disk is whole and verified, one per succeeded item; no partial download is left anywhere."""
    out = config.output_dir
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == succeeded
    for video in videos:
        verify_mp4(video)
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def assert_proportional(emu: RunningEmulator, items: int, submissions: int) -> None:
    """No busy loop: every endpoint's request count stays within a small multiple of the work done."""
    requests = emu.stats().requests
    assert requests.get("detect", 0) <= items * ATTEMPTS, requests
    assert requests.get("submit", 0) <= submissions + items * ATTEMPTS, requests
    # about one query per task when the finish is predicted well; a few more for compressed time, never a loop
    assert requests.get("task", 0) <= 6 * submissions + 4 * ATTEMPTS, requests
    assert requests.get("list", 0) <= 2 * items * ATTEMPTS, requests
    assert requests.get("download", 0) <= items * ATTEMPTS, requests


# -- throttling, server errors, dropped connections ---------------------------------------------------------------


@pytest.mark.parametrize("code", ["Throttling", "Throttling.RateQuota", "Throttling.BurstRate"])
async def test_429_bursts_are_retried_within_bounds_and_slow_the_client(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None, code: str
) -> None:
    """Bursts of 429 on detect, submit, task queries and upload policies: every item still succeeds, each 429
    costs exactly one retry, and the throttled families pace themselves down (RateMeter)."""
    bursts = {"detect": 3, "submit": 3, "task": 3, "policy": 2}
    emulator.set_faults(
        FaultSettings(
            rules=[FaultRule(match="", action="error", code=code, endpoint=ep, times=n) for ep, n in bursts.items()]
        )
    )
    config = make_config(tmp_path, portraits[:4], emulator.base_url)
    outcome = await run_batch(config)

    assert outcome.counts == {ItemState.SUCCEEDED: 4}
    stats = emulator.stats()
    assert stats.faults["error"] == sum(bursts.values())
    assert {ep: stats.throttled.get(ep, 0) for ep in bursts} == bursts  # only the injected ones: pacing held
    assert outcome.report.retries == sum(bursts.values())  # one retry per 429, none exhausted
    assert outcome.report.throttled == sum(bursts.values())
    rl = config.api.rate_limits
    base = {"detect": rl.detect_qps, "submit": rl.submit_qps, "query": rl.query_qps, "upload": rl.upload_policy_qps}
    for family, endpoint in (("detect", "detect"), ("submit", "submit"), ("query", "task"), ("upload", "policy")):
        meter = outcome.meter(family)
        assert meter.throttled == bursts[endpoint]
        assert meter.current_qps < base[family] * SPEEDUP  # slowed by the 429s, recovering on successes
    assert set(stats.submissions_per_image.values()) == {1}
    assert_proportional(emulator, 4, 4)
    assert_clean_output(config, 4)


async def test_5xx_and_dropped_connections_on_every_endpoint(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """500/503 answers and connections closed without an answer, on every endpoint: all items succeed, nothing is
    submitted twice (a dropped submit is reconciled through the task list before anything is resent)."""
    errors = {"detect": 2, "submit": 2, "task": 2, "policy": 1, "upload": 2, "list": 1, "download": 2}
    drops = {"detect": 1, "submit": 1, "task": 2, "policy": 1, "upload": 1, "list": 1, "download": 2}
    rules = [
        FaultRule(match="", action="error", code="InternalError" if i % 2 else "ModelUnavailable", endpoint=ep, times=n)
        for i, (ep, n) in enumerate(errors.items())
    ] + [FaultRule(match="", action="drop", endpoint=ep, times=n) for ep, n in drops.items()]
    emulator.set_faults(FaultSettings(rules=rules))
    config = make_config(tmp_path, portraits[:4], emulator.base_url)
    outcome = await run_batch(config)

    assert outcome.counts == {ItemState.SUCCEEDED: 4}, outcome.report.items
    stats = emulator.stats()
    # every fault fired (the list ones because the dropped submit made the engine reconcile)
    assert stats.faults["drop"] == sum(drops.values())
    assert stats.faults["error"] == sum(errors.values())
    assert set(stats.submissions_per_image.values()) == {1}, "a dropped submit was resent blindly"
    assert sum(stats.tasks_by_status.values()) == 4  # no orphan task was created
    assert stats.requests["download"] == 4 + errors["download"] + drops["download"]
    # API retries: one per fault on the idempotent endpoints (downloads retry on their own; a dropped submit is
    # not retried by the client but reconciled, then sent again as a new attempt)
    # (aiohttp itself resends an idempotent GET once when a reused keep-alive connection is dropped, so drops on
    # GET endpoints may cost a request without a counted retry)
    api_errors = sum(n for ep, n in errors.items() if ep != "download")
    post_drops = drops["detect"] + drops["upload"]
    get_drops = drops["task"] + drops["policy"] + drops["list"]
    assert api_errors + post_drops <= outcome.report.retries <= api_errors + post_drops + get_drops
    assert sum(r.submit_attempts for r in outcome.report.items) == 4 + drops["submit"]
    assert_proportional(emulator, 4, 4)
    assert_clean_output(config, 4)


async def test_persistent_errors_end_items_in_the_stage_that_failed(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """An image whose requests always fail ends in the failing stage's state, after exactly `attempts` requests;
    the others go on. Each failure is transient: a re-run tries again."""
    upload_bad, detect_bad, submit_bad, ok = portraits[:4]
    emulator.set_faults(
        FaultSettings(
            rules=[
                FaultRule(match=sha(upload_bad), action="error", code="InternalError", endpoint="upload"),
                FaultRule(match=sha(detect_bad), action="drop", endpoint="detect"),
                FaultRule(match=sha(submit_bad), action="error", code="ModelUnavailable", endpoint="submit"),
            ]
        )
    )
    config = make_config(tmp_path, [upload_bad, detect_bad, submit_bad, ok], emulator.base_url)
    outcome = await run_batch(config)

    assert outcome.state(upload_bad) is ItemState.UPLOAD_FAILED
    assert "temporary upload failed" in outcome.reason(upload_bad) and "InternalError" in outcome.reason(upload_bad)
    assert outcome.state(detect_bad) is ItemState.DETECT_FAILED
    assert "did not answer after retries" in outcome.reason(detect_bad)
    assert outcome.state(submit_bad) is ItemState.SUBMIT_FAILED
    assert "ModelUnavailable" in outcome.reason(submit_bad)
    assert outcome.state(ok) is ItemState.SUCCEEDED
    stats = emulator.stats()
    assert stats.faults["error"] == 2 * ATTEMPTS  # exactly the bound, for each of the two erroring images
    assert stats.faults["drop"] == ATTEMPTS
    assert stats.requests["submit"] == 1 + ATTEMPTS
    assert_clean_output(config, 1)

    # transient: the re-run retries those three, and with the faults gone they succeed
    emulator.set_faults(FaultSettings())
    again = await run_batch(config)
    assert again.counts == {ItemState.SUCCEEDED: 4}
    assert set(emulator.stats().submissions_per_image.values()) == {1}
    assert_clean_output(config, 4)


async def test_lost_submit_responses_are_adopted_never_paid_twice(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """The service queues the task but the answer is lost: the engine finds it in the task list and adopts it."""
    emulator.set_faults(FaultSettings(rules=[FaultRule(match="", action="lose_submit_response", times=3)]))
    config = make_config(tmp_path, portraits[:5], emulator.base_url)
    outcome = await run_batch(config)

    assert outcome.counts == {ItemState.SUCCEEDED: 5}
    stats = emulator.stats()
    assert stats.faults["lose_submit_response"] == 3
    assert stats.requests["submit"] == 5  # nothing was resent
    assert set(stats.submissions_per_image.values()) == {1}
    assert 1 <= stats.requests["list"] <= 3  # one reconciliation per lost answer, one page each
    assert all(r.submit_attempts == 1 for r in outcome.report.items)
    assert_proportional(emulator, 5, 5)
    assert_clean_output(config, 5)


async def foreign_tasks(client: DashScopeClient, image: Path, n: int) -> str:
    """Submit `n` tasks of someone else on the account (another program, the console); returns their image's sha.
    Their inputs are temporary uploads the service can fetch, the image named `noface-*`: the rule detector finds
    no face, so each task fails at once (InvalidImage.NoHumanFace) without taking the runner's time."""
    urls = []
    for path, name in ((image, "noface-foreign.png"), (VOICE, "voice.wav")):
        urls.append(await client.upload_temp(await client.get_upload_policy("liveportrait"), path, name))
    for _ in range(n):
        await client.submit(urls[0], urls[1], VideoParams())
    return sha(image)


async def test_reconciling_reads_only_the_recent_task_list_not_the_whole_day(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """An account with hundreds of older tasks: reconciling a lost answer reads the newest page(s) of the task list
    back to the lost send, not every page of the last 24 h, so list requests grow with lost answers, not with the
    account's history."""
    foreign_api = ApiConfig(retry=RetryConfig(attempts=1))
    async with DashScopeClient(foreign_api, SecretStr(KEY), base_url=emulator.base_url, speedup=SPEEDUP) as client:
        foreign = await foreign_tasks(client, portraits[-1], 250)  # other work on the account earlier today
    emulator.advance(3000)
    images = portraits[:5]
    emulator.set_faults(
        FaultSettings(rules=[FaultRule(match=sha(p), action="lose_submit_response", times=1) for p in images[2:]])
    )
    config = make_config(tmp_path, images, emulator.base_url)
    config = config.model_copy(  # in folder order: the lost ones come after tasks the batch knows
        update={"concurrency": config.concurrency.model_copy(update={"upload": 1, "detect": 1, "submit": 1})}
    )
    outcome = await run_batch(config)
    assert outcome.counts == {ItemState.SUCCEEDED: 5}
    stats = emulator.stats()
    assert stats.faults["lose_submit_response"] == 3
    assert stats.requests["list"] == 3  # one page each, although the day's list has 3 pages
    assert stats.submissions_per_image.pop(foreign) == 250
    assert set(stats.submissions_per_image.values()) == {1}


async def test_ambiguous_lost_submit_is_retried_by_the_rerun_not_abandoned(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """A lost answer while a foreign task sits in the account and no task of the batch is known yet: the engine
    cannot tell which task is its own, so it pays nothing more and ends the item `submit_failed` (transient); the
    re-run, calibrated by the batch's other tasks, adopts the right task: its video is collected, not abandoned."""
    first, *others = portraits[:3]
    foreign_api = ApiConfig(retry=RetryConfig(attempts=1))
    async with DashScopeClient(foreign_api, SecretStr(KEY), base_url=emulator.base_url) as client:
        foreign = await foreign_tasks(client, portraits[-1], 1)
    emulator.advance(3000)  # the foreign task is well older than anything the batch sends
    emulator.set_faults(FaultSettings(rules=[FaultRule(match=sha(first), action="lose_submit_response", times=1)]))
    config = make_config(tmp_path, [first, *others], emulator.base_url)
    # one worker per stage: items reach submit in folder order, so `first` is lost before any task is known
    config = config.model_copy(
        update={"concurrency": config.concurrency.model_copy(update={"upload": 1, "detect": 1, "submit": 1})}
    )
    outcome = await run_batch(config)
    assert outcome.state(first) is ItemState.SUBMIT_FAILED
    assert "not resubmitting to avoid paying twice" in outcome.reason(first)
    assert all(outcome.state(p) is ItemState.SUCCEEDED for p in others)

    again = await run_batch(config)
    assert again.counts == {ItemState.SUCCEEDED: 3}
    assert again.by_name[first.name].submit_attempts == 1
    stats = emulator.stats()
    assert stats.requests["submit"] == 1 + 3  # the foreign one and one per item: nothing resent
    assert stats.submissions_per_image.pop(foreign) == 1
    assert set(stats.submissions_per_image.values()) == {1}
    assert_clean_output(config, 3)


async def test_upload_policy_expiring_during_retries_is_fetched_again(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator
) -> None:
    """A temporary upload fails once and its retry comes after the upload policy expired (300 emulated s): the
    policy is fetched again and the item goes on, instead of failing on `AccessDenied: Policy expired`."""
    image = portraits[0]
    emulator.set_faults(FaultSettings(rules=[FaultRule(match="", action="error", endpoint="upload", times=1)]))
    config = make_config(tmp_path, [image], emulator.base_url)
    # real backoff here: its first wait (1 s) outlasts the policy (300 emulated s = 0.6 s at this speedup)
    retry = config.api.retry.model_copy(update={"initial_wait_s": 1.0, "max_wait_s": 1.0})
    config = config.model_copy(update={"api": config.api.model_copy(update={"retry": retry})})
    outcome = await run_batch(config)
    assert outcome.state(image) is ItemState.SUCCEEDED, outcome.reason(image)
    assert emulator.stats().requests["policy"] >= 2
    assert_clean_output(config, 1)


# -- answers slower than the client's timeout ---------------------------------------------------------------------


async def test_client_timeouts_are_bounded_and_a_timed_out_submit_is_never_resent(
    emulator: RunningEmulator, fast_retries: None
) -> None:
    """Every answer comes after the client's timeout: an idempotent query is tried exactly `attempts` times, then
    NetworkError; a submit is sent once and reported ambiguous (it may have created a task)."""
    emulator.set_faults(FaultSettings(latency_s=0.4))
    api = ApiConfig(request_timeout_s=0.15, retry=RetryConfig(attempts=ATTEMPTS, initial_wait_s=0))
    async with DashScopeClient(api, SecretStr(KEY), base_url=emulator.base_url, speedup=SPEEDUP) as client:
        with pytest.raises(NetworkError, match="TimeoutError"):
            await client.get_task("no-such-task")
        assert client.retries == ATTEMPTS - 1
        with pytest.raises(AmbiguousSubmitError):
            await client.submit("http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/a.wav", VideoParams())
        assert client.retries == ATTEMPTS - 1  # the submit was not retried
    requests = emulator.stats().requests
    assert requests["task"] == ATTEMPTS
    assert requests["submit"] == 1


async def test_unresponsive_service_fails_items_transiently_then_resumes(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """The service answers nothing in time: each item ends `detect_failed` (transient) after `attempts` tries,
    nothing is submitted; once the service is back, the same command completes the batch."""
    emulator.set_faults(FaultSettings(latency_s=0.4))
    config = make_config(
        tmp_path, portraits[:3], emulator.base_url, storage="backend: fileserver", request_timeout_s=0.15
    )
    outcome = await run_batch(config)
    assert outcome.counts == {ItemState.DETECT_FAILED: 3}
    assert all("did not answer after retries" in r.reason for r in outcome.report.items)
    assert outcome.report.retries == 3 * (ATTEMPTS - 1)
    stats = emulator.stats()
    assert stats.requests["detect"] == 3 * ATTEMPTS
    assert stats.requests.get("submit", 0) == 0

    emulator.set_faults(FaultSettings())
    again = await run_batch(with_timeout(config, 5))
    assert again.counts == {ItemState.SUCCEEDED: 3}
    assert_clean_output(config, 3)


async def test_submit_timeout_is_reconciled_on_the_next_run_not_paid_twice(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """The service turns slow right when the submit goes out: its answer and the task list time out, so the item
    ends `submit_failed` (transient) keeping its in-flight mark; the re-run adopts the task the slow submit made."""
    image = portraits[0]
    config = make_config(tmp_path, [image], emulator.base_url, storage="backend: fileserver", request_timeout_s=0.15)

    def slow_down_after_detect(event: ProgressEvent) -> None:
        if event.stage.value == "detect" and event.state is None:
            emulator.set_faults(FaultSettings(latency_s=0.3))

    first = await run_batch(config, on_event=slow_down_after_detect)
    [result] = first.report.items
    assert result.state is ItemState.SUBMIT_FAILED, result
    assert "task list could not be read" in result.reason
    assert "internal error" not in result.reason
    assert emulator.stats().requests["submit"] == 1
    emulator.set_faults(FaultSettings())
    # the slow submit did create a task at the service: its answer just came too late
    assert emulator.stats().submissions_per_image == {sha(image): 1}

    again = await run_batch(with_timeout(config, 5))
    assert again.counts == {ItemState.SUCCEEDED: 1}
    stats = emulator.stats()
    assert stats.requests["submit"] == 1, "the re-run resubmitted instead of adopting the task"
    assert stats.submissions_per_image == {sha(image): 1}
    assert_clean_output(config, 1)


# -- downloads --------------------------------------------------------------------------------------------------


async def test_truncated_and_corrupt_downloads_are_refetched_or_failed_never_kept(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """A cut or garbled MP4 is never kept: once → fetched again and verified; always → `download_failed` after
    `attempts` fetches, with no file (whole or partial) left behind."""
    cut_once, bad_once, cut_always, bad_always, fine = portraits[:5]
    emulator.set_faults(
        FaultSettings(
            rules=[
                FaultRule(match=sha(cut_once), action="truncate_download", times=1),
                FaultRule(match=sha(bad_once), action="corrupt_download", times=1),
                FaultRule(match=sha(cut_always), action="truncate_download"),
                FaultRule(match=sha(bad_always), action="corrupt_download"),
            ]
        )
    )
    config = make_config(tmp_path, [cut_once, bad_once, cut_always, bad_always, fine], emulator.base_url)
    outcome = await run_batch(config)

    for image in (cut_once, bad_once, fine):
        assert outcome.state(image) is ItemState.SUCCEEDED
    assert outcome.state(cut_always) is ItemState.DOWNLOAD_FAILED
    assert "download failed after retries" in outcome.reason(cut_always)
    assert outcome.state(bad_always) is ItemState.DOWNLOAD_FAILED
    assert "not a valid MP4" in outcome.reason(bad_always)
    stats = emulator.stats()
    assert stats.faults["truncate_download"] == 1 + ATTEMPTS
    assert stats.faults["corrupt_download"] == 1 + ATTEMPTS
    assert stats.requests["download"] == 3 + 2 + 2 * ATTEMPTS
    assert not (config.output_dir / f"{cut_always.stem}.mp4").exists()
    assert not (config.output_dir / f"{bad_always.stem}.mp4").exists()
    assert_clean_output(config, 3)


async def test_expired_result_url_fails_the_download_and_the_rerun_submits_again(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """A result URL already expired: `download_failed` with the reason, one fetch only (403 is final); as the
    message promises, the re-run submits the item again and gets the video."""
    expired, fine = portraits[:2]
    emulator.set_faults(FaultSettings(rules=[FaultRule(match=sha(expired), action="expire_result", times=1)]))
    config = make_config(tmp_path, [expired, fine], emulator.base_url)
    outcome = await run_batch(config)
    assert outcome.state(fine) is ItemState.SUCCEEDED
    assert outcome.state(expired) is ItemState.DOWNLOAD_FAILED
    assert "expired" in outcome.reason(expired) and "re-run submits" in outcome.reason(expired)
    assert emulator.stats().requests["download"] == 2

    again = await run_batch(config)
    assert again.counts == {ItemState.SUCCEEDED: 2}
    assert again.by_name[expired.name].submit_attempts == 2
    assert emulator.stats().submissions_per_image == {sha(expired): 2, sha(fine): 1}
    assert_clean_output(config, 2)


# -- task outcomes ----------------------------------------------------------------------------------------------


async def test_failed_and_unknown_tasks_resubmit_within_bounds(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """Retryable task failures (InternalError.*) and UNKNOWN tasks are resubmitted up to
    `state.max_submit_attempts`; a permanent code is final at once. A re-run pays for none of the final ones."""
    algo_once, algo_always, permanent, unknown_once, unknown_always, fine = portraits[:6]
    emulator.set_faults(
        FaultSettings(
            rules=[
                FaultRule(match=sha(algo_once), action="fail_task", code="InternalError.Algo", times=1),
                FaultRule(match=sha(algo_always), action="fail_task", code="InternalError.Timeout"),
                FaultRule(match=sha(permanent), action="fail_task", code="DataInspectionFailed"),
                FaultRule(match=sha(unknown_once), action="unknown_task", times=1),
                FaultRule(match=sha(unknown_always), action="unknown_task"),
            ]
        )
    )
    images = [algo_once, algo_always, permanent, unknown_once, unknown_always, fine]
    config = make_config(tmp_path, images, emulator.base_url)
    outcome = await run_batch(config)

    for image in (algo_once, unknown_once, fine):
        assert outcome.state(image) is ItemState.SUCCEEDED
    assert outcome.state(permanent) is ItemState.TASK_FAILED
    assert outcome.reason(permanent).startswith("DataInspectionFailed:")
    assert outcome.by_name[permanent.name].task_code == "DataInspectionFailed"
    assert outcome.state(algo_always) is ItemState.TASK_FAILED
    assert "InternalError.Timeout" in outcome.reason(algo_always)
    assert "max_submit_attempts" in outcome.reason(algo_always)
    assert outcome.state(unknown_always) is ItemState.TASK_FAILED
    assert "UNKNOWN" in outcome.reason(unknown_always)
    submissions = emulator.stats().submissions_per_image
    assert submissions == {
        sha(algo_once): 2,
        sha(algo_always): MAX_SUBMITS,
        sha(permanent): 1,
        sha(unknown_once): 2,
        sha(unknown_always): MAX_SUBMITS,
        sha(fine): 1,
    }
    assert all(r.submit_attempts <= MAX_SUBMITS for r in outcome.report.items)
    assert_proportional(emulator, 6, sum(submissions.values()))
    assert_clean_output(config, 3)

    # final outcomes stay final: the re-run sends nothing at all
    before = emulator.stats().requests
    again = await run_batch(config)
    assert again.counts == outcome.counts
    assert emulator.stats().requests == before


async def test_tasks_past_the_timeout_end_timed_out_and_queued_ones_are_withdrawn(
    tmp_path: Path, portraits: list[Path], fast_retries: None
) -> None:
    """Tasks that run longer than `limits.task_timeout_s`: every item ends `timed_out` naming the status last seen,
    tasks still queued are cancelled (never billed), and the final state costs nothing on a re-run."""
    slow = EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, video="stub", detector="rule", realtime_factor=40)
    async with run_emulator(slow) as emu:  # each task runs ~160 emulated s, the batch allows 60
        config = make_config(tmp_path, portraits[:3], emu.base_url, extra="limits:\n  task_timeout_s: 60")
        outcome = await run_batch(config)
        assert outcome.counts == {ItemState.TIMED_OUT: 3}
        assert all("task not finished within limits.task_timeout_s" in r.reason for r in outcome.report.items)
        stats = emu.stats()
        assert stats.tasks_by_status.get("CANCELED", 0) == 2  # the two waiting behind the running one
        assert stats.requests["cancel"] <= 3
        # an overrunning task is looked at every `min_interval_s` (2 emulated s) at most: bounded by the timeout
        assert stats.requests["task"] <= 1.5 * 60 / 2 + 3 * ATTEMPTS
        assert stats.requests["submit"] == 3
        before = emu.stats().requests
        again = await run_batch(config)
        assert again.counts == {ItemState.TIMED_OUT: 3}
        assert emu.stats().requests == before
    assert_clean_output(config, 0)


async def test_a_task_whose_queries_keep_failing_is_not_polled_in_a_loop(
    tmp_path: Path, portraits: list[Path], emulator: RunningEmulator, fast_retries: None
) -> None:
    """Queries of one task answer 500 until its timeout: backing off between failed rounds keeps the requests
    proportional to the items (a few rounds of `attempts`), not to the length of the timeout."""
    broken, fine = portraits[:2]
    emulator.set_faults(
        FaultSettings(rules=[FaultRule(match=sha(broken), action="error", code="InternalError", endpoint="task")])
    )
    config = make_config(tmp_path, [broken, fine], emulator.base_url, extra="limits:\n  task_timeout_s: 600")
    outcome = await run_batch(config)
    assert outcome.state(fine) is ItemState.SUCCEEDED
    assert outcome.state(broken) is ItemState.TIMED_OUT
    assert emulator.stats().requests["task"] <= 10 * ATTEMPTS


# -- storage: S3 PUTs failing at the edge -------------------------------------------------------------------------


class FaultyS3Proxy:
    """A forwarding proxy on 127.0.0.1 in front of moto that refuses chosen PutObject requests with 503 SlowDown
    (or drops their connection), the way a loaded store does. Everything else passes through untouched."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail_puts = 0  # the next N object PUTs answer 503 SlowDown
        self.drop_puts = 0  # the next N object PUTs lose their connection
        self.always_fail: set[str] = set()  # PUTs whose key contains one of these always answer 503
        self.failed: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> FaultyS3Proxy:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None and self._session is not None
        await self._runner.cleanup()
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        is_object_put = request.method == "PUT" and request.path.count("/") >= 2 and not request.query
        if is_object_put:
            stubborn = any(k in request.path for k in self.always_fail)  # checked first: it spends no budget
            if not stubborn and self.drop_puts > 0:
                self.drop_puts -= 1
                self.failed["drop"] += 1
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            if stubborn or self.fail_puts > 0:
                self.fail_puts -= 0 if stubborn else 1
                self.failed["503"] += 1
                xml = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                return web.Response(status=503, text=xml, content_type="application/xml")
        self.forwarded[request.method] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.upstream + request.raw_path,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            hop = ("content-length", "transfer-encoding", "connection", "content-encoding")
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in hop}
            return web.Response(status=upstream.status, headers=out_headers, body=payload)


@pytest.fixture
async def s3_proxy(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FaultyS3Proxy]:
    # botocore's own retries keep their count but skip their backoff sleeps
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0)
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET_ACCESS_KEY)
    async with FaultyS3Proxy(s3_server.endpoint_url) as proxy:
        yield proxy


def s3_storage(endpoint_url: str, bucket: str) -> str:
    return (
        f"backend: s3\n  endpoint_url: {endpoint_url}\n  region: us-east-1\n  bucket: {bucket}\n"
        "  addressing_style: path\n  cleanup: never"
    )


async def test_s3_puts_failing_transiently_are_retried_or_fail_the_item_transiently(
    tmp_path: Path,
    portraits: list[Path],
    emulator: RunningEmulator,
    s3_server: S3Server,
    s3_proxy: FaultyS3Proxy,
    fast_retries: None,
) -> None:
    """Storage PUTs refused with 503 SlowDown or cut off: within the store client's retries the batch does not
    notice; an object that keeps failing ends its item `upload_failed` (transient), and the re-run uploads it."""
    bucket = s3_server.create_bucket(unique_bucket_name())
    images = portraits[:4]
    stubborn = images[3]
    s3_proxy.fail_puts = 2
    s3_proxy.drop_puts = 1
    s3_proxy.always_fail = {sha(stubborn)}
    config = make_config(tmp_path, images, emulator.base_url, storage=s3_storage(s3_proxy.url, bucket))
    outcome = await run_batch(config)

    assert outcome.state(stubborn) is ItemState.UPLOAD_FAILED
    assert "SlowDown" in outcome.reason(stubborn) and "transient" in outcome.reason(stubborn)
    assert outcome.counts == {ItemState.SUCCEEDED: 3, ItemState.UPLOAD_FAILED: 1}
    assert s3_proxy.failed["drop"] == 1
    # botocore makes 4 attempts per request (`max_attempts: 3` counts retries): the drop and the two 503s can all
    # land on one object, which then succeeds on its 4th; the stubborn object is refused all 4 times
    assert s3_proxy.failed["503"] == 2 + 4
    keys = s3_server.list_keys(bucket)
    assert len(keys) == 3 + 1  # three images and the voice track, each once
    assert not any(sha(stubborn) in k for k in keys)
    assert emulator.stats().requests.get("detect", 0) == 3  # nothing paid for the item that never got a URL
    assert_clean_output(config, 3)

    s3_proxy.always_fail = set()
    again = await run_batch(config)
    assert again.counts == {ItemState.SUCCEEDED: 4}
    assert set(emulator.stats().submissions_per_image.values()) == {1}
    assert_clean_output(config, 4)


# -- the soak, excluded from the default run ----------------------------------------------------------------------


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_2000_items_with_10_percent_faults() -> None:
    """`scripts/soak.py`: 2,000 items, ~10 % seeded faults on every endpoint; nothing lost, nothing paid twice."""
    spec = importlib.util.spec_from_file_location("lpengine_soak", ROOT / "scripts" / "soak.py")
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    sys.modules["lpengine_soak"] = soak
    spec.loader.exec_module(soak)
    summary = anyio.run(soak.soak, 2000, 2026)
    assert summary["lost"] == [], summary["lost"]
