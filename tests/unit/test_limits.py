"""Client-side pacing: requests leave evenly spaced whether they took the open slot at once or waited for theirs."""

from __future__ import annotations

import asyncio
import itertools

import anyio
import pytest

from lpengine.client.limits import RateMeter

pytestmark = pytest.mark.anyio

_EARLY = 1e-6  # asyncio may run a timer up to its clock resolution early


async def test_concurrent_callers_leave_one_interval_apart_in_arrival_order() -> None:
    meter = RateMeter("query", qps=500)  # 2 ms apart
    loop = asyncio.get_running_loop()
    departures: list[tuple[int, float]] = []

    async def request(n: int) -> None:
        await meter.acquire()
        departures.append((n, loop.time()))

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(request, n)

    assert [n for n, _ in departures] == list(range(8))  # the first took the open slot, the rest queued fairly
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(departures)]
    assert min(gaps) >= 0.002 - _EARLY
    assert meter.stats().requests == 8


async def test_an_open_slot_is_taken_without_yielding_to_other_tasks() -> None:
    meter = RateMeter("detect", qps=1)
    others_ran: list[bool] = []

    async def other() -> None:
        others_ran.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)  # runs at the first checkpoint of this task
        await meter.acquire()
        assert not others_ran  # no checkpoint: the slot was open and nobody held the lock
    assert others_ran


async def test_a_caller_after_a_throttle_waits_the_slowed_interval() -> None:
    meter = RateMeter("submit", qps=1000)  # 1 ms apart, 2 ms after one 429
    loop = asyncio.get_running_loop()
    await meter.acquire()
    first = loop.time()
    meter.on_throttled()
    await meter.acquire()  # its slot was set by the old interval: 1 ms
    second = loop.time()
    await meter.acquire()  # the first one spaced by the slowed interval
    third = loop.time()
    assert second - first >= 0.001 - _EARLY
    assert third - second >= 0.002 - _EARLY
    assert meter.stats().throttled == 1
