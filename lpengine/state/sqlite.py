"""Crash-safe record of every item's progress, so a re-run never pays twice and never loses a result.

SQLite in WAL mode: a committed transaction survives the process being killed at any instruction (power loss
may drop the last few with `synchronous=NORMAL`, never corrupt the file). The engine commits *before* each paid
or irreversible step and *after* each result (write-ahead discipline); see docs/cron.md for the resume rules.

Statements run on the event loop's own thread, deliberately. With WAL and `synchronous=NORMAL` a commit appends
to the WAL file without fsync: a point write or read takes 10–30 µs, while handing it to a worker thread
(aiosqlite did) cost ~100 µs of CPU in futexes and loop wake-ups, the largest single cost per item at 100k items
(docs/benchmarks.md). Only a WAL checkpoint (every ~1000 pages) fsyncs, a few ms now and then; the only other
writer would be a second run, which the run lock excludes. Bulk reads yield between chunks.

The `StateStore` protocol (lpengine/state/base.py) is the seam; lpengine/state/postgres.py implements it for several
workers sharing a batch.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import orjson

from lpengine.errors import ConfigError
from lpengine.state.base import FileStamp, StoredItem, StoredUpload, stored_item, stored_upload

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item_id     TEXT PRIMARY KEY,
    output_name TEXT NOT NULL,
    image_sha   TEXT,
    state       TEXT,
    stage       TEXT NOT NULL,
    task_id     TEXT,
    data        TEXT NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_task ON items(task_id);
CREATE INDEX IF NOT EXISTS items_output ON items(output_name);
-- The small keyed tables are WITHOUT ROWID: one B-tree instead of a table plus the index of its text key, so a
-- write touches one page fewer (-13 us of CPU per item in scripts/bench_store.py; docs/benchmarks.md). Not
-- `items`, whose ~1 KB rows make the clustered layout slower. Older files keep their tables; both layouts work.
CREATE TABLE IF NOT EXISTS detect_cache (
    image_sha TEXT PRIMARY KEY,
    passed    INTEGER,
    message   TEXT NOT NULL,
    at        REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uploads (
    sha        TEXT NOT NULL,
    model      TEXT NOT NULL,
    backend    TEXT NOT NULL,
    url        TEXT NOT NULL,
    resolve    INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    created_key TEXT,
    PRIMARY KEY (sha, model, backend)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS task_claims (
    task_id     TEXT PRIMARY KEY,
    item_id     TEXT NOT NULL,
    claimed_wall REAL NOT NULL
) WITHOUT ROWID;
-- What an image file held when it was last checked, by path and stat stamp: a re-run knows an unchanged image's
-- content without reading and hashing it again (docs/cron.md).
CREATE TABLE IF NOT EXISTS file_digests (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode    INTEGER NOT NULL,
    sha256   TEXT NOT NULL
) WITHOUT ROWID;
"""

_BUSY_TIMEOUT_S = 5.0  # backstop only: readers in other processes (`lpengine status`) never block a WAL writer
_CHUNK_ROWS = 500


class SqliteStateStore:
    """The embedded default store (one file beside the output)."""

    shared = False
    coordinator = None  # one process per batch: the run lock (lpengine/state/lock.py)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    async def __aenter__(self) -> Self:
        try:
            await anyio.Path(self.path.parent).mkdir(parents=True, exist_ok=True)
            # Autocommit: every statement is its own committed transaction.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            raise ConfigError([unusable_state(self.path, exc)]) from None
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("state store used outside `async with`")
        return self._db

    @contextmanager
    def together(self) -> Iterator[None]:
        """The writes made inside commit as one transaction: one WAL append where each would make its own.

        For writes that follow one another with no I/O between them (the store never yields while writing, so no
        other item's write can slip into the transaction).
        """
        self.db.execute("BEGIN")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # a failed COMMIT (disk full, I/O error) can leave it open too
                self.db.execute("ROLLBACK")  # else every later statement would join this open transaction
            raise

    async def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        # Synchronous, so a write that started reaches the disk even if the run is being cancelled meanwhile.
        self.db.execute(sql, args)  # autocommit: committed when it returns

    async def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        return self.db.execute(sql, args).fetchone()

    async def _all(self, sql: str, args: tuple[Any, ...] = ()) -> AsyncIterator[Any]:
        """Rows in chunks, yielding to the loop between them (a 100k-row scan must not stall the batch)."""
        cur = self.db.execute(sql, args)
        try:
            while rows := cur.fetchmany(_CHUNK_ROWS):
                for row in rows:
                    yield row
                await anyio.lowlevel.checkpoint()
        finally:
            cur.close()

    async def get(self, item_id: str) -> StoredItem | None:
        row = await self._one(
            "SELECT item_id, output_name, state, stage, task_id, data FROM items WHERE item_id = ?",
            (item_id,),
        )
        return stored_item(row) if row else None

    async def put(self, item_id: str, output_name: str, image_sha: str | None, data: dict[str, Any]) -> None:
        await self._write(
            "INSERT INTO items (item_id, output_name, image_sha, state, stage, task_id, data, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(item_id) DO UPDATE SET "
            "state=excluded.state, stage=excluded.stage, task_id=excluded.task_id, data=excluded.data, "
            "updated_at=excluded.updated_at",
            (
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
        row = await self._one("SELECT passed, message FROM detect_cache WHERE image_sha = ?", (image_sha,))
        if row is None:
            return None
        return (None if row[0] is None else bool(row[0]), str(row[1]))

    async def put_detect(self, image_sha: str, passed: bool | None, message: str) -> None:
        """`passed=None` is the write-ahead mark committed before the paid call."""
        await self._write(
            "INSERT OR REPLACE INTO detect_cache (image_sha, passed, message, at) VALUES (?, ?, ?, ?)",
            (image_sha, None if passed is None else int(passed), message, time.time()),
        )

    async def forget_detect(self, image_sha: str) -> None:
        await self._write("DELETE FROM detect_cache WHERE image_sha = ?", (image_sha,))

    async def upload(self, sha: str, model: str, backend: str) -> StoredUpload | None:
        row = await self._one(
            "SELECT url, resolve, expires_at, created_key FROM uploads WHERE sha = ? AND model = ? AND backend = ?",
            (sha, model, backend),
        )
        return stored_upload(row)

    async def put_upload(self, sha: str, model: str, backend: str, upload: StoredUpload) -> None:
        await self._write(
            # a later publish that found the object already there must not forget that this batch created it
            "INSERT INTO uploads (sha, model, backend, url, resolve, expires_at, created_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sha, model, backend) DO UPDATE SET url=excluded.url, "
            "resolve=excluded.resolve, expires_at=excluded.expires_at, "
            "created_key=COALESCE(excluded.created_key, uploads.created_key)",
            (
                sha,
                model,
                backend,
                upload.url,
                int(upload.needs_resolve_header),
                upload.expires_at,
                upload.created_key,
            ),
        )

    async def claim_task(self, task_id: str, item_id: str, wall: float) -> bool:
        """Bind a task to an item; False if another item already owns it (reconciliation must not double-adopt).

        `wall` is the local time the id became known: with the list's `gmt_create` it calibrates the service clock.
        """
        cur = self.db.execute(
            "INSERT OR IGNORE INTO task_claims (task_id, item_id, claimed_wall) VALUES (?, ?, ?)",
            (task_id, item_id, wall),
        )
        if cur.rowcount == 1:
            return True
        row = await self._one("SELECT item_id FROM task_claims WHERE task_id = ?", (task_id,))
        return bool(row and row[0] == item_id)

    async def claim_times(self) -> dict[str, float]:
        rows = self._all("SELECT task_id, claimed_wall FROM task_claims")
        return {str(r[0]): float(r[1]) async for r in rows}

    async def claimed_since(self, item_id: str, wall: float) -> str | None:
        """The task this item claimed at or after `wall` (a crash can fall between the claim and the item's save)."""
        row = await self._one(
            "SELECT task_id FROM task_claims WHERE item_id = ? AND claimed_wall >= ? ORDER BY claimed_wall DESC",
            (item_id, wall),
        )
        return str(row[0]) if row else None

    async def inflight_submits(self) -> list[tuple[str, float]]:
        """Items whose submit was sent but whose answer never arrived, with the local send time."""
        rows = self._all(
            "SELECT item_id, json_extract(data, '$.submit_inflight_wall') FROM items "
            "WHERE task_id IS NULL AND json_extract(data, '$.submit_inflight_wall') IS NOT NULL"
        )
        return [(str(r[0]), float(r[1])) async for r in rows]

    async def created_keys(self) -> list[str]:
        rows = self._all("SELECT DISTINCT created_key FROM uploads WHERE created_key IS NOT NULL")
        return [str(r[0]) async for r in rows]

    async def digest(self, path: str, stamp: FileStamp) -> str | None:
        """The SHA-256 recorded for `path` when it last had this stamp; None if it was never checked or changed."""
        row = await self._one(
            "SELECT sha256 FROM file_digests "
            "WHERE path = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ? AND inode = ?",
            (path, *stamp),
        )
        return str(row[0]) if row else None

    async def put_digest(self, path: str, stamp: FileStamp, sha256: str) -> None:
        await self._write(
            "INSERT OR REPLACE INTO file_digests (path, size, mtime_ns, ctime_ns, inode, sha256) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (path, *stamp, sha256),
        )

    async def forget_created_keys(self, keys: list[str]) -> None:
        with self.together():  # one transaction for the lot (autocommit would commit each row)
            self.db.executemany("DELETE FROM uploads WHERE created_key = ?", [(k,) for k in keys])

    async def redo_epoch(self) -> int:
        row = await self._one("SELECT max(json_extract(data, '$.redo.epoch')) FROM items", ())
        return int(row[0]) if row and row[0] is not None else 0

    async def start_redo(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        with self.together():
            self.db.executemany(
                "UPDATE items SET state = ?, stage = ?, task_id = ?, data = ?, updated_at = ? WHERE item_id = ?",
                [
                    (d.get("state"), d.get("stage", "plan"), d.get("task_id"), orjson.dumps(d).decode(), time.time(), i)
                    for i, d in items
                ],
            )

    async def workers(self) -> list[dict[str, Any]]:
        return []  # one process at a time (the run lock): `lpengine status` lists no workers

    async def items(self) -> AsyncIterator[StoredItem]:
        """Every item, streamed (reports of 100k items must not load them all at once)."""
        async for row in self._all(
            "SELECT item_id, output_name, state, stage, task_id, data FROM items ORDER BY output_name"
        ):
            yield stored_item(row)


def unusable_state(path: Path, exc: OSError | sqlite3.Error) -> str:
    """One line for a state file that cannot be opened: what is wrong with it, and what to do."""
    reason = exc.strerror if isinstance(exc, OSError) else str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return (
            f"state.path: {path} is damaged ({reason}); restore it from a backup. Moving it aside starts the "
            "batch afresh, and then every item is checked and paid for again"
        )
    return (
        f"state.path: cannot open {path} for writing ({reason}); lpengine writes beside it even to read it: "
        "run as the folder's owner, or fix its permissions"
    )
