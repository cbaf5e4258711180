"""The SQLite file in particular (tests/unit/test_store_contract.py holds both backends to the interface): writes
made `together()` commit as one transaction or not at all, and older files stay usable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lpengine.state.sqlite import SqliteStateStore

pytestmark = pytest.mark.anyio


def _deferred_violation(store: SqliteStateStore) -> None:
    """A write that only COMMIT refuses (a deferred foreign key): the way a full disk fails a commit."""
    store.db.execute("PRAGMA foreign_keys=ON")
    store.db.execute("CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY)")
    store.db.execute("CREATE TEMP TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")


async def test_a_failed_commit_rolls_back_and_later_writes_commit_on_their_own(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with SqliteStateStore(path) as store:
        _deferred_violation(store)
        with pytest.raises(sqlite3.IntegrityError), store.together():
            await store.put_detect("a" * 64, True, "face found")
            store.db.execute("INSERT INTO child (pid) VALUES (42)")
        assert not store.db.in_transaction
        assert await store.detect_verdict("a" * 64) is None  # rolled back with the rest
        await store.put_detect("b" * 64, False, "no face")  # autocommits again, not into a dangling transaction
    async with SqliteStateStore(path) as reopened:
        assert await reopened.detect_verdict("b" * 64) == (False, "no face")
        assert await reopened.detect_verdict("a" * 64) is None


async def test_writes_made_together_are_committed_together(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with SqliteStateStore(path) as store:
        with store.together():
            await store.put_detect("a" * 64, True, "face found")
            await store.claim_task("task-1", "item-1", 1.0)
        assert not store.db.in_transaction
    async with SqliteStateStore(path) as reopened:
        assert await reopened.detect_verdict("a" * 64) == (True, "face found")
        assert await reopened.claimed_since("item-1", 0.0) == "task-1"


_EARLIER_LAYOUT = """
CREATE TABLE detect_cache (image_sha TEXT PRIMARY KEY, passed INTEGER, message TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE uploads (sha TEXT NOT NULL, model TEXT NOT NULL, backend TEXT NOT NULL, url TEXT NOT NULL,
    resolve INTEGER NOT NULL, expires_at REAL NOT NULL, created_key TEXT, PRIMARY KEY (sha, model, backend));
CREATE TABLE task_claims (task_id TEXT PRIMARY KEY, item_id TEXT NOT NULL, claimed_wall REAL NOT NULL);
INSERT INTO detect_cache VALUES ('c', 1, 'face found', 1.0);
INSERT INTO task_claims VALUES ('task-0', 'item-0', 1.0);
"""


async def test_a_state_file_with_the_earlier_rowid_tables_keeps_its_rows_and_takes_new_ones(tmp_path: Path) -> None:
    """Files written before the small tables became WITHOUT ROWID are opened as they are, not rebuilt."""
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(_EARLIER_LAYOUT)
    async with SqliteStateStore(path) as store:
        assert await store.detect_verdict("c") == (True, "face found")
        assert not await store.claim_task("task-0", "item-1", 2.0)  # still owned by item-0
        assert await store.claim_task("task-1", "item-1", 2.0)
        await store.put_detect("d", None, "")
        earlier = _without_rowid(store)
    assert earlier == {"items": 0, "detect_cache": 0, "uploads": 0, "task_claims": 0, "file_digests": 1}  # added
    async with SqliteStateStore(tmp_path / "new.db") as fresh:
        assert _without_rowid(fresh) == {
            "items": 0,
            "detect_cache": 1,
            "uploads": 1,
            "task_claims": 1,
            "file_digests": 1,
        }


def _without_rowid(store: SqliteStateStore) -> dict[str, int]:
    return dict(store.db.execute("SELECT name, sql LIKE '%WITHOUT ROWID%' FROM sqlite_master WHERE type = 'table'"))
