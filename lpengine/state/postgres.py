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

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from lpengine.errors import BatchLockedError, StateStoreError
from lpengine.state.base import FileStamp, StoredItem, StoredUpload, stored_item

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


class PostgresStateStore:
    """One batch's state in a shared PostgreSQL database."""

    def __init__(self, url: str, batch: str, *, exclusive: bool = False, outage_s: float = OUTAGE_S) -> None:
        self.url = url
        self.batch = batch
        self.exclusive = exclusive
        self.outage_s = outage_s
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._lock_conn: psycopg.AsyncConnection[Any] | None = None

    def __repr__(self) -> str:
        return f"PostgresStateStore({where(self.url)}, batch={self.batch!r})"

    async def __aenter__(self) -> Self:
        conn = await _connect(self.url)
        try:
            version = await schema_version(conn)
            if version == SCHEMA_VERSION and self.exclusive:
                await self._lock_batch(conn)
        except BaseException:
            await conn.close()
            raise
        if self.exclusive:
            self._lock_conn = conn
        else:
            await conn.close()
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
        return self

    async def _lock_batch(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """One run of a batch at a time, across hosts: a session advisory lock, which PostgreSQL releases when its
        holder's connection ends (a killed run never blocks the next one)."""
        row = await (
            await conn.execute(b"SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self.batch,))
        ).fetchone()
        if not row or not row[0]:
            raise BatchLockedError(
                f"another run of batch {self.batch!r} is in progress on the state {where(self.url)}; "
                "this run exits without doing anything"
            )

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
            if self._lock_conn is not None:
                await self._lock_conn.close()  # releases the batch lock
                self._lock_conn = None

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

    async def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(sql.encode(), args)

        with anyio.CancelScope(shield=True):  # a write that started reaches the database, as with SQLite
            await self._run(work)

    async def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
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
        await self._write(
            "INSERT INTO lpengine.items (batch, item_id, output_name, image_sha, state, stage, task_id, data, "
            "updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (batch, item_id) DO UPDATE SET "
            "state = excluded.state, stage = excluded.stage, task_id = excluded.task_id, data = excluded.data, "
            "updated_at = excluded.updated_at",
            (
                self.batch,
                item_id,
                output_name,
                image_sha,
                data.get("state"),
                data.get("stage", "plan"),
                data.get("task_id"),
                orjson.dumps(data).decode(),
                time.time(),
            ),
        )

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
        return StoredUpload(str(row[0]), bool(row[1]), float(row[2]), row[3]) if row else None

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
