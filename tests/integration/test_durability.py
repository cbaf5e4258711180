"""Durability: killed runs resume without paying twice or losing a result; overlapping runs are refused."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lpengine.media import verify_mp4
from lpengine.state.lock import BatchLock
from tests.helpers import write_batch

KEY = "sk-test-durability-0123456789"
SPEEDUP = 400


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    """The emulator as its own process, as a user would run it; tests read its stats over HTTP."""
    env = {**os.environ, "DASHSCOPE_API_KEY": KEY}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lpengine",
            "emulator",
            "--port",
            "0",
            "--speedup",
            str(SPEEDUP),
            "--video",
            "stub",
            "--detector",
            "rule",
            "--seed",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    url = ""
    for line in proc.stdout:
        if "http://127.0.0.1:" in line:
            url = line[line.index("http://127.0.0.1:") :].split()[0].rstrip("/")
            break
    assert url, "emulator did not print its URL"
    yield url if url.endswith("/api/v1") else f"{url}/api/v1"
    proc.terminate()
    proc.wait(timeout=10)


def emulator_stats(base_url: str) -> dict[str, object]:
    root = base_url.removesuffix("/api/v1")
    with urllib.request.urlopen(f"{root}/_emulator/stats", timeout=10) as resp:
        return json.loads(resp.read())


def emulator_reset(base_url: str) -> None:
    root = base_url.removesuffix("/api/v1")
    req = urllib.request.Request(f"{root}/_emulator/reset", method="POST")
    with urllib.request.urlopen(req, timeout=10):
        pass


def emulator_faults(base_url: str, faults: dict[str, object]) -> None:
    root = base_url.removesuffix("/api/v1")
    req = urllib.request.Request(f"{root}/_emulator/faults", data=json.dumps(faults).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=10):
        pass


def batch(tmp_path: Path, base_url: str, n: int) -> Path:
    from lpengine.demo_assets import make_portraits

    make_portraits(tmp_path / "photos", n)
    # Payments and files are what is tested here; judging the videos (tests/integration/test_analysis_stage.py)
    # would only add a worker start-up and 100 decodes to runs that must fit pytest's 120 s on a busy host.
    return write_batch(tmp_path, base_url, SPEEDUP, analysis="{enabled: false}")


def run_cli(config: Path, *, kill_after_lines: int | None = None) -> int | None:
    """Run `lpengine run`; optionally SIGKILL it after it has logged N events (None = let it finish)."""
    env = {**os.environ, "DASHSCOPE_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lpengine", "run", str(config), "--log-format", "json", "--log-level", "debug"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for seen, _ in enumerate(proc.stderr, start=1):
        if kill_after_lines is not None and seen >= kill_after_lines:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stderr.close()
    return proc.wait(timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(600)  # eleven CLI runs: ~60 s on a quiet host, past the default 120 s with both cores busy
def test_random_kills_then_resume_pay_once_and_lose_nothing(tmp_path: Path, emulator_url: str) -> None:
    """100 items, SIGKILLed at 10 seeded moments and resumed each time: every item succeeds, no image is detected
    or submitted twice, and no partial or corrupt file is left."""
    emulator_reset(emulator_url)
    config = batch(tmp_path, emulator_url, 100)
    rng = random.Random(20261125)
    kills = 0
    for _ in range(10):
        code = run_cli(config, kill_after_lines=rng.randint(5, 50))
        kills += code == -signal.SIGKILL
    assert kills >= 8  # the batch is long enough that (nearly) every run is killed mid-flight
    assert run_cli(config) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["counts"] == {"succeeded": 100}
    stats = emulator_stats(emulator_url)
    submissions = stats["submissions_per_image"]
    detects = stats["detect_per_image"]
    assert isinstance(submissions, dict) and isinstance(detects, dict)
    assert len(submissions) == 100 and set(submissions.values()) == {1}, "an image was submitted twice"
    # and each item's task was made from its own photo: a lost submit adopting another item's task would pass the
    # counts above when the two swap (each is paid once), while each item gets the other's video
    runs = stats["runs"]
    assert isinstance(runs, list)
    made_from = {run["task_id"]: run["image_sha256"] for run in runs}
    for row in report["items"]:
        assert made_from[row["task_id"]] == hashlib.sha256(Path(row["input"]).read_bytes()).hexdigest(), row
    assert set(detects.values()) == {1}, "an image was detected twice"
    # A detect whose answer died with the process is not repeated (synthesis checks the face itself): at most one
    # per detect worker per kill goes unchecked, and none is paid twice.
    assert len(detects) >= 100 - 4 * kills
    out = tmp_path / "out"
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 100
    for video in videos:
        verify_mp4(video)
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


def test_second_run_of_the_same_batch_exits_at_once(tmp_path: Path, emulator_url: str) -> None:
    """While a run holds the batch lock, another run exits with code 3 and a clear message, doing nothing."""
    config = batch(tmp_path, emulator_url, 1)
    lock_path = tmp_path / "out" / ".lpengine" / "state.lock"
    with BatchLock(lock_path):
        env = {**os.environ, "DASHSCOPE_API_KEY": KEY}
        proc = subprocess.run(
            [sys.executable, "-m", "lpengine", "run", str(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 3
    assert "another run of this batch is in progress" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("*.mp4"))


def interrupt_after(config: Path, marker: str, count: int, *extra: str, signals: int = 1) -> subprocess.Popen[str]:
    """Start a run, wait until it has logged `marker` `count` times, then send SIGINT `signals` times."""
    env = {**os.environ, "DASHSCOPE_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lpengine", "run", str(config), "--log-format", "json", "--log-level", "info", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        seen += marker in line
        if seen >= count:
            for _ in range(signals):
                proc.send_signal(signal.SIGINT)
            break
    return proc


def test_sigint_stops_saves_and_resumes(tmp_path: Path, emulator_url: str) -> None:
    """SIGINT: stop taking items, save, exit 130; the re-run finishes the batch without paying twice."""
    emulator_reset(emulator_url)
    config = batch(tmp_path, emulator_url, 30)
    proc = interrupt_after(config, "submit.accepted", 3)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "state is saved" in err and "Traceback" not in err
    assert run_cli(config) == 0
    stats = emulator_stats(emulator_url)
    submissions = stats["submissions_per_image"]
    assert isinstance(submissions, dict) and len(submissions) == 30 and set(submissions.values()) == {1}


def test_second_sigint_exits_at_once_and_is_safe_to_resume(tmp_path: Path, emulator_url: str) -> None:
    """Two signals: exit 130 immediately; the state store is still consistent and the re-run completes."""
    emulator_reset(emulator_url)
    config = batch(tmp_path, emulator_url, 20)
    proc = interrupt_after(config, "submit.accepted", 2, signals=2)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert run_cli(config) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["counts"] == {"succeeded": 20}
    submissions = emulator_stats(emulator_url)["submissions_per_image"]
    assert isinstance(submissions, dict) and set(submissions.values()) == {1}


@pytest.fixture
def slow_emulator_url() -> Iterator[str]:
    """A slow emulator (speedup 10: a task takes ~0.6 s), so queued tasks and running batches can be caught."""
    env = {**os.environ, "DASHSCOPE_API_KEY": KEY}
    args = ["--port", "0", "--speedup", "10", "--video", "stub", "--detector", "rule"]
    slow = subprocess.Popen(
        [sys.executable, "-m", "lpengine", "emulator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert slow.stdout is not None
        line = next(line for line in slow.stdout if "http://127.0.0.1:" in line)
        url = line[line.index("http://127.0.0.1:") :].split()[0].rstrip("/")
        yield url if url.endswith("/api/v1") else f"{url}/api/v1"
    finally:
        slow.terminate()
        slow.wait(timeout=10)


def slow_batch(tmp_path: Path, url: str, n: int) -> Path:
    config = batch(tmp_path, url, n)
    config.write_text(config.read_text().replace(f"speedup: {SPEEDUP}", "speedup: 10"))
    return config


def test_two_concurrent_runs_exactly_one_proceeds(tmp_path: Path, slow_emulator_url: str) -> None:
    """Two runs of one config at once (cron overlap): one does the work, the other exits 3 at once."""
    config = slow_batch(tmp_path, slow_emulator_url, 8)
    env = {**os.environ, "DASHSCOPE_API_KEY": KEY}
    cmd = [sys.executable, "-m", "lpengine", "run", str(config), "--log-level", "info", "--log-format", "json"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert first.stderr is not None
    next(line for line in first.stderr if "submit.accepted" in line)  # the first run holds the lock and works
    # Its task queries fail until the second run is over, so it cannot finish first however slowly that one
    # starts (on a loaded machine it used to, and the second run then found the lock free and the work done).
    stall = {"rules": [{"match": "", "action": "error", "endpoint": "task", "code": "InternalError"}]}
    emulator_faults(slow_emulator_url, stall)
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    finally:
        emulator_faults(slow_emulator_url, {})
    first.communicate(timeout=120)
    assert (first.returncode, second.returncode) == (0, 3)
    assert "another run of this batch is in progress" in second.stderr


def test_cancel_pending_withdraws_queued_tasks_and_resume_resubmits_them(
    tmp_path: Path, slow_emulator_url: str
) -> None:
    """`--cancel-pending`: tasks still queued at the service are cancelled on stop; the next run submits them again."""
    config = slow_batch(tmp_path, slow_emulator_url, 6)
    proc = interrupt_after(config, "submit.accepted", 3, "--cancel-pending")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    by_status = emulator_stats(slow_emulator_url)["tasks_by_status"]
    assert isinstance(by_status, dict) and by_status.get("CANCELED", 0) >= 1
    assert "task.cancelled_on_stop" in err
    assert run_cli(config) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["counts"] == {"succeeded": 6}
