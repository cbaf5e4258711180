"""Locks by key that exist only while a task holds or awaits them.

The engine serialises work per content (one publish, one detect per image) and the S3 backend per object key.
Keeping a lock per key to the end of a run would grow memory with the batch: at 100k items, two locks per image
were ~1.8 KB of every item (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Entry:
    # asyncio's lock, not anyio's: see `lpengine.client.limits.RateMeter`
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    """Tasks holding or awaiting `lock`."""


class KeyedLocks(Generic[K]):
    def __init__(self) -> None:
        self._entries: dict[K, _Entry] = {}

    def __len__(self) -> int:
        """Keys with a holder or a waiter."""
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        """Hold the lock for `key`, waiting behind earlier holders of the same key only.

        A stop is looked for first, as anyio's locks do: asyncio's take a free lock without a checkpoint, and the
        stages take these locks just before they commit the write-ahead mark of a billed call.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._entries[key]
