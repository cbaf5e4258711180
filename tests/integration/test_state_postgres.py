"""PostgreSQL as the state store: its schema, its failures told in one line, a restart survived, a run on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import psycopg
import pytest

from lpengine import Engine, load_config
from lpengine.emulator import EmulatorSettings, run_emulator
from lpengine.errors import StateStoreError
from lpengine.state.postgres import _MIGRATIONS, SCHEMA_VERSION, PostgresStateStore, upgrade
from tests.helpers import write_batch
from tests.pg import PASSWORD, PgServer, unique_batch

pytestmark = pytest.mark.anyio

KEY = "sk-test-postgres-0123456789"


async def test_batches_sharing_a_database_see_only_their_own_rows(pg_url: str) -> None:
    async with PostgresStateStore(pg_url, unique_batch()) as a, PostgresStateStore(pg_url, unique_batch()) as b:
        await a.put("i1", "x", None, {"stage": "plan"})
        assert await a.claim_task("t-1", "i1", 1.0)
        assert await b.get("i1") is None
        assert await b.claim_task("t-1", "i9", 2.0)  # the same task id means nothing across batches
        assert [r.item_id async for r in b.items()] == []


async def test_a_database_without_the_schema_is_refused_naming_the_command(pg_server: PgServer) -> None:
    url = pg_server.url(pg_server.create_database(template="template0"))
    with pytest.raises(StateStoreError) as caught:
        async with PostgresStateStore(url, "b"):
            pass
    message = str(caught.value)
    assert "lpengine db upgrade" in message and "has no lpengine tables" in message
    assert f"on 127.0.0.1:{pg_server.port}" in message and PASSWORD not in message
    assert await upgrade(url) == (0, SCHEMA_VERSION)
    assert await upgrade(url) == (SCHEMA_VERSION, SCHEMA_VERSION)  # again: nothing to do
    async with PostgresStateStore(url, "b") as store:
        assert await store.get("nothing") is None


async def test_an_older_schema_is_upgraded_in_place_keeping_its_rows(pg_server: PgServer) -> None:
    url = pg_server.url(pg_server.create_database(template="template0"))
    with psycopg.connect(url, autocommit=True) as conn:  # the first schema version, as an earlier lpengine left it
        conn.execute("CREATE SCHEMA lpengine")
        conn.execute("CREATE TABLE lpengine.schema_version (version INTEGER NOT NULL)")
        conn.execute(_MIGRATIONS[0].encode())
        conn.execute("INSERT INTO lpengine.schema_version VALUES (1)")
        conn.execute(
            "INSERT INTO lpengine.items VALUES ('b', 'i1', 'x', NULL, 'succeeded', 'download', 't', '{\"a\": 1}', 0)"
        )
    with pytest.raises(StateStoreError, match=r"has schema version 1, .*run `lpengine db upgrade CONFIG`"):
        async with PostgresStateStore(url, "b"):
            pass
    assert await upgrade(url) == (1, SCHEMA_VERSION)
    async with PostgresStateStore(url, "b", lease_s=30) as store:
        row = await store.get("i1")
        assert row is not None and row.data == {"a": 1}
        assert await store.claim_item("i2")


async def test_a_schema_newer_than_this_lpengine_says_to_upgrade_lpengine(pg_server: PgServer) -> None:
    url = pg_server.url(pg_server.create_database())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE lpengine.schema_version SET version = version + 1")
    with pytest.raises(StateStoreError, match="upgrade lpengine on this host"):
        async with PostgresStateStore(url, "b"):
            pass
    with pytest.raises(StateStoreError, match="newer than this lpengine"):
        await upgrade(url)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("password", "check the user and password"),
        ("database", "create the database"),
        ("port", "check that the server runs"),
    ],
)
async def test_an_unusable_database_is_one_line_naming_host_and_database(
    pg_server: PgServer, case: str, expected: str
) -> None:
    wrong = "not-the-password-42"
    port = pg_server.port if case != "port" else _closed_port()
    dbname = "nowhere" if case == "database" else "postgres"
    url = f"postgresql://postgres:{wrong if case == 'password' else PASSWORD}@127.0.0.1:{port}/{dbname}"
    with pytest.raises(StateStoreError) as caught:
        async with PostgresStateStore(url, "b"):
            pass
    message = str(caught.value)
    assert f'database "{dbname}" on 127.0.0.1:{port}' in message and expected in message
    assert "\n" not in message and wrong not in message and PASSWORD not in message


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """The command line as users run it, in its own process (in-process, its logging setup would outlive the test)."""
    return await anyio.run_process(
        [sys.executable, "-m", "lpengine", *args], env={**os.environ, **(env or {})}, check=False
    )


def _closed_port() -> int:
    from port_for import get_port

    port = get_port(None)
    assert port is not None
    return port


async def test_writes_wait_through_a_server_restart_and_carry_on(pg_server: PgServer, pg_url: str) -> None:
    """Writes sent while the server is down wait for it and land once it is back; nothing is lost or doubled."""
    async with PostgresStateStore(pg_url, unique_batch()) as store:
        await store.put("before", "a", None, {"stage": "plan"})
        pg_server.stop()
        claimed: list[bool] = []
        try:
            async with anyio.create_task_group() as tg:

                async def write_while_down() -> None:
                    await store.put("during", "b", None, {"stage": "plan"})
                    claimed.append(await store.claim_task("t-1", "during", 1.0))

                tg.start_soon(write_while_down)
                await anyio.wait_all_tasks_blocked()  # the write is waiting for the server
                assert claimed == []
                await anyio.to_thread.run_sync(pg_server.start)
        finally:
            if not pg_server.executor.running():
                pg_server.start()
        assert claimed == [True]
        await store.put("after", "c", None, {"stage": "plan"})
        assert sorted([r.item_id async for r in store.items()]) == ["after", "before", "during"]


async def test_a_batch_runs_on_postgres_and_status_reads_it(tmp_path: Path, pg_url: str) -> None:
    from lpengine.demo_assets import make_portraits

    make_portraits(tmp_path / "photos", 4)
    batch = unique_batch()
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=200.0, video="stub")) as emu:
        path = write_batch(tmp_path, emu.base_url, 200.0, state=f"{{url: '{pg_url}', batch: {batch}}}")
        async with Engine(load_config(path), api_key=KEY) as engine:
            report = await engine.run()
        assert [r.state.value for r in report.items] == ["succeeded"] * 4
        async with Engine(load_config(path), api_key=KEY) as engine:  # a re-run pays nothing again
            again = await engine.run()
        stats = emu.stats()
        assert stats.requests["submit"] == 4 and stats.requests["detect"] == 4
        assert [r.state.value for r in again.items] == ["succeeded"] * 4
    assert not (tmp_path / "out" / ".lpengine" / "state.db").exists()
    status = await cli("status", str(path), "--json")
    assert status.returncode == 0, status.stderr
    assert '"succeeded": 4' in status.stdout.decode()


async def test_a_run_against_a_database_without_schema_sends_nothing(tmp_path: Path, pg_server: PgServer) -> None:
    from lpengine.demo_assets import make_portraits

    make_portraits(tmp_path / "photos", 2)
    url = pg_server.url(pg_server.create_database(template="template0"))
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=200.0, video="stub")) as emu:
        path = write_batch(tmp_path, emu.base_url, 200.0)
        result = await cli("run", str(path), env={"LPENGINE_STATE_URL": url, "DASHSCOPE_API_KEY": KEY})
        assert result.returncode == 2
        assert "lpengine db upgrade" in result.stderr.decode() and PASSWORD not in result.stderr.decode()
        assert sum(emu.stats().requests.values()) == 0
        upgraded = await cli("db", "upgrade", str(path), env={"LPENGINE_STATE_URL": url})
        assert upgraded.returncode == 0 and f"schema version 0 -> {SCHEMA_VERSION}" in upgraded.stdout.decode()
