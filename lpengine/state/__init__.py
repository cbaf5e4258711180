"""Durable state: the SQLite store and the per-batch run lock."""

from lpengine.state.lock import BatchLock
from lpengine.state.store import SqliteStateStore, StateStore, StoredItem, StoredUpload

__all__ = ["BatchLock", "SqliteStateStore", "StateStore", "StoredItem", "StoredUpload"]
