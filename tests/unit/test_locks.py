"""Locks by key: one holder per key, other keys never wait, and nothing is kept once a key is free."""

from __future__ import annotations

import anyio
import pytest

from lpengine.locks import KeyedLocks

pytestmark = pytest.mark.anyio


async def test_one_holder_per_key_and_other_keys_do_not_wait() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    order: list[str] = []
    first_in, release_first = anyio.Event(), anyio.Event()

    async def first() -> None:
        async with locks.hold("a"):
            order.append("first in")
            first_in.set()
            await release_first.wait()
            order.append("first out")

    async def second() -> None:
        async with locks.hold("a"):
            order.append("second in")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await first_in.wait()
        tg.start_soon(second)
        with anyio.fail_after(5):
            async with locks.hold("b"):  # another key: taken while "a" is held and awaited
                order.append("other key")
        assert len(locks) == 1  # "a", held and awaited
        release_first.set()

    assert order == ["first in", "other key", "first out", "second in"]
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    held, release = anyio.Event(), anyio.Event()

    async def holder() -> None:
        async with locks.hold("a"):
            held.set()
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("a"):
            raise AssertionError("never reaches the lock: cancelled while waiting")

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await held.wait()
        async with anyio.create_task_group() as waiting:
            waiting.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            waiting.cancel_scope.cancel()
        release.set()

    assert len(locks) == 0


async def test_a_stopped_task_does_not_take_a_free_lock() -> None:
    """The stages commit a billed call's write-ahead mark right after taking a lock: a stop must end them first."""
    locks: KeyedLocks[str] = KeyedLocks()
    took: list[str] = []
    with anyio.CancelScope() as stop:
        stop.cancel()
        async with locks.hold("a"):
            took.append("a")
    assert stop.cancelled_caught and took == [] and len(locks) == 0
