"""PostgreSQL state store: the same record as the SQLite file, in a database several workers and hosts share.

Each batch's rows carry its name (`state.batch`), so one database holds many batches. Tables live in the `lpengine`
schema, created and upgraded only by `lpengine db upgrade` (versioned migrations below): a run never changes the
schema behind other workers' backs, and stops with a message naming the command when the version differs.

Every write is its own committed statement, sent from a connection pool and shielded from cancellation, so a write
that started reaches the database even when the run is being stopped. Writes are idempotent (upserts, claim by
`ON CONFLICT DO NOTHING`), so when the server goes away (a restart, a failover) a statement is simply sent again
once it is back: the run pauses, for at most `OUTAGE_S`, instead of losing or duplicating work.

psycopg 3 rather than asyncpg: the same driver serves the async engine and the synchronous CLI commands, it speaks
libpq's URLs, `PGPASSWORD` and `~/.pgpass` exactly as `psql` does, and psycopg_pool is its maintained pool.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from lpengine.errors import LeaseLostError, StateStoreError
from lpengine.state.base import FileStamp, QueueView, StoredItem, StoredUpload, stored_item, stored_upload

T = TypeVar("T")

OUTAGE_S = 120.0
"""How long a run waits for a database that went away before it stops (a re-run resumes)."""
_CONNECT_TIMEOUT_S = 10
_POOL_MAX = 10  # the stages' concurrent writers at the default concurrency, each holding a connection one round trip
_CHUNK_ROWS = 500

_MIGRATIONS: tuple[str, ...] = (
    # 1: the SQLite file's five tables, keyed by batch.
    """
    CREATE TABLE lpengine.items (
        batch       TEXT NOT NULL,
        item_id     TEXT NOT NULL,
        output_name TEXT NOT NULL,
        image_sha   TEXT,
        state       TEXT,
        stage       TEXT NOT NULL,
        task_id     TEXT,
        data        JSON NOT NULL,
        updated_at  DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (batch, item_id)
    );
    CREATE INDEX items_output ON lpengine.items (batch, output_name COLLATE "C", item_id);
    CREATE INDEX items_task ON lpengine.items (batch, task_id);
    CREATE TABLE lpengine.detect_cache (
        batch     TEXT NOT NULL,
        image_sha TEXT NOT NULL,
        passed    BOOLEAN,
        message   TEXT NOT NULL,
        at        DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (batch, image_sha)
    );
    CREATE TABLE lpengine.uploads (
        batch       TEXT NOT NULL,
        sha         TEXT NOT NULL,
        model       TEXT NOT NULL,
        backend     TEXT NOT NULL,
        url         TEXT NOT NULL,
        resolve     BOOLEAN NOT NULL,
        expires_at  DOUBLE PRECISION NOT NULL,
        created_key TEXT,
        PRIMARY KEY (batch, sha, model, backend)
    );
    CREATE TABLE lpengine.task_claims (
        batch        TEXT NOT NULL,
        task_id      TEXT NOT NULL,
        item_id      TEXT NOT NULL,
        claimed_wall DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (batch, task_id)
    );
    CREATE INDEX task_claims_item ON lpengine.task_claims (batch, item_id);
    CREATE TABLE lpengine.file_digests (
        batch    TEXT NOT NULL,
        path     TEXT NOT NULL,
        size     BIGINT NOT NULL,
        mtime_ns BIGINT NOT NULL,
        ctime_ns BIGINT NOT NULL,
        inode    BIGINT NOT NULL,
        sha256   TEXT NOT NULL,
        PRIMARY KEY (batch, path)
    );
    """,
    # 2: cooperative workers. A worker is live while its heartbeat (the database's clock) is younger than its lease;
    # an item belongs to the worker holding its lease, and a dead worker's items are taken over.
    """
    CREATE TABLE lpengine.workers (
        batch        TEXT NOT NULL,
        worker_id    TEXT NOT NULL,
        host         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        lease_s      DOUBLE PRECISION NOT NULL,
        started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (batch, worker_id)
    );
    CREATE TABLE lpengine.leases (
        batch      TEXT NOT NULL,
        item_id    TEXT NOT NULL,
        owner      TEXT NOT NULL,
        claimed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (batch, item_id)
    );
    CREATE INDEX leases_owner ON lpengine.leases (batch, owner);
    -- The account's request schedule per endpoint family, shared by every worker of every batch on that account.
    CREATE TABLE lpengine.pacing (
        account TEXT NOT NULL,
        family  TEXT NOT NULL,
        next_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (account, family)
    );
    """,
    # 3: the account's submission window and queue. A row per item holding a place in the window (its task about to
    # be sent, or at the service), shared by every worker of every batch on the account; times on the database's
    # clock. `runners` keeps when the account's runner was last seen free.
    """
    CREATE TABLE lpengine.account_tasks (
        account      TEXT NOT NULL,
        batch        TEXT NOT NULL,
        item_id      TEXT NOT NULL,
        worker       TEXT NOT NULL,
        taken_at     DOUBLE PRECISION NOT NULL,
        audio_s      DOUBLE PRECISION NOT NULL,
        submitted_at DOUBLE PRECISION,
        PRIMARY KEY (account, batch, item_id)
    );
    CREATE TABLE lpengine.runners (
        account TEXT PRIMARY KEY,
        free_at DOUBLE PRECISION NOT NULL
    );
    -- One statement for the caller; inside, one taker per account at a time (the advisory lock), and each statement
    -- sees what earlier takers committed (a volatile function takes a new snapshot per statement).
    CREATE FUNCTION lpengine.take_slot(p_account TEXT, p_batch TEXT, p_item TEXT, p_worker TEXT,
                                       p_audio DOUBLE PRECISION, p_window INTEGER) RETURNS BOOLEAN
    LANGUAGE plpgsql AS $$
    DECLARE
        outstanding INTEGER;
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtext('lpengine.account_tasks'), hashtext(p_account));
        -- an item whose task is at the service already (taken over from a dead worker) keeps its place
        UPDATE lpengine.account_tasks SET worker = p_worker
            WHERE account = p_account AND batch = p_batch AND item_id = p_item AND submitted_at IS NOT NULL;
        IF FOUND THEN
            RETURN TRUE;
        END IF;
        -- places of workers that left are free (what they left is taken over, and takes its place again)
        DELETE FROM lpengine.account_tasks t WHERE t.account = p_account AND NOT EXISTS (
            SELECT 1 FROM lpengine.workers w WHERE w.batch = t.batch AND w.worker_id = t.worker);
        SELECT count(*) INTO outstanding FROM lpengine.account_tasks t
            JOIN lpengine.workers w ON w.batch = t.batch AND w.worker_id = t.worker
            WHERE t.account = p_account AND NOT (t.batch = p_batch AND t.item_id = p_item)
            AND w.heartbeat_at > now() - make_interval(secs => w.lease_s);
        IF outstanding >= p_window THEN
            RETURN FALSE;
        END IF;
        INSERT INTO lpengine.account_tasks AS t (account, batch, item_id, worker, taken_at, audio_s)
            VALUES (p_account, p_batch, p_item, p_worker, extract(epoch from clock_timestamp()), p_audio)
            ON CONFLICT (account, batch, item_id) DO UPDATE SET worker = excluded.worker,
            taken_at = excluded.taken_at, audio_s = excluded.audio_s, submitted_at = NULL;
        RETURN TRUE;
    END $$;
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
_SCHEMA_LOCK = 0x6C70656E67696E65  # "lpengine": one upgrade at a time, however many hosts run it


def where(url: str) -> str:
    """'database "d" on host:port' for messages: what to check, never the password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the database of state.url / LPENGINE_STATE_URL (the URL cannot be parsed)"
    host = info.get("host") or "the local Unix socket"
    port = info.get("port") or "5432"
    dbname = info.get("dbname") or info.get("user") or "(default)"
    return f'database "{dbname}" on {host}:{port}'


def _reason(exc: BaseException, url: str) -> str:
    """libpq's own words (the last line says what failed), with the password removed should it ever appear."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.ProgrammingError:
        password = None
    return text.replace(str(password), "***") if password else text


async def _connect(url: str) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S)
    except psycopg.ProgrammingError:
        raise StateStoreError(
            "state.url / LPENGINE_STATE_URL is not a valid PostgreSQL URL; write postgresql://user@host:5432/dbname"
        ) from None
    except psycopg.OperationalError as exc:
        reason = _reason(exc, url)
        if "password" in reason or "authentication" in reason or "role" in reason:
            fix = "check the user and password (LPENGINE_STATE_URL, PGPASSWORD or ~/.pgpass)"
        elif "does not exist" in reason:
            fix = "create the database, then run `lpengine db upgrade CONFIG`"
        else:
            fix = "check that the server runs and the host and port are right"
        raise StateStoreError(
            f"cannot use the state {where(url)}: {reason}; {fix}. Nothing was sent to DashScope.",
            retryable=not ("password" in reason or "authentication" in reason),
        ) from None


async def schema_version(conn: psycopg.AsyncConnection[Any]) -> int:
    """The database's lpengine schema version; 0 when it has none."""
    row = await (await conn.execute("SELECT to_regclass('lpengine.schema_version') IS NOT NULL")).fetchone()
    if not row or not row[0]:
        return 0
    row = await (await conn.execute("SELECT version FROM lpengine.schema_version")).fetchone()
    return int(row[0]) if row else 0


async def upgrade(url: str) -> tuple[int, int]:
    """Apply the missing migrations in one transaction; (version before, version after)."""
    async with await _connect(url) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        await conn.execute("CREATE SCHEMA IF NOT EXISTS lpengine")
        await conn.execute("CREATE TABLE IF NOT EXISTS lpengine.schema_version (version INTEGER NOT NULL)")
        before = await schema_version(conn)
        if before > SCHEMA_VERSION:
            raise StateStoreError(
                f"the state {where(url)} has schema version {before}, newer than this lpengine's "
                f"{SCHEMA_VERSION}; upgrade lpengine on this host"
            )
        for sql in _MIGRATIONS[before:]:
            await conn.execute(sql.encode())
        await conn.execute("DELETE FROM lpengine.schema_version")
        await conn.execute("INSERT INTO lpengine.schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
    return before, SCHEMA_VERSION


# A lease's owner is live while its heartbeat, on the database's clock, is younger than its lease: a worker whose own
# clock is off by minutes neither expires others' leases early nor keeps its own alive.
_LIVE = (
    "EXISTS (SELECT 1 FROM lpengine.workers w WHERE w.batch = l.batch AND w.worker_id = l.owner "
    "AND w.heartbeat_at > now() - make_interval(secs => w.lease_s))"
)
_NOW = "extract(epoch from now())"


class PostgresStateStore:
    """One batch's state in a shared PostgreSQL database; with `lease_s`, also one cooperative worker of it."""

    shared = True

    def __init__(self, url: str, batch: str, *, lease_s: float | None = None, outage_s: float = OUTAGE_S) -> None:
        self.url = url
        self.batch = batch
        self.outage_s = outage_s
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self.lease_s = lease_s
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}" if lease_s else None

    def __repr__(self) -> str:
        return f"PostgresStateStore({where(self.url)}, batch={self.batch!r})"

    async def __aenter__(self) -> Self:
        async with await _connect(self.url) as conn:
            version = await schema_version(conn)
        if version != SCHEMA_VERSION:
            state = "has no lpengine tables" if version == 0 else f"has schema version {version}"
            hint = (
                "run `lpengine db upgrade CONFIG` once (from any host)"
                if version < SCHEMA_VERSION
                else "upgrade lpengine on this host"
            )
            raise StateStoreError(
                f"the state {where(self.url)} {state}, this lpengine needs version {SCHEMA_VERSION}: {hint}. "
                "Nothing was sent to DashScope."
            )
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=_POOL_MAX,
            kwargs={"autocommit": True, "connect_timeout": _CONNECT_TIMEOUT_S},
            open=False,
            name="lpengine-state",
        )
        await pool.open(wait=True, timeout=_CONNECT_TIMEOUT_S)
        self._pool = pool
        if self.worker_id is not None:
            await self._write(
                "INSERT INTO lpengine.workers (batch, worker_id, host, pid, lease_s) VALUES (%s, %s, %s, %s, %s)",
                (self.batch, self.worker_id, socket.gethostname(), os.getpid(), self.lease_s),
            )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is None:
            return
        with anyio.CancelScope(shield=True):
            if self.worker_id is not None:
                # Gone at once rather than after its lease: what this worker leaves unfinished is taken over now.
                with anyio.move_on_after(_CONNECT_TIMEOUT_S):
                    await self._pool_execute(
                        "DELETE FROM lpengine.workers WHERE batch = %s AND worker_id = %s", (self.batch, self.worker_id)
                    )
            await self._pool.close()
            self._pool = None

    async def _pool_execute(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            async with self.pool.connection(timeout=_CONNECT_TIMEOUT_S) as conn:
                await conn.execute(sql.encode(), args)
        except psycopg.OperationalError:
            pass  # the lease then simply expires

    @property
    def pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            raise RuntimeError("state store used outside `async with`")
        return self._pool

    @contextmanager
    def together(self) -> Iterator[None]:
        """Each write commits by itself here (see `StateStore`): one transaction would hold a pooled connection
        across the caller's awaits."""
        yield

    async def _run(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """`work` on a pooled connection; while the server is unreachable, wait and send it again (it is idempotent)."""
        deadline: float | None = None
        pause = 0.2
        while True:
            try:
                async with self.pool.connection(timeout=_CONNECT_TIMEOUT_S) as conn:
                    return await work(conn)
            except psycopg.OperationalError as exc:
                now = time.monotonic()
                deadline = deadline or now + self.outage_s
                if now >= deadline:
                    raise StateStoreError(
                        f"lost the state {where(self.url)} for over {self.outage_s:.0f} s "
                        f"({_reason(exc, self.url)}); the run stops, a re-run resumes",
                        retryable=True,
                    ) from None
                await anyio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def _write(self, sql: str, args: tuple[Any, ...] | dict[str, Any]) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(sql.encode(), args)

        with anyio.CancelScope(shield=True):  # a write that started reaches the database, as with SQLite
            await self._run(work)

    async def _one(self, sql: str, args: tuple[Any, ...] | dict[str, Any]) -> Any:
        async def work(conn: psycopg.AsyncConnection[Any]) -> Any:
            return await (await conn.execute(sql.encode(), args)).fetchone()

        return await self._run(work)

    async def _all(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        async def work(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
            return await (await conn.execute(sql.encode(), args)).fetchall()

        return await self._run(work)

    async def get(self, item_id: str) -> StoredItem | None:
        row = await self._one(
            "SELECT item_id, output_name, state, stage, task_id, data::text FROM lpengine.items "
            "WHERE batch = %s AND item_id = %s",
            (self.batch, item_id),
        )
        return stored_item(row) if row else None

    async def put(self, item_id: str, output_name: str, image_sha: str | None, data: dict[str, Any]) -> None:
        """As a worker, only while this worker holds the item's lease (`LeaseLostError` otherwise): a worker that
        was presumed dead and taken over cannot overwrite its successor's progress."""
        args = (
            self.batch,
            item_id,
            output_name,
            image_sha,
            data.get("state"),
            data.get("stage", "plan"),
            data.get("task_id"),
            orjson.dumps(data).decode(),
        )
        if self.worker_id is None:
            await self._write(_PUT, args)
            return

        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            return (await conn.execute(_PUT_FENCED, (*args, self.worker_id))).rowcount

        with anyio.CancelScope(shield=True):
            if await self._run(work) == 0:
                raise LeaseLostError(f"{output_name}: taken over by another worker (this one was presumed dead)")

    async def detect_verdict(self, image_sha: str) -> tuple[bool | None, str] | None:
        """None: never asked. (None, _): asked, but the answer was lost in a crash (the call may be billed)."""
        row = await self._one(
            "SELECT passed, message FROM lpengine.detect_cache WHERE batch = %s AND image_sha = %s",
            (self.batch, image_sha),
        )
        return (row[0], str(row[1])) if row else None

    async def put_detect(self, image_sha: str, passed: bool | None, message: str) -> None:
        await self._write(
            "INSERT INTO lpengine.detect_cache (batch, image_sha, passed, message, at) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (batch, image_sha) DO UPDATE SET passed = excluded.passed, message = excluded.message, "
            "at = excluded.at",
            (self.batch, image_sha, passed, message, time.time()),
        )

    async def forget_detect(self, image_sha: str) -> None:
        await self._write(
            "DELETE FROM lpengine.detect_cache WHERE batch = %s AND image_sha = %s", (self.batch, image_sha)
        )

    async def upload(self, sha: str, model: str, backend: str) -> StoredUpload | None:
        row = await self._one(
            "SELECT url, resolve, expires_at, created_key FROM lpengine.uploads "
            "WHERE batch = %s AND sha = %s AND model = %s AND backend = %s",
            (self.batch, sha, model, backend),
        )
        return stored_upload(row)

    async def put_upload(self, sha: str, model: str, backend: str, upload: StoredUpload) -> None:
        await self._write(
            "INSERT INTO lpengine.uploads (batch, sha, model, backend, url, resolve, expires_at, created_key) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (batch, sha, model, backend) DO UPDATE SET "
            "url = excluded.url, resolve = excluded.resolve, expires_at = excluded.expires_at, "
            "created_key = COALESCE(excluded.created_key, uploads.created_key)",
            (
                self.batch,
                sha,
                model,
                backend,
                upload.url,
                upload.needs_resolve_header,
                upload.expires_at,
                upload.created_key,
            ),
        )

    async def claim_task(self, task_id: str, item_id: str, wall: float) -> bool:
        """Bind a task to an item in one statement; False if another item owns it. Sent again after an outage, it
        finds its own claim and still answers True."""

        async def work(conn: psycopg.AsyncConnection[Any]) -> Any:
            return await (
                await conn.execute(
                    b"WITH ins AS (INSERT INTO lpengine.task_claims (batch, task_id, item_id, claimed_wall) "
                    b"VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING item_id) "
                    b"SELECT item_id FROM ins UNION ALL "
                    b"SELECT item_id FROM lpengine.task_claims WHERE batch = %s AND task_id = %s LIMIT 1",
                    (self.batch, task_id, item_id, wall, self.batch, task_id),
                )
            ).fetchone()

        with anyio.CancelScope(shield=True):
            row = await self._run(work)
        return bool(row and row[0] == item_id)

    async def claim_times(self) -> dict[str, float]:
        rows = await self._all("SELECT task_id, claimed_wall FROM lpengine.task_claims WHERE batch = %s", (self.batch,))
        return {str(r[0]): float(r[1]) for r in rows}

    async def claimed_since(self, item_id: str, wall: float) -> str | None:
        row = await self._one(
            "SELECT task_id FROM lpengine.task_claims WHERE batch = %s AND item_id = %s AND claimed_wall >= %s "
            "ORDER BY claimed_wall DESC LIMIT 1",
            (self.batch, item_id, wall),
        )
        return str(row[0]) if row else None

    async def inflight_submits(self) -> list[tuple[str, float]]:
        rows = await self._all(
            "SELECT item_id, (data->>'submit_inflight_wall')::float8 FROM lpengine.items "
            "WHERE batch = %s AND task_id IS NULL AND data->>'submit_inflight_wall' IS NOT NULL",
            (self.batch,),
        )
        return [(str(r[0]), float(r[1])) for r in rows]

    async def created_keys(self) -> list[str]:
        rows = await self._all(
            "SELECT DISTINCT created_key FROM lpengine.uploads WHERE batch = %s AND created_key IS NOT NULL",
            (self.batch,),
        )
        return [str(r[0]) for r in rows]

    async def forget_created_keys(self, keys: list[str]) -> None:
        await self._write("DELETE FROM lpengine.uploads WHERE batch = %s AND created_key = ANY(%s)", (self.batch, keys))

    async def digest(self, path: str, stamp: FileStamp) -> str | None:
        row = await self._one(
            "SELECT sha256 FROM lpengine.file_digests WHERE batch = %s AND path = %s AND size = %s "
            "AND mtime_ns = %s AND ctime_ns = %s AND inode = %s",
            (self.batch, path, *stamp),
        )
        return str(row[0]) if row else None

    async def put_digest(self, path: str, stamp: FileStamp, sha256: str) -> None:
        await self._write(
            "INSERT INTO lpengine.file_digests (batch, path, size, mtime_ns, ctime_ns, inode, sha256) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (batch, path) DO UPDATE SET size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, inode = excluded.inode, "
            "sha256 = excluded.sha256",
            (self.batch, path, *stamp, sha256),
        )

    async def redo_epoch(self) -> int:
        row = await self._one(
            "SELECT max((data->'redo'->>'epoch')::int) FROM lpengine.items WHERE batch = %s", (self.batch,)
        )
        return int(row[0]) if row and row[0] is not None else 0

    async def start_redo(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        """One transaction on one connection (the only multi-row one here): it holds no caller's await."""
        rows = [
            (d.get("state"), d.get("stage", "plan"), d.get("task_id"), orjson.dumps(d).decode(), self.batch, i)
            for i, d in items
        ]

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(
                    b"UPDATE lpengine.items SET state = %s, stage = %s, task_id = %s, data = %s, "
                    b"updated_at = extract(epoch from now()) WHERE batch = %s AND item_id = %s",
                    rows,
                )

        with anyio.CancelScope(shield=True):  # idempotent: sent again whole after an outage
            await self._run(work)

    async def items(self) -> AsyncIterator[StoredItem]:
        """Every item in output-name order, a page at a time (keyset paging: no cursor held across yields)."""
        after: tuple[str, str] | None = None
        while True:
            if after is None:
                rows = await self._all(
                    "SELECT item_id, output_name, state, stage, task_id, data::text FROM lpengine.items "
                    'WHERE batch = %s ORDER BY output_name COLLATE "C", item_id LIMIT %s',
                    (self.batch, _CHUNK_ROWS),
                )
            else:
                rows = await self._all(
                    "SELECT item_id, output_name, state, stage, task_id, data::text FROM lpengine.items "
                    'WHERE batch = %s AND (output_name COLLATE "C", item_id) > (%s, %s) '
                    'ORDER BY output_name COLLATE "C", item_id LIMIT %s',
                    (self.batch, after[0], after[1], _CHUNK_ROWS),
                )
            for row in rows:
                yield stored_item(row)
            if len(rows) < _CHUNK_ROWS:
                return
            after = (str(rows[-1][1]), str(rows[-1][0]))

    # -- cooperative workers ------------------------------------------------------------------------------------

    @property
    def coordinator(self) -> PostgresStateStore | None:
        return self if self.worker_id is not None else None

    @property
    def heartbeat_every(self) -> float:
        return (self.lease_s or 0.0) / 4

    async def heartbeat(self) -> None:
        """Keep this worker live (a quarter lease apart, so three lost beats in a row still do not expire it)."""
        await self._write(
            "UPDATE lpengine.workers SET heartbeat_at = now() WHERE batch = %s AND worker_id = %s",
            (self.batch, self.worker_id),
        )

    async def claim_item(self, item_id: str) -> bool:
        """Take the item's lease unless a live worker holds it (one statement: two claimants cannot both win)."""

        async def work(conn: psycopg.AsyncConnection[Any]) -> Any:
            return await (await conn.execute(_CLAIM, (self.batch, item_id, self.worker_id))).fetchone()

        with anyio.CancelScope(shield=True):
            row = await self._run(work)
        return row is not None

    async def deferred(self, item_ids: list[str]) -> tuple[list[StoredItem], list[str]]:
        """Of items other workers hold: those they have finished (their rows), and those whose worker died, now
        taken over by this one (`FOR UPDATE SKIP LOCKED`: workers scanning at once take disjoint sets)."""
        rows = await self._all(_SETTLED, (self.batch, item_ids))
        settled = [stored_item(row) for row in rows]
        left = list(set(item_ids) - {s.item_id for s in settled})
        if not left:
            return settled, []

        async def work(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
            return await (await conn.execute(_TAKEOVER, (self.batch, left, self.worker_id, self.batch))).fetchall()

        with anyio.CancelScope(shield=True):
            taken = await self._run(work)
        return settled, [str(r[0]) for r in taken]

    def pacer(self, account: str) -> AccountPacer:
        return AccountPacer(self, account)

    def account_queue(self, account: str) -> SharedQueue:
        return SharedQueue(self, account)

    async def workers(self) -> list[dict[str, Any]]:
        """Every worker this batch has seen and not seen leave, for `lpengine status`."""
        rows = await self._all(_WORKERS, (self.batch,))
        names = ("worker", "host", "pid", "lease_s", "started", "last_heartbeat_s_ago", "live", "items_in_progress")
        return [dict(zip(names, row, strict=True)) for row in rows]


class AccountPacer:
    """The detect/submit/query/upload rates of one account, held across processes: GCRA whose schedule lives in a
    row of `lpengine.pacing`, advanced by one atomic statement per request (the row lock orders the workers)."""

    def __init__(self, store: PostgresStateStore, account: str) -> None:
        self._store = store
        self._account = account

    async def reserve(self, family: str, interval: float) -> float:
        slot, now = await self.slot(family, interval)
        return max(0.0, slot - now)

    async def slot(self, family: str, interval: float) -> tuple[float, float]:
        """(the slot reserved, the time it was reserved at), both on the database's clock."""
        row = await self._store._one(_RESERVE, {"account": self._account, "family": family, "interval": interval})
        assert row is not None  # an upsert with RETURNING always returns its row
        return float(row[0]), float(row[1])


class SharedQueue:
    """The account's submission window and queue in `lpengine.account_tasks` (see `AccountQueue`).

    A place counts while its worker is live: a dead worker's unsent places free themselves, and its tasks at the
    service take their places again when their items are taken over (until then the account may hold a few more
    than the window). Times cross processes on the database's clock, mapped to this process's by the offset each
    answer carries, so hosts' clocks need not agree.
    """

    def __init__(self, store: PostgresStateStore, account: str) -> None:
        self._store = store
        self._account = account
        self._offsets: list[float] = []

    def _calibrate(self, db_now: float, sent: float) -> float:
        """Record the database's clock against ours (half way through the round trip); the offset, smoothed."""
        self._offsets.append(db_now - (sent + anyio.current_time()) / 2)
        del self._offsets[:-21]
        return statistics.median(self._offsets)

    async def take(self, item_id: str, window: int, audio_s: float) -> bool:
        store = self._store
        row = await store._one(
            "SELECT lpengine.take_slot(%s, %s, %s, %s, %s, %s)",
            (self._account, store.batch, item_id, store.worker_id, audio_s, window),
        )
        return bool(row and row[0])

    async def submitted(self, item_id: str) -> float:
        store = self._store
        sent = anyio.current_time()
        row = await store._one(_SUBMITTED, (self._account, store.batch, item_id, store.worker_id))
        if row is None:  # its place was taken over meanwhile: the order is ours to guess
            return sent
        return float(row[0]) - self._calibrate(float(row[1]), sent)

    async def release(self, item_id: str, runner_free: float | None) -> None:
        store = self._store
        free = runner_free + statistics.median(self._offsets) if runner_free is not None and self._offsets else None
        await store._write(
            _RELEASE, {"a": self._account, "b": store.batch, "i": item_id, "w": store.worker_id, "free": free}
        )

    async def view(self) -> QueueView:
        sent = anyio.current_time()
        row = await self._store._one(_VIEW, {"a": self._account, "w": self._store.worker_id})
        assert row is not None  # an aggregate always returns its row
        offset = self._calibrate(float(row[1]), sent)
        return QueueView(
            runner_free=float(row[0]) - offset if row[0] is not None else None,
            queued=[(float(at) - offset, float(audio)) for at, audio in orjson.loads(row[2])],
        )


_SUBMITTED = (
    "UPDATE lpengine.account_tasks SET submitted_at = coalesce(submitted_at, extract(epoch from clock_timestamp())) "
    "WHERE account = %s AND batch = %s AND item_id = %s AND worker = %s "
    "RETURNING submitted_at, extract(epoch from clock_timestamp())"
)
_RELEASE = (
    "WITH gone AS (DELETE FROM lpengine.account_tasks "
    "WHERE account = %(a)s AND batch = %(b)s AND item_id = %(i)s AND worker = %(w)s) "
    "INSERT INTO lpengine.runners AS r (account, free_at) SELECT %(a)s, %(free)s::float8 WHERE %(free)s::float8 "
    "IS NOT NULL ON CONFLICT (account) DO UPDATE SET free_at = greatest(r.free_at, excluded.free_at)"
)
_VIEW = (
    "SELECT (SELECT free_at FROM lpengine.runners WHERE account = %(a)s), extract(epoch from clock_timestamp()), "
    "coalesce((SELECT json_agg(json_build_array(t.submitted_at, t.audio_s)) FROM lpengine.account_tasks t "
    "JOIN lpengine.workers w ON w.batch = t.batch AND w.worker_id = t.worker "
    "WHERE t.account = %(a)s AND t.worker <> %(w)s AND t.submitted_at IS NOT NULL "
    "AND w.heartbeat_at > now() - make_interval(secs => w.lease_s)), '[]')::text"
)
_RESERVE = (
    "INSERT INTO lpengine.pacing AS p (account, family, next_at) "
    "VALUES (%(account)s, %(family)s, extract(epoch from clock_timestamp()) + %(interval)s) "
    "ON CONFLICT (account, family) DO UPDATE "
    "SET next_at = greatest(p.next_at, extract(epoch from clock_timestamp())) + %(interval)s "
    "RETURNING next_at - %(interval)s, extract(epoch from clock_timestamp())"
)
_PUT_COLUMNS = (
    "INSERT INTO lpengine.items (batch, item_id, output_name, image_sha, state, stage, task_id, data, updated_at) "
    f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, {_NOW}) ON CONFLICT (batch, item_id) DO UPDATE SET "
    "state = excluded.state, stage = excluded.stage, task_id = excluded.task_id, data = excluded.data, "
    "updated_at = excluded.updated_at"
)
_PUT = _PUT_COLUMNS
# A worker writes an item only while it holds the lease *and* its own heartbeat is younger than half its lease: a
# successor takes over only once that heartbeat is a whole lease old, so after this write succeeds the writer has
# at least half a lease (at least one request timeout) to send the paid call it guards and hear its outcome.
_PUT_FENCED = (
    _PUT_COLUMNS + " WHERE EXISTS (SELECT 1 FROM lpengine.leases l JOIN lpengine.workers w "
    "ON w.batch = l.batch AND w.worker_id = l.owner "
    "WHERE l.batch = excluded.batch AND l.item_id = excluded.item_id AND l.owner = %s "
    "AND w.heartbeat_at > now() - make_interval(secs => w.lease_s / 2))"
).encode()
_CLAIM = (
    "INSERT INTO lpengine.leases AS l (batch, item_id, owner, claimed_at) "
    f"VALUES (%s, %s, %s, {_NOW}) ON CONFLICT (batch, item_id) DO UPDATE "
    f"SET owner = excluded.owner, claimed_at = excluded.claimed_at WHERE l.owner = excluded.owner OR NOT {_LIVE} "
    "RETURNING 1"
).encode()
# Settled by its holder: a state written since the lease was taken, or a final (non-transient) one.
_SETTLED = (
    "SELECT i.item_id, i.output_name, i.state, i.stage, i.task_id, i.data::text FROM lpengine.items i "
    "JOIN lpengine.leases l ON l.batch = i.batch AND l.item_id = i.item_id "
    "WHERE i.batch = %s AND i.item_id = ANY(%s) AND i.state IS NOT NULL "
    "AND (i.updated_at >= l.claimed_at OR coalesce(i.data->>'transient', 'false') = 'false')"
)
_TAKEOVER = (
    "WITH free AS (SELECT l.item_id FROM lpengine.leases l "
    f"WHERE l.batch = %s AND l.item_id = ANY(%s) AND NOT {_LIVE} FOR UPDATE SKIP LOCKED) "
    f"UPDATE lpengine.leases l SET owner = %s, claimed_at = {_NOW} FROM free "
    "WHERE l.batch = %s AND l.item_id = free.item_id RETURNING l.item_id"
).encode()
_WORKERS = (
    "SELECT w.worker_id, w.host, w.pid, w.lease_s, w.started_at::text, "
    "round(extract(epoch from now() - w.heartbeat_at)::numeric, 1)::float8, "
    "w.heartbeat_at > now() - make_interval(secs => w.lease_s), "
    "(SELECT count(*) FROM lpengine.leases l JOIN lpengine.items i ON i.batch = l.batch AND i.item_id = l.item_id "
    " WHERE l.batch = w.batch AND l.owner = w.worker_id AND i.state IS NULL) "
    "FROM lpengine.workers w WHERE w.batch = %s ORDER BY w.started_at"
)
