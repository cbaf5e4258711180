"""S3-compatible object storage, Aliyun OSS first: private objects DashScope fetches through presigned URLs.

Everything OSS needs from an S3 client (API notes §10) is settled here once, so no caller can get it wrong:
virtual-hosted addressing (OSS answers path style with `SecondLevelDomainForbidden`), checksums only
`when_required` (botocore ≥ 1.36 otherwise sends `aws-chunked` bodies that OSS rejects), and SigV2 as Alibaba's
own fallback. Keys are content-addressed, so a rerun or a shared audio track is uploaded once, found by one HEAD.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aioboto3
import aiohttp
import anyio
import structlog
import yarl
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from lpengine.config import S3StorageConfig, Secrets
from lpengine.errors import StorageError
from lpengine.locks import KeyedLocks
from lpengine.storage.base import LocalFile, Published

__all__ = ["MAX_URL_LIFETIME", "S3Storage"]

log = structlog.get_logger("lpengine.storage")

MAX_URL_LIFETIME = timedelta(days=7)
"""OSS (like AWS) refuses V4 presigned URLs valid for longer; SigV2 URLs are capped the same for one rule."""

PROBE_URL_LIFETIME = timedelta(minutes=5)
CLEANUP_CONCURRENCY = 16
_MISSING_CREDENTIALS = (
    "storage credentials missing: set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET in the environment or .env"
)
_CREDENTIALS_REJECTED = "storage credentials rejected: check OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET"
_PATH_STYLE_REFUSED = "this store refuses path-style addressing: set storage.addressing_style: virtual"

# Error codes that mean "this key pair is not accepted", whatever the operation.
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidSecurity",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
    }
)
# Codes that mean "the bucket lives elsewhere than endpoint_url/region say".
_LOCATION_CODES = frozenset(
    {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"}
)
# Codes (besides any 5xx) where the same request can succeed a little later.
_TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException"}
)
_XML_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")


class S3Storage:
    """Publishes local files as private S3/OSS objects behind presigned GET URLs.

    One aiobotocore client lives from `__aenter__` to `__aexit__`. Entering checks endpoint, credentials, bucket
    and addressing style, so a wrong setting stops the batch before any paid API call, naming the setting to fix.
    """

    name = "s3"
    # Read by the upload stage. One URL serves both models. Durable: objects outlive the process, so the state
    # store keeps the URL (a resumed run reuses it while valid) and the created key (for clean-up).
    model_bound = False
    durable = True

    def __init__(
        self,
        config: S3StorageConfig,
        secrets: Secrets,
        *,
        verify_tls: bool = True,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        self._config = config
        self._secrets = secrets
        self._verify_tls = verify_tls
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        # Keys known to exist with the right size: one audio behind 500 portraits costs one HEAD, not 500.
        self._present: set[str] = set()
        # One lock per key so concurrent publishes of one file do one HEAD and at most one PUT.
        self._key_locks: KeyedLocks[str] = KeyedLocks()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("S3Storage is already open")
        key_id, secret = self._credentials()
        stack = AsyncExitStack()
        try:
            try:
                session = aioboto3.Session(
                    aws_access_key_id=key_id,
                    aws_secret_access_key=secret,
                    region_name=self._config.region,
                )
                client_context = session.client(
                    "s3",
                    endpoint_url=self._config.endpoint_url,
                    config=self._botocore_config(),
                    verify=self._verify_tls,
                )
                self._client = await stack.enter_async_context(client_context)
            except ValueError as exc:  # botocore's "Invalid endpoint"
                raise StorageError(
                    f"storage.endpoint_url {self._config.endpoint_url!r} is not a valid URL: "
                    "use e.g. https://s3.oss-cn-beijing.aliyuncs.com"
                ) from exc
            except BotoCoreError as exc:
                raise self._storage_error(exc, "create client", preflight=True) from exc
            await self._preflight()
        except BaseException:
            self._client = None
            await stack.aclose()
            raise
        self._stack = stack
        log.info(
            "storage.s3.ready",
            bucket=self._config.bucket,
            endpoint=self._endpoint,
            addressing_style=self._config.addressing_style,
            signature_version=self._config.signature_version,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def _credentials(self) -> tuple[str, str]:
        """Explicit keys only: botocore's chain (~/.aws, instance metadata) must never pick another identity."""
        key_id, secret = self._secrets.oss_access_key_id, self._secrets.oss_access_key_secret
        if key_id is None or secret is None or not key_id.get_secret_value() or not secret.get_secret_value():
            raise StorageError(_MISSING_CREDENTIALS)
        return key_id.get_secret_value(), secret.get_secret_value()

    def _botocore_config(self) -> Config:
        return Config(
            s3={"addressing_style": self._config.addressing_style},
            signature_version=self._config.signature_version,
            # §10: OSS rejects the aws-chunked bodies botocore ≥ 1.36 sends by default; these beat the env vars.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=self._connect_timeout_s,
            read_timeout=self._read_timeout_s,
            max_pool_connections=max(10, CLEANUP_CONCURRENCY),
        )

    async def _preflight(self) -> None:
        """HeadBucket, and when it fails, learn why from a GET whose error body names the code.

        HEAD answers have no body, so a refused HeadBucket only says "403": bad keys, path style refused by OSS
        and a policy that merely does not grant HeadBucket all look alike. A GET of a key that does not exist
        returns the real code, and needs only the GetObject permission the presigned URLs depend on anyway.
        """
        bucket = self._config.bucket
        try:
            await self._client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) == "NoSuchBucket":
                raise self._missing_bucket() from exc
            head_error = exc
        except BotoCoreError as exc:
            raise self._storage_error(exc, "HeadBucket", preflight=True) from exc
        else:
            return
        try:
            response = await self._client.get_object(Bucket=bucket, Key=f"{self._config.prefix}.preflight-absent")
        except ClientError as exc:
            if _code(exc) in {"NoSuchKey", "404"}:
                return  # objects are reachable; the key is just not granted HeadBucket
            if _code(exc) in {"", "403"}:
                raise StorageError(_CREDENTIALS_REJECTED) from head_error
            raise self._storage_error(exc, "preflight", preflight=True) from exc
        except BotoCoreError as exc:
            raise self._storage_error(exc, "preflight", preflight=True) from exc
        response["Body"].close()

    # -- Storage protocol ------------------------------------------------------------------------------------

    def object_key(self, file: LocalFile) -> str:
        """Content-addressed, sharded by the first hash byte so no listing wades through one flat prefix."""
        return f"{self._config.prefix}{file.sha256[:2]}/{file.sha256}{file.suffix}"

    def url_lifetime(self, valid_for: timedelta) -> timedelta:
        """What the batch needs plus the configured margin, never more: a leaked URL is a credential."""
        wanted = valid_for + timedelta(seconds=self._config.url_margin_s)
        return max(timedelta(seconds=1), min(wanted, MAX_URL_LIFETIME))

    async def publish(self, file: LocalFile, *, model: str, valid_for: timedelta) -> Published:
        """Upload unless the same bytes are already there, then hand out a presigned GET URL.

        `model` is ignored: a presigned URL works for any model, unlike DashScope's temporary storage.
        """
        del model
        self._require_open()
        key = self.object_key(file)
        created = False
        async with self._key_locks.hold(key):
            if key not in self._present:
                if not await self._exists(key, file.size):
                    await self._put(key, file)
                    created = True
                self._present.add(key)
        if valid_for + timedelta(seconds=self._config.url_margin_s) > MAX_URL_LIFETIME:
            log.warning("storage.s3.url_lifetime_capped", key=key, wanted_s=valid_for.total_seconds())
        url = await self._presign(key, self.url_lifetime(valid_for))
        return Published(
            url=url, created_key=key if created else None, lifetime_s=self.url_lifetime(valid_for).total_seconds()
        )

    def release(self, published: Published) -> None:
        return None  # objects live until `cleanup` at the end of the run (or on, for re-runs to reuse)

    async def cleanup(self, keys: list[str]) -> int:
        """Delete exactly `keys`, one DeleteObject each with bounded concurrency.

        Per-key deletes rather than DeleteObjects: botocore always attaches a checksum to DeleteObjects (a
        "checksum required" operation), and whether OSS accepts that through the S3 API is unverified (§10).
        A thousand small deletes at 16 in flight take seconds, nothing at the end of a batch. Keys outside
        `storage.prefix` are refused before anything is deleted, so a corrupt state store cannot reach the rest
        of the bucket.
        """
        self._require_open()
        unique = list(dict.fromkeys(keys))
        prefix = self._config.prefix
        outside = [key for key in unique if not key.startswith(prefix)]
        if outside:
            raise StorageError(
                f"refusing to delete {len(outside)} key(s) outside storage.prefix {prefix!r} "
                f"(first: {outside[0]!r}); nothing was deleted"
            )
        deleted = 0
        failures: list[StorageError] = []
        limiter = anyio.CapacityLimiter(CLEANUP_CONCURRENCY)

        async def delete(key: str) -> None:
            nonlocal deleted
            async with limiter:
                try:
                    with self._translating("DeleteObject", key):
                        await self._client.delete_object(Bucket=self._config.bucket, Key=key)
                except StorageError as exc:
                    failures.append(exc)
                    return
            self._present.discard(key)
            deleted += 1

        async with anyio.create_task_group() as tg:
            for key in unique:
                tg.start_soon(delete, key)
        log.info("storage.s3.cleanup", requested=len(unique), deleted=deleted, failed=len(failures))
        if failures:
            raise StorageError(
                f"deleted {deleted} of {len(unique)} objects; {len(failures)} failed, first: {failures[0]}",
                retryable=all(f.is_retryable for f in failures),
            )
        return deleted

    async def probe(self) -> str:
        """Prove the whole path the API depends on: write, fetch through a presigned URL over HTTP, delete."""
        self._require_open()
        key = f"{self._config.prefix}probe/{uuid.uuid4().hex}.txt"
        payload = b"lpengine storage probe " + os.urandom(16).hex().encode() + b"\n"
        with self._translating("PutObject (probe)", key):
            await self._client.put_object(Bucket=self._config.bucket, Key=key, Body=payload, ContentType="text/plain")
        try:
            url = await self._presign(key, PROBE_URL_LIFETIME)
            await self._fetch_and_compare(url, payload)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._delete_quietly(key)
            raise
        with self._translating("DeleteObject (probe)", key):
            await self._client.delete_object(Bucket=self._config.bucket, Key=key)
        note = _reachability_note(url)
        return (
            f"s3: bucket {self._config.bucket} at {self._endpoint}: wrote, fetched through a "
            f"{self._config.signature_version} presigned URL and deleted {key} ({len(payload)} bytes){note}"
        )

    # -- internals -------------------------------------------------------------------------------------------

    @property
    def _endpoint(self) -> str:
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return self._config.endpoint_url or "the default AWS S3 endpoint"

    def _require_open(self) -> None:
        if self._client is None:
            raise RuntimeError("S3Storage is not open: use `async with S3Storage(...)`")

    async def _exists(self, key: str, size: int) -> bool:
        try:
            head = await self._client.head_object(Bucket=self._config.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise self._storage_error(exc, "HeadObject", key) from exc
        except BotoCoreError as exc:
            raise self._storage_error(exc, "HeadObject", key) from exc
        if head.get("ContentLength") != size:
            # Same hash, different length: an earlier upload was cut short. Replace it rather than serve it.
            log.warning("storage.s3.reupload", key=key, stored=head.get("ContentLength"), expected=size)
            return False
        return True

    async def _put(self, key: str, file: LocalFile) -> None:
        body, content_md5 = await anyio.to_thread.run_sync(_read_verified, file)
        with self._translating("PutObject", key):
            # Content-MD5 lets the store refuse a body damaged in transit; a plain header, not aws-chunked.
            await self._client.put_object(
                Bucket=self._config.bucket,
                Key=key,
                Body=body,
                ContentType=file.content_type,
                ContentMD5=content_md5,
            )
        log.debug("storage.s3.uploaded", key=key, bytes=len(body))

    async def _presign(self, key: str, lifetime: timedelta) -> str:
        with self._translating("presign GetObject", key):
            url: str = await self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self._config.bucket, "Key": key},
                ExpiresIn=int(lifetime.total_seconds()),
            )
        return url

    async def _fetch_and_compare(self, url: str, expected: bytes) -> None:
        timeout = aiohttp.ClientTimeout(total=self._connect_timeout_s + self._read_timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                # encoded=True: re-quoting the signed query (%2F in the credential) would break the signature.
                session.get(yarl.URL(url, encoded=True), ssl=self._verify_tls) as response,
            ):
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The URL carries a signature: report the class, never the URL (aiohttp puts it in its messages).
            raise StorageError(
                f"fetching the probe object through its presigned URL failed ({type(exc).__name__}): "
                f"the URL host must be reachable from here and from DashScope (docs/storage.md)",
                retryable=True,
            ) from None
        if status != 200:
            match = _XML_CODE.search(body)
            code = match.group(1).decode(errors="replace") if match else "no error code"
            raise StorageError(
                f"the presigned URL for the probe object answered HTTP {status} ({code}): check "
                "storage.region and storage.signature_version (OSS also takes `s3`, SigV2), and the "
                "custom-domain requirement for new OSS users (docs/storage.md)"
            )
        if body != expected:
            raise StorageError(
                f"the presigned URL returned {len(body)} bytes that differ from the {len(expected)} written: "
                "a proxy or CDN in front of storage.endpoint_url is rewriting objects"
            )

    async def _delete_quietly(self, key: str) -> None:
        try:
            await self._client.delete_object(Bucket=self._config.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            log.warning("storage.s3.probe_delete_failed", key=key, error=type(exc).__name__)

    @contextmanager
    def _translating(self, operation: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self._storage_error(exc, operation, key) from exc

    def _missing_bucket(self) -> StorageError:
        bucket = self._config.bucket
        return StorageError(f"bucket {bucket} does not exist at {self._endpoint}: create it or fix storage.bucket")

    def _storage_error(
        self, exc: Exception, operation: str, key: str | None = None, *, preflight: bool = False
    ) -> StorageError:
        """One message per cause, naming the setting to fix; `retryable` only where waiting can help."""
        where = f" [{operation} {key}]" if key else ""
        if isinstance(exc, ClientError):
            code, status, detail = _code(exc), _status(exc), self._redact(_message(exc))
            if code == "SecondLevelDomainForbidden":
                return StorageError(_PATH_STYLE_REFUSED)
            if code in _CREDENTIAL_CODES:
                return StorageError(f"{_CREDENTIALS_REJECTED} ({code}){where}")
            if code == "AccessDenied":
                return StorageError(
                    f"{_CREDENTIALS_REJECTED}, and that the key may Get/Put/DeleteObject in bucket "
                    f"{self._config.bucket} (AccessDenied: {detail}){where}"
                )
            if code == "NoSuchBucket":
                return self._missing_bucket()
            if code in _LOCATION_CODES or status == 301:
                return StorageError(
                    f"bucket {self._config.bucket} is not served by {self._endpoint} with region "
                    f"{self._config.region!r} ({code}): check storage.endpoint_url and storage.region"
                )
            if code == "RequestTimeTooSkewed":
                return StorageError("storage refused this machine's clock (RequestTimeTooSkewed): sync it (NTP)")
            if "chunked" in detail.lower():
                return StorageError(
                    f"the store refuses aws-chunked uploads ({code}): update botocore, or set "
                    f"storage.signature_version: s3{where}"
                )
            if status >= 500 or code in _TRANSIENT_CODES:
                return StorageError(
                    f"storage {operation} failed with {code} (HTTP {status}) at {self._endpoint}: "
                    f"transient, retry later{where}",
                    retryable=True,
                )
            if status == 403:
                return StorageError(f"{_CREDENTIALS_REJECTED} ({code}: {detail}){where}")
            return StorageError(f"storage {operation} failed: {code} (HTTP {status}): {detail}{where}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(_MISSING_CREDENTIALS)
        if isinstance(exc, SSLError):
            return StorageError(
                f"TLS with storage endpoint {self._endpoint} failed: check storage.endpoint_url "
                "(https with a valid certificate)"
            )
        if isinstance(exc, BotoConnectionError):
            # At start-up botocore has already retried: a refused or unresolvable endpoint is a setting.
            return StorageError(
                f"cannot reach storage endpoint {self._endpoint}: check storage.endpoint_url{where}",
                retryable=not preflight,
            )
        if isinstance(exc, HTTPClientError | ChecksumError):
            return StorageError(
                f"storage {operation} interrupted ({type(exc).__name__}) at {self._endpoint}: transient{where}",
                retryable=True,
            )
        return StorageError(f"storage {operation} failed: {type(exc).__name__}: {self._redact(str(exc))}{where}")

    def _redact(self, text: str) -> str:
        """Servers echo what they were sent (OSS puts the AccessKeyId in SignatureDoesNotMatch bodies)."""
        for secret in (self._secrets.oss_access_key_id, self._secrets.oss_access_key_secret):
            value = secret.get_secret_value() if secret is not None else ""
            if len(value) >= 4:
                text = text.replace(value, "***")
        return text


def _read_verified(file: LocalFile) -> tuple[bytes, str]:
    """The bytes to upload and their Content-MD5, refusing a file that changed since its hash named the key.

    A content-addressed key holding other content would be served to every later batch that dedupes onto it.
    """
    try:
        data = Path(file.path).read_bytes()
    except OSError as exc:
        raise StorageError(f"{file.path}: cannot read for upload: {exc.strerror or exc}") from None
    if len(data) != file.size or hashlib.sha256(data).hexdigest() != file.sha256:
        raise StorageError(f"{file.path}: changed since it was checked; rerun to re-check it")
    return data, base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _reachability_note(url: str) -> str:
    """The probe fetches from here; DashScope fetches from Alibaba Cloud and never reaches private hosts."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        private = True
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return ""
        private = address.is_private or address.is_loopback or address.is_link_local
    return f"; note: {host} is not reachable from DashScope" if private else ""
