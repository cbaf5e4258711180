"""Client-side pacing: one GCRA meter per endpoint family, slowed down by 429s and recovering on success.

The service enforces per-second quotas and also punishes sudden ramps (`Throttling.BurstRate`, §7), so requests are
spaced evenly from the first one (GCRA with no burst allowance) instead of being released in bursts.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio


@dataclass(frozen=True, slots=True)
class MeterStats:
    name: str
    requests: int
    throttled: int
    current_qps: float


class RateMeter:
    """GCRA ("virtual scheduling"): each acquire reserves the next slot `interval` after the previous one.

    The reservation is made before sleeping, so concurrent callers queue up without a lock, and a caller cancelled
    while waiting only wastes its own slot.
    """

    _MAX_SLOWDOWN = 8.0

    def __init__(self, name: str, qps: float) -> None:
        self.name = name
        self._base_interval = 1.0 / qps
        self._interval = self._base_interval
        self._tat = 0.0  # theoretical arrival time of the next allowed request
        self._requests = 0
        self._throttled = 0

    async def acquire(self) -> None:
        now = anyio.current_time()
        start = max(self._tat, now)
        self._tat = start + self._interval
        self._requests += 1
        if start > now:
            await anyio.sleep(start - now)

    def on_throttled(self) -> None:
        """A 429 means someone else shares the quota or our pacing is too tight: halve the rate."""
        self._throttled += 1
        self._interval = min(self._interval * 2, self._base_interval * self._MAX_SLOWDOWN)

    def on_success(self) -> None:
        if self._interval > self._base_interval:
            self._interval = max(self._base_interval, self._interval * 0.95)

    def stats(self) -> MeterStats:
        return MeterStats(self.name, self._requests, self._throttled, 1.0 / self._interval)


class EndpointBudget:
    """The client's pacing for every endpoint family, plus one bound on requests in flight."""

    def __init__(self, qps: dict[str, float], max_concurrent: int) -> None:
        self.meters = {name: RateMeter(name, rate) for name, rate in qps.items()}
        self.in_flight = anyio.CapacityLimiter(max_concurrent)

    def meter(self, family: str) -> RateMeter:
        return self.meters[family]

    def stats(self) -> list[MeterStats]:
        return [m.stats() for m in self.meters.values()]
