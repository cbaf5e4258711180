"""One exception hierarchy for everything lpengine raises.

The type answers the question a caller has to decide on: *does retrying help?* (`retryable`). Messages never
contain the API key or storage secrets: they are built from the service's own `code`/`message` and from paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

__all__ = [
    "AmbiguousSubmitError",
    "ApiError",
    "AuthError",
    "BatchFailedError",
    "BatchLockedError",
    "ConfigError",
    "InputRejectedError",
    "LPEngineError",
    "LeaseLostError",
    "NetworkError",
    "QuotaError",
    "RateLimitedError",
    "ResultMissingError",
    "ServerError",
    "StateStoreError",
    "StorageError",
]


class LPEngineError(Exception):
    """Base of every error lpengine raises on purpose."""

    retryable: ClassVar[bool] = False


class ConfigError(LPEngineError):
    """The batch configuration or the environment is unusable; nothing was sent.

    `problems` holds one human line per problem (file, dotted field, what is wrong, what is allowed).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class InputRejectedError(LPEngineError):
    """A local file failed a check that the service would also fail: refused before any paid call."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class _RetryableByCase(LPEngineError):
    """An error type whose cases differ in whether retrying helps, so each instance says."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self._retryable = retryable

    @property
    def is_retryable(self) -> bool:
        return self._retryable


class StorageError(_RetryableByCase):
    """Publishing a file where the API can fetch it failed."""


class StateStoreError(_RetryableByCase):
    """The state database cannot be used (unreachable, refused login, missing or older schema); nothing was sent.

    Messages name the host and database, never the password. Retrying helps only when the server was unreachable.
    """


class LeaseLostError(LPEngineError):
    """Another worker took this item over (this one was presumed dead): its write was refused, and this worker
    leaves the item to its successor. Nothing is paid twice: the write-ahead save before a paid call is refused too.
    """

    retryable = True


class BatchLockedError(LPEngineError):
    """Another run of the same batch holds the lock (cron overlap)."""


class BatchFailedError(LPEngineError):
    """Raised by `RunReport.raise_for_failures()` for callers that prefer an exception to a report."""

    def __init__(self, failed: Sequence[object]) -> None:
        self.failed = list(failed)
        super().__init__(f"{len(self.failed)} item(s) did not succeed")


class NetworkError(LPEngineError):
    """The request did not complete (connection refused/reset, timeout) and no answer was read."""

    retryable = True


class ApiError(LPEngineError):
    """The service answered with a flat error body (§6). Subclasses classify it."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int,
        request_id: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id
        self._retryable = type(self).retryable if retryable is None else retryable
        super().__init__(f"{code}: {message} (HTTP {status}, request_id={request_id})")

    @property
    def is_retryable(self) -> bool:
        return self._retryable


class AuthError(ApiError):
    """401 InvalidApiKey / 403 access errors: no retry will fix a wrong or unauthorised key."""


class QuotaError(ApiError):
    """Billing or free-tier exhaustion (Arrearage, FreeTierOnly, …): stop the batch, do not retry."""


class RateLimitedError(ApiError):
    """429 throttling (§6): retry after backing off, and slow down the endpoint family."""

    retryable = True


class ServerError(ApiError):
    """5xx from the service: transient by the docs' own advice ("try again later")."""

    retryable = True


class ResultMissingError(LPEngineError):
    """A task SUCCEEDED but its answer holds no video URL in any shape the client knows.

    Not retryable: the task was paid, and a new one would be paid again for an answer that may read the same.
    """

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(
            f"task {task_id} succeeded without a video URL (neither output.results.video_url nor output.video_url);"
            " not submitted again: look the task up in the Model Studio console"
        )


class AmbiguousSubmitError(LPEngineError):
    """A submit may have reached the service but no task id came back.

    Never resend blindly: a second submit is paid twice. Reconcile through the task list first (§5).
    """

    def __init__(self, message: str, *, sent_at: float) -> None:
        super().__init__(message)
        self.sent_at = sent_at


def is_retryable(exc: BaseException) -> bool:
    """One place that answers "does retrying help" for any exception lpengine may see."""
    if isinstance(exc, ApiError | StorageError):
        return exc.is_retryable
    return isinstance(exc, LPEngineError) and exc.retryable
