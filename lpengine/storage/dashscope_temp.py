"""DashScope's free temporary storage (§8): `oss://` URLs, 48 h, no bucket needed.

Each file is bound to the model it was uploaded for, so an image is uploaded once for `liveportrait-detect` and
once for `liveportrait`. A policy is reused for several files until shortly before it expires.
"""

from __future__ import annotations

from datetime import timedelta

import anyio

from lpengine.client.api import DashScopeClient
from lpengine.client.wire import UploadPolicy
from lpengine.errors import ApiError, AuthError, LPEngineError, QuotaError, StorageError
from lpengine.storage.base import LocalFile, NothingToRelease, Published

FILE_LIFETIME_S = 48 * 3600  # §8
_POLICY_SAFETY_S = 30.0


class DashScopeTempStorage(NothingToRelease):
    """Files expire by themselves after 48 h and cannot be deleted (§8): nothing to clean up."""

    name = "dashscope_temp"
    durable = True
    model_bound = True  # §8: a file works only with the model it was uploaded for

    def __init__(self, client: DashScopeClient, *, speedup: float = 1.0) -> None:
        self._client = client
        self._speedup = speedup
        self._policies: dict[str, UploadPolicy] = {}
        self._lock = anyio.Lock()

    async def _policy(self, model: str) -> UploadPolicy:
        async with self._lock:
            policy = self._policies.get(model)
            now = anyio.current_time()
            if (
                policy is None
                or now > policy.fetched_at + (policy.expire_in_seconds - _POLICY_SAFETY_S) / self._speedup
            ):
                policy = await self._client.get_upload_policy(model)
                self._policies[model] = policy
            return policy

    async def publish(self, file: LocalFile, *, model: str, valid_for: timedelta) -> Published:
        if valid_for.total_seconds() * self._speedup > FILE_LIFETIME_S:
            raise StorageError(
                "temporary storage keeps files 48 h, less than this batch needs; use storage.backend: s3"
            )
        try:
            url = await self._upload(file, model)
        except ApiError as exc:
            if not _policy_expired(exc):
                raise _storage_error(exc) from None
            # The policy ran out while the upload was being retried (§8: 300 s): one more try with a fresh one.
            self._policies.pop(model, None)
            try:
                url = await self._upload(file, model)
            except ApiError as again:
                raise _storage_error(again) from None
        except LPEngineError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"temporary upload failed: {exc}", retryable=True) from None
        return Published(url=url, needs_resolve_header=True, lifetime_s=FILE_LIFETIME_S / self._speedup)

    async def _upload(self, file: LocalFile, model: str) -> str:
        policy = await self._policy(model)
        if file.size > policy.max_file_size_mb * 1024 * 1024:
            raise StorageError(f"{file.path}: larger than the temporary storage limit for {model}")
        return await self._client.upload_temp(policy, file.path, f"{file.sha256}{file.suffix}", data=file.data)

    async def probe(self) -> str:
        policy = await self._policy("liveportrait")
        return f"temporary storage policy obtained (upload host {policy.upload_host}, files live 48 h)"


def _policy_expired(exc: ApiError) -> bool:
    return exc.code == "AccessDenied" and "expired" in exc.message.lower()


def _storage_error(exc: ApiError) -> LPEngineError:
    """Account-level refusals stop the batch as themselves; anything else fails this upload."""
    if isinstance(exc, AuthError | QuotaError):
        return exc
    return StorageError(f"temporary upload failed: {exc.code}: {exc.message}", retryable=exc.is_retryable)
