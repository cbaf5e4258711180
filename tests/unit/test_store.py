"""Writes made `together()` commit as one transaction, or not at all, and never leave one open behind them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lpengine.state.store import SqliteStateStore

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
