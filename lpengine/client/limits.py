"""Client-side pacing: one GCRA meter per endpoint family, slowed down by 429s and recovering on success.

The service enforces per-second quotas and also punishes sudden ramps (`Throttling.BurstRate`, §7), so requests are
spaced evenly from the first one (GCRA with no burst allowance) instead of being released in bursts.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Protocol

import anyio


@dataclass(frozen=True, slots=True)
class MeterStats:
    name: str
    requests: int
    throttled: int
    current_qps: float


def account_of(api_key: str) -> str:
    """A name for the account behind a key that says nothing about the key (shared pacing rows are keyed by it)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class SharedPacer(Protocol):
    """The account's pacing shared by every process using the key (PostgreSQL: `lpengine/state/postgres.py`)."""

    async def reserve(self, family: str, interval: float) -> float:
        """Reserve the family's next slot, `interval` after the previous one taken by anyone; seconds to wait."""
        ...


class RateMeter:
    """GCRA ("virtual scheduling") with the schedule re-read after each wait.

    Callers queue on a fair lock and each one waits for its slot in turn. A wait that overran (the event loop was
    busy) pushes the next slot back from the real wake-up time, so late waiters are never released together: that
    burst is exactly what the service answers with `Throttling.BurstRate` or `RateQuota`.
    """

    _MAX_SLOWDOWN = 8.0

    def __init__(self, name: str, qps: float, pacer: SharedPacer | None = None) -> None:
        self.name = name
        self._pacer = pacer
        self._base_interval = 1.0 / qps
        self._interval = self._base_interval
        self._next = 0.0  # earliest time the next request may leave
        # asyncio's lock and semaphore, not anyio's: aiohttp ties the engine to asyncio anyway, and their uncontended
        # take is a few calls where anyio's first walks the task's cancel scopes (docs/benchmarks.md)
        self._lock = asyncio.Lock()
        self._requests = 0
        self._throttled = 0

    async def acquire(self) -> None:
        if self._pacer is not None:
            await self._acquire_shared(self._pacer)
            return
        now = asyncio.get_running_loop().time()  # the clock `anyio.sleep` waits on, without anyio's backend lookup
        if self._next <= now and not self._lock.locked():
            # The slot is open and nobody holds the lock: take it at once (no await between the check and the claim).
            self._next = now + self._interval
            self._requests += 1
            return
        async with self._lock:
            delay = self._next - asyncio.get_running_loop().time()
            if delay > 0:
                await anyio.sleep(delay)
            self._next = asyncio.get_running_loop().time() + self._interval
            self._requests += 1

    async def _acquire_shared(self, pacer: SharedPacer) -> None:
        """The slot comes from the account's schedule, which every worker's requests advance (one atomic
        statement each, on the database's clock); the wait until it is measured here, so clocks need not agree."""
        async with self._lock:
            delay = await pacer.reserve(self.name, self._interval)
            if delay > 0:
                await anyio.sleep(delay)
            self._requests += 1

    def on_throttled(self) -> None:
        """A 429 means someone else shares the quota or our pacing is too tight: halve the rate."""
        self._throttled += 1
        self._interval = min(self._interval * 2, self._base_interval * self._MAX_SLOWDOWN)

    def hold(self, seconds: float) -> None:
        """The service asked for a pause (`Retry-After`): no request of this family leaves before it is over."""
        self._next = max(self._next, asyncio.get_running_loop().time() + seconds)

    def on_success(self) -> None:
        if self._interval > self._base_interval:
            self._interval = max(self._base_interval, self._interval * 0.95)

    def stats(self) -> MeterStats:
        return MeterStats(self.name, self._requests, self._throttled, 1.0 / self._interval)


class EndpointBudget:
    """The client's pacing for every endpoint family, plus one bound on requests in flight."""

    def __init__(self, qps: dict[str, float], max_concurrent: int, pacer: SharedPacer | None = None) -> None:
        self.meters = {name: RateMeter(name, rate, pacer) for name, rate in qps.items()}
        self.in_flight = asyncio.Semaphore(max_concurrent)

    def meter(self, family: str) -> RateMeter:
        return self.meters[family]

    def stats(self) -> list[MeterStats]:
        return [m.stats() for m in self.meters.values()]
