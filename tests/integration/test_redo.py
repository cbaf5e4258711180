"""`--redo bad`: the one deliberate way to pay twice, counted by the emulator (what the service was paid for).

The emulator's `defect` faults make some results bad; a redo makes exactly those again, once per request, with no
face check, keeping the earlier video, and a crash or a lost submit answer mid-redo never pays for one twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")

from lpengine import BatchConfig, Engine, ProgressEvent, load_config
from lpengine.config import load_secrets
from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, run_emulator
from lpengine.emulator.app import RunningEmulator
from lpengine.emulator.settings import Defect
from lpengine.state import open_store
from tests.helpers import write_batch
from tests.pg import unique_batch

pytestmark = pytest.mark.anyio

KEY = "sk-test-redo-0123456789"
SPEEDUP = 200.0
DEFECTS: dict[str, Defect] = {"portrait-0001": "frozen", "portrait-0002": "face_lost"}


@pytest.fixture
async def emulator() -> AsyncIterator[RunningEmulator]:
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, seed=5)) as emu:
        yield emu


def paid(emulator: RunningEmulator) -> tuple[int, int]:
    """(face checks, tasks created) the account was billed for."""
    stats = emulator.stats()
    return sum(stats.detect_per_image.values()), sum(stats.submissions_per_image.values())


def defects(emulator: RunningEmulator, photos: list[Path], *extra: FaultRule) -> None:
    """Make the photos named in DEFECTS come back defective (file-server URLs name the content's hash)."""
    rules = [
        FaultRule(match=hashlib.sha256(p.read_bytes()).hexdigest(), action="defect", defect=DEFECTS[p.stem])
        for p in photos
        if p.stem in DEFECTS
    ]
    emulator.set_faults(FaultSettings(rules=[*rules, *extra]))


async def made_with_two_bad(
    tmp_path: Path, emulator: RunningEmulator, state: str | None = None
) -> tuple[BatchConfig, list[Path]]:
    """Three photos made, two of them bad; `state`: the batch's `state:` section (PostgreSQL), else SQLite."""
    from lpengine.demo_assets import make_portraits

    photos = make_portraits(tmp_path / "photos", 3)
    defects(emulator, photos)
    sections = {"state": state} if state else {}
    path = write_batch(tmp_path, emulator.base_url, SPEEDUP, storage="\n  backend: fileserver", **sections)
    config = load_config(path)
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    assert sorted(str(r.verdict) for r in report.items) == ["bad", "bad", "ok"]
    assert paid(emulator) == (3, 3)
    return config, photos


@pytest.fixture(params=["sqlite", "postgres"])
def state(request: pytest.FixtureRequest) -> str | None:
    """The batch's `state:` section: none (SQLite), or a PostgreSQL batch (cooperative-worker mode: leases)."""
    if request.param == "sqlite":
        return None
    return f"{{url: '{request.getfixturevalue('pg_url')}', batch: {unique_batch()}}}"


async def test_redo_bad_pays_once_for_each_bad_video_and_keeps_the_earlier_one(
    tmp_path: Path, emulator: RunningEmulator, state: str | None
) -> None:
    config, _ = await made_with_two_bad(tmp_path, emulator, state)
    out = config.output_dir
    before = {Path(r["output"]).stem: r for r in json.loads((out / "report.json").read_text())["items"]}
    old_bytes = (out / "portrait-0001.mp4").read_bytes()
    emulator.set_faults(FaultSettings())  # the service does better this time

    async with Engine(config, api_key=KEY) as engine:
        estimate = await engine.dry_run(redo={"bad"})
        assert sorted(estimate.redo_names) == ["portrait-0001", "portrait-0002"]
        assert (estimate.would_submit, estimate.would_detect, estimate.already_done) == (2, 0, 1)
        assert estimate.redo_seconds == pytest.approx(2 * 3.946, abs=0.01)
        assert estimate.redo_cost_cny == pytest.approx(estimate.redo_seconds * 0.02, abs=1e-4)
        assert estimate.estimated_cost_cny == estimate.redo_cost_cny  # nothing else in this run pays
        report = await engine.run(redo=estimate.redo)

    assert paid(emulator) == (3, 5)  # two tasks more, and no face check: the photos' verdicts are on record
    rows = {Path(r.output or "").stem: r for r in report.items}
    for name in DEFECTS:
        row = rows[name]
        assert (row.verdict, row.redo_count) == ("ok", 1)
        assert row.task_id != before[name]["task_id"]
        earlier = (row.redo_history or [])[-1]
        assert (earlier["verdict"], earlier["task_id"]) == ("bad", before[name]["task_id"])
        assert earlier["kept_as"] == str(out / f"{name}.prev1.mp4")
        assert row.cost_this_run_cny == pytest.approx(row.video_duration * 0.02)  # type: ignore[operator]
        # the batch total keeps the video it replaced: both were paid for
        assert row.cost_cny == pytest.approx(before[name]["cost_cny"] + row.cost_this_run_cny)
    assert rows["portrait-0001"].earlier_verdict == "bad: frozen"
    assert rows["portrait-0002"].earlier_verdict == "bad: no_face"
    assert (out / "portrait-0001.prev1.mp4").read_bytes() == old_bytes != (out / "portrait-0001.mp4").read_bytes()
    kept = rows["portrait-0000"]
    assert (kept.verdict, kept.redo_count, kept.task_id) == ("ok", 0, before["portrait-0000"]["task_id"])
    assert not (out / "portrait-0000.prev1.mp4").exists()

    written = {Path(r["output"]).stem: r for r in json.loads((out / "report.json").read_text())["items"]}
    assert written["portrait-0002"]["redo_count"] == 1
    assert written["portrait-0002"]["redo_history"][0]["flags"] == ["no_face"]
    csv_text = (out / "report.csv").read_text()
    assert "redo_count,earlier_verdict" in csv_text and ",1,bad: frozen," in csv_text
    html = (out / "report.html").read_text()
    assert html.count("redone 1× · was bad") == 2 and "portrait-0001.prev1.mp4" in html

    async with open_store(config, load_secrets(config.base_dir)) as store:
        records = {row.output_name: row.data async for row in store.items()}
        assert await store.redo_epoch() == 1
    assert records["portrait-0001"]["redo"]["epoch"] == 1 and records["portrait-0001"]["redo"]["history"][0]["at"] > 0
    assert records["portrait-0000"]["redo"] is None

    async with Engine(config, api_key=KEY) as engine:  # asked again with nothing judged bad: nothing is paid
        again = await engine.dry_run(redo={"bad"})
        assert (again.redo, again.would_submit, again.estimated_cost_cny) == ((), 0, 0.0)
        await engine.run(redo=again.redo)
    assert paid(emulator) == (3, 5)


async def test_a_redo_stopped_mid_way_is_finished_not_paid_again_and_a_lost_answer_is_reconciled(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    config, photos = await made_with_two_bad(tmp_path, emulator)
    # still defective (so the redone videos are bad again), and the first redo submit's answer is lost
    defects(emulator, photos, FaultRule(match="", action="lose_submit_response", times=1))
    submitted = anyio.Event()

    def watch(event: ProgressEvent) -> None:
        if event.task_id and event.stage.value == "submit":
            submitted.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:

            async def redo_then_crash() -> None:
                async with Engine(config, api_key=KEY, on_event=watch) as engine:
                    estimate = await engine.dry_run(redo={"bad"})
                    assert len(estimate.redo) == 2
                    await engine.run(redo=estimate.redo)

            tg.start_soon(redo_then_crash)
            await submitted.wait()
            tg.cancel_scope.cancel()  # the run dies with the redo under way

    async with Engine(config, api_key=KEY) as engine:  # the same command again
        resumed = await engine.dry_run(redo={"bad"})
        assert resumed.redo == () and resumed.redo_resuming >= 1  # finish request 1 before selecting anything
        report = await engine.run(redo=resumed.redo)

    assert paid(emulator) == (3, 5)  # each bad item made once more, however the run was cut or answers lost
    assert emulator.stats().faults.get("lose_submit_response") == 1
    rows = {Path(r.output or "").stem: r for r in report.items}
    assert {n: (rows[n].verdict, rows[n].redo_count) for n in DEFECTS} == dict.fromkeys(DEFECTS, ("bad", 1))
    assert all((out := config.output_dir / f"{n}.prev1.mp4").is_file() and out.stat().st_size > 0 for n in DEFECTS)

    async with Engine(config, api_key=KEY) as engine:  # bad again: a new request may select them, once more
        fresh = await engine.dry_run(redo={"bad"})
    assert sorted(fresh.redo_names) == sorted(DEFECTS) and fresh.redo_resuming == 0


def lpengine(config: Path, *args: str, stdin: int = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lpengine", "run", str(config), *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "DASHSCOPE_API_KEY": KEY},
    )


def interrupt_at_the_question(config: Path) -> int:
    """Run `--redo bad` on a terminal, press Ctrl-C at its question, and return the exit code."""
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "lpengine", "run", str(config), "--redo", "bad"],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "DASHSCOPE_API_KEY": KEY},
    ) as proc:
        assert proc.stdout is not None
        seen = b""
        while not seen.endswith(b"[y/N]: "):
            chunk = proc.stdout.read(1)
            assert chunk, seen
            seen += chunk
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    os.close(follower)
    os.close(leader)
    return code


async def test_the_command_line_prices_asks_refuses_without_a_terminal_and_redoes_with_yes(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    await made_with_two_bad(tmp_path, emulator)
    path = tmp_path / "batch.yaml"
    emulator.set_faults(FaultSettings())

    refused = await anyio.to_thread.run_sync(lambda: lpengine(path, "--redo", "bad"))
    assert refused.returncode == 2, refused.stderr
    assert (
        refused.stderr.strip().count("\n") == 0 and "add --yes" in refused.stderr and "Traceback" not in refused.stderr
    )
    for wrong in (("--redo", "warn"), ("--redo", "bad", "--limit", "1"), ("--yes",)):
        proc = await anyio.to_thread.run_sync(lambda wrong=wrong: lpengine(path, *wrong))  # type: ignore[misc]
        assert proc.returncode == 2 and proc.stderr.startswith("error: --"), proc.stderr

    dry = await anyio.to_thread.run_sync(lambda: lpengine(path, "--redo", "bad", "--dry-run"))
    assert dry.returncode == 0, dry.stderr
    assert "would submit            2" in dry.stdout
    line = "redo bad: 2 item(s) (portrait-0001, portrait-0002): 7.9 s of video × 0.02 CNY/s = about 0.158 CNY"
    assert line in dry.stdout, dry.stdout
    assert paid(emulator) == (3, 3)

    # on a terminal it asks, and "no" pays nothing
    leader, follower = pty.openpty()
    os.write(leader, b"n\n")
    declined = await anyio.to_thread.run_sync(lambda: lpengine(path, "--redo", "bad", stdin=follower))
    os.close(follower)
    os.close(leader)
    assert declined.returncode == 0, declined.stderr
    assert line in declined.stdout and "pay about 0.158 CNY for this run? [y/N]" in declined.stdout
    assert "nothing was sent, nothing paid" in declined.stdout
    assert paid(emulator) == (3, 3)

    interrupted = await anyio.to_thread.run_sync(lambda: interrupt_at_the_question(path))
    assert interrupted == 130  # Ctrl-C at the question ends the process at once (no thread left reading)
    assert paid(emulator) == (3, 3)

    done = await anyio.to_thread.run_sync(lambda: lpengine(path, "--redo", "bad", "--yes"))
    assert done.returncode == 0, done.stderr
    assert line in done.stdout
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["cost_this_run_cny"] == pytest.approx(0.158, abs=0.002) and summary["needs_review"] == 0
    assert paid(emulator) == (3, 5)

    again = await anyio.to_thread.run_sync(lambda: lpengine(path, "--redo", "bad", "--yes"))
    assert again.returncode == 0 and "no video is judged bad" in again.stdout
    assert paid(emulator) == (3, 5)
