"""Bounded retries (stamina: exponential backoff with jitter, capped by attempts and by total time), set up only
once a first attempt has failed.

stamina builds a tenacity state machine for every call (~45 µs). An item makes four calls and nearly all of them
succeed at once, so at 100k items that machinery was 4 % of the engine's CPU for nothing. The first attempt
therefore runs bare; after a retryable failure the first backoff is slept here and stamina runs the remaining
attempts, its schedule starting one step further on — the same waits as one stamina loop over all attempts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import stamina

from lpengine.config import RetryConfig

T = TypeVar("T")


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: Callable[[Exception], bool],
    policy: RetryConfig,
    timeout_s: float,
    on_retry: Callable[[Exception, int], None] | None = None,
) -> T:
    """Await `attempt()` until it returns, raises something `retry_on` refuses, or the attempts or time run out
    (then the last error propagates). `on_retry(error, attempt)` hears of each retry before it is made: the error
    that caused it and the number of the attempt about to start (2 for the first retry)."""
    started = time.monotonic()  # only differences matter; anyio's clock costs a backend lookup per call
    try:
        return await attempt()
    except Exception as exc:
        if not retry_on(exc) or policy.attempts <= 1:
            raise
        first_error = exc
    if not stamina.is_testing():  # test mode (tests/conftest.py) makes every wait zero, this one included
        await anyio.sleep(min(policy.max_wait_s, policy.initial_wait_s * (1 + random.random())))
    remaining = timeout_s - (time.monotonic() - started)
    if remaining <= 0:
        raise first_error
    last_error, attempt_no = first_error, 1
    async for retry in stamina.retry_context(
        on=retry_on,
        attempts=policy.attempts - 1,
        timeout=remaining,
        wait_initial=policy.initial_wait_s * 2,
        wait_max=policy.max_wait_s,
        wait_jitter=policy.initial_wait_s,
    ):
        attempt_no += 1
        if on_retry is not None:
            on_retry(last_error, attempt_no)
        with retry:
            try:
                return await attempt()
            except Exception as exc:
                last_error = exc
                raise
    raise AssertionError("unreachable: stamina re-raises after the last attempt")  # pragma: no cover
