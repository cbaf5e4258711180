"""Cooperative workers on one PostgreSQL batch: leases, heartbeats on the database's clock, takeover, fencing."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import psycopg
import pytest
from anyio.streams.text import TextReceiveStream
from pydantic import SecretStr

from lpengine import Engine, ItemState, load_config
from lpengine.client.api import DashScopeClient
from lpengine.emulator import EmulatorSettings, run_emulator
from lpengine.errors import LeaseLostError
from lpengine.models import ItemSpec, item_identity
from lpengine.plan import Namer, iter_plan
from lpengine.state.postgres import PostgresStateStore
from tests.helpers import VOICE, write_batch
from tests.pg import unique_batch

pytestmark = pytest.mark.anyio

KEY = "sk-test-workers-0123456789"
SPEEDUP = 200.0


def _age(url: str, worker_id: str | None, seconds: float) -> None:
    """Make a worker's last heartbeat `seconds` old on the database's clock (a worker that stopped beating)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE lpengine.workers SET heartbeat_at = now() - make_interval(secs => %s) WHERE worker_id = %s",
            (seconds, worker_id),
        )


async def test_a_live_lease_is_kept_even_from_a_worker_whose_clock_runs_a_minute_ahead(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = unique_batch()
    async with PostgresStateStore(pg_url, batch, lease_s=30) as a, PostgresStateStore(pg_url, batch, lease_s=30) as b:
        assert await a.claim_item("i1")
        assert await a.claim_item("i1")  # its own lease: claimed again
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 60.0)  # b's clock is a minute fast
        assert not await b.claim_item("i1")
        assert await b.deferred(["i1"]) == ([], [])
        monkeypatch.undo()
        _age(pg_url, a.worker_id, 31)  # a stopped beating longer than its lease ago
        assert await b.deferred(["i1"]) == ([], ["i1"])
        assert not await a.claim_item("i1")  # back from the dead: b has it now


async def test_a_worker_taken_over_cannot_write_its_successors_item(pg_url: str) -> None:
    batch = unique_batch()
    async with PostgresStateStore(pg_url, batch, lease_s=30) as a, PostgresStateStore(pg_url, batch, lease_s=30) as b:
        assert await a.claim_item("i1")
        await a.put("i1", "x", None, {"stage": "submit", "submit_inflight_wall": 1.0})
        _age(pg_url, a.worker_id, 60)
        assert await b.claim_item("i1")
        with pytest.raises(LeaseLostError, match="taken over by another worker"):
            await a.put("i1", "x", None, {"stage": "submit", "submit_inflight_wall": 2.0})
        row = await b.get("i1")
        assert row is not None and row.data["submit_inflight_wall"] == 1.0  # the successor reconciles this send
        await b.put("i1", "x", None, {"stage": "poll", "task_id": "t", "state": "succeeded"})
        settled, taken = await a.deferred(["i1"])
        assert [s.item_id for s in settled] == ["i1"] and taken == []


async def test_a_worker_late_with_its_heartbeat_stops_writing_before_anyone_takes_over(pg_url: str) -> None:
    """Half a lease without a heartbeat: its writes (each one guarding a paid call) are refused, so that a successor,
    who may come after a whole lease, never meets a paid call still in flight."""
    async with PostgresStateStore(pg_url, unique_batch(), lease_s=30) as a:
        assert await a.claim_item("i1")
        await a.put("i1", "x", None, {"stage": "detect"})
        _age(pg_url, a.worker_id, 16)
        with pytest.raises(LeaseLostError):
            await a.put("i1", "x", None, {"stage": "submit", "submit_inflight_wall": 1.0})
        await a.heartbeat()
        await a.put("i1", "x", None, {"stage": "submit", "submit_inflight_wall": 1.0})


async def test_a_worker_that_leaves_frees_its_unfinished_items_at_once(pg_url: str) -> None:
    batch = unique_batch()
    async with PostgresStateStore(pg_url, batch, lease_s=3600) as b:
        async with PostgresStateStore(pg_url, batch, lease_s=3600) as a:
            assert await a.claim_item("i1")
            assert await b.deferred(["i1"]) == ([], [])
        assert await b.deferred(["i1"]) == ([], ["i1"])  # no waiting out an hour's lease


async def test_workers_on_one_account_take_request_slots_from_one_schedule(pg_url: str) -> None:
    """Three workers asking at once: every slot of the account is at least one interval after the one before."""
    slots: list[float] = []
    async with (
        PostgresStateStore(pg_url, unique_batch(), lease_s=30) as a,
        PostgresStateStore(pg_url, unique_batch(), lease_s=30) as b,
        PostgresStateStore(pg_url, unique_batch(), lease_s=30) as c,
    ):
        account = f"acct-{unique_batch()}"

        async def ask(store: PostgresStateStore) -> None:
            pacer = store.pacer(account)
            slots.extend([(await pacer.slot("submit", 0.2))[0] for _ in range(10)])

        async with anyio.create_task_group() as tg:
            for store in (a, b, c):
                tg.start_soon(ask, store)
        other, _ = await a.pacer(f"other-{account}").slot("submit", 0.2)  # another account: its own schedule
    slots.sort()
    assert len(slots) == 30
    assert min(later - earlier for earlier, later in itertools.pairwise(slots)) >= 0.2 - 1e-6
    assert other < slots[-1]


async def test_the_submission_window_holds_for_the_account_across_workers_and_batches(pg_url: str) -> None:
    account = f"acct-{unique_batch()}"
    async with (
        PostgresStateStore(pg_url, unique_batch(), lease_s=30) as a,
        PostgresStateStore(pg_url, unique_batch(), lease_s=30) as b,  # another batch on the same account
    ):
        qa, qb = a.account_queue(account), b.account_queue(account)
        assert await qa.take("i1", 2, 10.0) and await qa.take("i2", 2, 20.0)
        assert not await qb.take("j1", 2, 10.0)  # the account has two out: b waits, whatever its own count
        assert await b.account_queue(f"other-{account}").take("j1", 2, 10.0)  # another account: its own window
        await qa.submitted("i1")
        queued = (await qb.view()).queued
        assert [audio for _, audio in queued] == [10.0]  # a's task at the service, for b's predictions
        await qa.release("i2", None)  # never sent
        assert await qb.take("j1", 2, 10.0)
        assert not await qa.take("i3", 2, 10.0)
        freed = anyio.current_time()
        await qa.release("i1", freed)
        assert (await qb.view()).runner_free == pytest.approx(freed, abs=0.05)
        assert await qa.take("i3", 2, 10.0)


async def test_a_dead_workers_places_free_themselves_but_its_tasks_at_the_service_keep_theirs(pg_url: str) -> None:
    account = f"acct-{unique_batch()}"
    batch = unique_batch()
    async with (
        PostgresStateStore(pg_url, batch, lease_s=30) as a,
        PostgresStateStore(pg_url, batch, lease_s=30) as b,
    ):
        qa, qb = a.account_queue(account), b.account_queue(account)
        assert await qa.take("sent", 2, 10.0) and await qa.take("unsent", 2, 10.0)
        await qa.submitted("sent")
        assert not await qb.take("x", 2, 10.0)
        _age(pg_url, a.worker_id, 31)  # a died
        assert await qb.take("x", 2, 10.0)  # its places no longer count...
        assert await qb.take("sent", 2, 10.0)  # ...and its task at the service keeps one for whoever takes it over
        assert not await qb.take("y", 2, 10.0)


async def test_two_engines_share_a_batch_and_pay_for_each_image_once(tmp_path: Path, pg_url: str) -> None:
    from lpengine.demo_assets import make_portraits

    make_portraits(tmp_path / "photos", 16)
    batch = unique_batch()
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, video="stub")) as emu:
        configs = []
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            (folder / "photos").symlink_to(tmp_path / "photos")
            state = f"{{url: '{pg_url}', batch: {batch}, lease_s: 130}}"
            path = write_batch(folder, emu.base_url, SPEEDUP, state=state)
            configs.append(load_config(path))
        reports = []

        async def work(config: object) -> None:
            async with Engine(config, api_key=KEY) as engine:  # type: ignore[arg-type]
                reports.append(await engine.run())

        async with anyio.create_task_group() as tg:
            for config in configs:
                tg.start_soon(work, config)
        stats = emu.stats()
    assert [Counter(r.state for r in report.items) for report in reports] == [{ItemState.SUCCEEDED: 16}] * 2
    assert sorted(stats.submissions_per_image.values()) == [1] * 16
    assert sorted(stats.detect_per_image.values()) == [1] * 16
    made = [len(list((tmp_path / n / "out").glob("*.mp4"))) for n in ("a", "b")]
    assert sum(made) == 16  # each video made once, by whichever worker held its item


async def test_status_shows_every_worker_with_host_pid_lease_and_heartbeat(tmp_path: Path, pg_url: str) -> None:
    batch = unique_batch()
    path = write_batch(tmp_path, "http://127.0.0.1:9/api/v1", 1.0, state=f"{{url: '{pg_url}', batch: {batch}}}")
    async with PostgresStateStore(pg_url, batch, lease_s=30) as live, PostgresStateStore(pg_url, batch, lease_s=30):
        assert await live.claim_item("i1")
        await live.put("i1", "x", None, {"stage": "poll", "task_id": "t"})
        _age(pg_url, live.worker_id, 45)  # this one stopped beating
        status = [sys.executable, "-m", "lpengine", "status", str(path)]
        shown = await anyio.run_process([*status, "--json"], check=False)
        table = (await anyio.run_process(status)).stdout.decode()
    assert shown.returncode == 0, shown.stderr
    workers = json.loads(shown.stdout)["workers"]
    assert {(w["host"], w["pid"], w["lease_s"]) for w in workers} == {(socket.gethostname(), os.getpid(), 30.0)}
    dead = next(w for w in workers if w["worker"] == live.worker_id)
    assert not dead["live"] and dead["last_heartbeat_s_ago"] >= 45 and dead["items_in_progress"] == 1
    assert [w["live"] for w in workers].count(True) == 1
    assert f"worker {socket.gethostname()} pid {os.getpid()}: lease expired (30 s)" in table


async def test_a_task_whose_inputs_died_with_its_worker_is_sent_again_by_the_successor(
    tmp_path: Path, pg_url: str
) -> None:
    """The item lost with `--kill-seed 2`: a worker killed while its submit was in flight leaves a task whose image
    the service fetches from that worker's file server, gone with it, so the task fails `InvalidURL` (nothing is
    billed). The successor finds that task through the reconciliation, as it must, and then sends the item again
    with URLs it serves itself instead of ending it `task_failed`."""
    from lpengine.demo_assets import make_portraits

    make_portraits(tmp_path / "photos", 1)
    batch = unique_batch()
    settings = EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, video="stub", unreachable_input="fail_task")
    async with run_emulator(settings) as emu:
        path = write_batch(tmp_path, emu.base_url, SPEEDUP, state=f"{{url: '{pg_url}', batch: {batch}, lease_s: 130}}")
        config = load_config(path)
        spec = next(iter_plan(config, Namer()))
        assert isinstance(spec, ItemSpec)
        image_sha = hashlib.sha256(await anyio.Path(spec.image).read_bytes()).hexdigest()
        item_id = item_identity(
            spec.output_name, image_sha, hashlib.sha256(await anyio.Path(VOICE).read_bytes()).hexdigest(), spec.recipe
        )
        # What the dead worker left: the item's lease, its face check paid, its submit written ahead and sent with
        # the URL of its own file server, which is gone by the time the service fetches it.
        async with PostgresStateStore(pg_url, batch, lease_s=10) as dead:
            assert await dead.claim_item(item_id)
            await dead.put_detect(image_sha, True, "")
            row = {"stage": "submit", "detect_paid": True, "submit_attempts": 1, "submit_inflight_wall": time.time()}
            await dead.put(item_id, spec.output_name, image_sha, {**row, "input": spec.image})
            async with DashScopeClient(config.api, SecretStr(KEY), base_url=emu.base_url) as api:
                await api.submit("http://127.0.0.1:9/img.png", "http://127.0.0.1:9/voice.wav", spec.params)
        async with Engine(config, api_key=KEY) as engine:
            report = await engine.run()
        stats = emu.stats()
    [result] = report.items
    assert (result.state, result.submit_attempts) == (ItemState.SUCCEEDED, 2), result.reason
    assert [run.status for run in stats.runs] == ["FAILED", "SUCCEEDED"]  # the dead task, then the successor's
    assert stats.submissions_per_image == {image_sha: 1} and stats.detect_per_image == {}


@pytest.mark.slow
async def test_a_worker_killed_mid_batch_is_taken_over_and_nothing_is_paid_twice(tmp_path: Path, pg_url: str) -> None:
    """Three `lpengine run` processes on one batch; one is SIGKILLed after its first accepted submit. The other two
    finish every item, including the dead one's (after its lease), and no image is detected or submitted twice."""
    from lpengine.demo_assets import make_portraits

    make_portraits(tmp_path / "photos", 18)
    batch = unique_batch()
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, video="stub")) as emu:
        state = f"{{url: '{pg_url}', batch: {batch}, lease_s: 10}}"
        path = write_batch(tmp_path, emu.base_url, SPEEDUP, state=state)
        text = path.read_text().replace("api:\n", "api:\n  request_timeout_s: 5\n", 1)
        path.write_text(text)
        cmd = [sys.executable, "-m", "lpengine", "run", str(path), "--log-format", "json", "--log-level"]
        env = {**os.environ, "DASHSCOPE_API_KEY": KEY}
        victim = await anyio.open_process([*cmd, "debug"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        workers = [victim]
        try:
            assert victim.stderr is not None
            logged = ""
            # The others start once the victim holds an item past detect: started together on a busy host, they
            # could take every item while the victim starts up, and it would finish unkilled.
            async for chunk in TextReceiveStream(victim.stderr):
                logged += chunk
                if len(workers) == 1 and '"stage.done"' in logged:
                    quiet = subprocess.DEVNULL
                    workers += [await anyio.open_process([*cmd, "info"], env=env, stdout=quiet) for _ in "ab"]
                if "submit.accepted" in logged:
                    victim.send_signal(signal.SIGKILL)
                    break
            codes = [await w.wait() for w in workers]
        finally:
            for w in workers:
                if w.returncode is None:
                    w.kill()
                await w.aclose()
        stats = emu.stats()
    assert codes == [-signal.SIGKILL, 0, 0]
    assert sorted(stats.submissions_per_image.values()) == [1] * 18
    assert all(n == 1 for n in stats.detect_per_image.values())
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 18
    async with PostgresStateStore(pg_url, batch) as store:
        assert Counter([row.state async for row in store.items()]) == {"succeeded": 18}
