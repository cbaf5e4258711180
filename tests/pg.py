"""A real, throwaway PostgreSQL for the tests (pytest-postgresql driving the system's initdb/pg_ctl).

One server per test session on 127.0.0.1 with password authentication (so a wrong password is really refused), and
one upgraded database that tests share, each under its own batch name (a batch's rows are apart from another's, and
creating a database per test costs a second); tests about the schema itself make a database of their own. As root
(CI) the server runs as the `postgres` user through tests/pg_ctl.sh, since initdb refuses root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import psycopg
import pytest
from port_for import get_port
from pytest_postgresql.executors import PostgreSQLExecutor

from lpengine.state.postgres import upgrade

PG_CTL = Path(__file__).with_name("pg_ctl.sh")
PASSWORD = "pg-test-s3cret"
_TEMPLATE = "lpengine_template"


@dataclass(frozen=True)
class PgServer:
    executor: PostgreSQLExecutor
    host: str
    port: int

    def url(self, dbname: str, *, password: str = PASSWORD) -> str:
        return f"postgresql://postgres:{password}@{self.host}:{self.port}/{dbname}"

    def create_database(self, *, template: str = _TEMPLATE) -> str:
        """A new empty database (`template0`) or one with lpengine's current schema (the default)."""
        name = f"t_{uuid.uuid4().hex[:12]}"  # CREATE DATABASE takes no parameters; this name needs no quoting
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'.encode())
        return name

    def stop(self) -> None:
        """Stop the server, keeping its data (`start()` brings it back: the database restarting under a run)."""
        self.executor.stop()

    def start(self) -> None:
        self.executor.start()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    base = Path(tempfile.mkdtemp(prefix="lpengine-pg-"))
    if os.getuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
    try:
        server = _start(base)
        try:
            with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{_TEMPLATE}"'.encode())
            anyio.run(upgrade, server.url(_TEMPLATE))
            yield server
        finally:
            server.executor.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _start(base: Path) -> PgServer:
    """Start on a free port; on a busy machine another test run may take the same port in between, so a start that
    fails is tried again on another one (pg_ctl's log says why it failed, and is shown if all attempts fail)."""
    for attempt in range(3):
        port = get_port(None)
        assert port is not None
        executor = PostgreSQLExecutor(
            executable=str(PG_CTL),
            host="127.0.0.1",
            port=port,
            datadir=str(base / f"data-{port}"),
            unixsocketdir=str(base),
            logfile=str(base / f"server-{port}.log"),
            startparams="-w",
            dbname="postgres",
            password=PASSWORD,
            postgres_options="-c listen_addresses=127.0.0.1 -c fsync=off",
        )
        try:
            executor.start()
            server = PgServer(executor, "127.0.0.1", port)
            with psycopg.connect(server.url("postgres"), connect_timeout=30):
                return server
        except Exception:
            log = base / f"server-{port}.log"
            if attempt == 2:
                print(log.read_text(errors="replace") if log.exists() else "no server log")
                raise
            with contextlib.suppress(Exception):
                executor.stop()
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def pg_url(pg_server: PgServer) -> str:
    """The session's database with lpengine's schema (use a `unique_batch()` name in it)."""
    return pg_server.url(pg_server.create_database())


def unique_batch() -> str:
    return f"batch-{uuid.uuid4().hex[:12]}"
