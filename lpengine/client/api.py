"""DashScope LivePortrait client: one aiohttp session, one method per endpoint, typed results and errors.

Pacing, bounded retries and the no-blind-resubmit rule live here so that no stage can forget them.
"""

from __future__ import annotations

import email.utils
import json
import mimetypes
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Self, TypeVar

import aiohttp
import anyio
import orjson
import structlog
from pydantic import SecretStr
from yarl import URL

from lpengine.client.limits import EndpointBudget, SharedPacer
from lpengine.client.retry import call_with_retries
from lpengine.client.wire import (
    DetectResult,
    SubmitResult,
    TaskInfo,
    TaskListPage,
    TaskStatus,
    UploadPolicy,
)
from lpengine.config import ApiConfig, VideoParams
from lpengine.errors import (
    AmbiguousSubmitError,
    ApiError,
    AuthError,
    NetworkError,
    QuotaError,
    RateLimitedError,
    ServerError,
    is_retryable,
)

log = structlog.get_logger("lpengine.client")

Family = Literal["detect", "submit", "query", "upload"]
T = TypeVar("T")

DETECT_PATH = "/services/aigc/image2video/face-detect"
SYNTHESIS_PATH = "/services/aigc/image2video/video-synthesis"
RESOLVE_HEADER = "X-DashScope-OssResourceResolve"

# §6: codes that mean "stop the batch, money or permissions are the problem".
_QUOTA_CODES = {
    "Arrearage",
    "AllocationQuota.FreeTierOnly",
    "PrepaidBillOverdue",
    "PostpaidBillOverdue",
    "CommodityNotPurchased",
}
_AUTH_CODES = {"InvalidApiKey", "AccessDenied.Unpurchased", "Model.AccessDenied", "Workspace.AccessDenied"}


def classify_error(status: int, body: dict[str, Any] | None, text: str = "") -> ApiError:
    """Flat error body (§1) → the exception type that says whether retrying helps (§6)."""
    body = body or {}
    code = str(body.get("code") or f"HTTP{status}")
    message = str(body.get("message") or text[:200] or "no message")
    request_id = body.get("request_id")
    kwargs: dict[str, Any] = {"status": status, "request_id": request_id}
    if code in _QUOTA_CODES or (code == "Throttling.AllocationQuota" and "Free allocated" in message):
        return QuotaError(code, message, **kwargs)
    if status == 401 or code in _AUTH_CODES:
        return AuthError(code, message, **kwargs)
    if status == 429:
        return RateLimitedError(code, message, **kwargs)
    if status >= 500:
        return ServerError(code, message, **kwargs)
    if code == "InvalidParameter.DataInspection" and "download" in message.lower():
        # Often a slow cross-border fetch (§6): worth a limited retry.
        return ApiError(code, message, retryable=True, **kwargs)
    return ApiError(code, message, **kwargs)


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """A `Retry-After` header (RFC 9110 §10.2.3) as seconds to wait: delta-seconds, or an HTTP date (against
    `now`, epoch seconds, default the wall clock). None when absent or unreadable: then only the backoff applies."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _needs_resolve(*urls: str) -> bool:
    return any(u.startswith("oss://") for u in urls)


class DashScopeClient:
    """Async client for the LivePortrait endpoints. Use as `async with DashScopeClient(...) as client:`."""

    def __init__(
        self,
        config: ApiConfig,
        api_key: SecretStr,
        *,
        base_url: str | None = None,
        speedup: float = 1.0,
        pacer: SharedPacer | None = None,
    ) -> None:
        self._config = config
        self._key = api_key
        self._speedup = speedup
        self.base_url = (base_url or config.base_url).rstrip("/")
        rl = config.rate_limits
        self.budget = EndpointBudget(
            {
                "detect": rl.detect_qps * speedup,
                "submit": rl.submit_qps * speedup,
                "query": rl.query_qps * speedup,
                "upload": rl.upload_policy_qps * speedup,
            },
            rl.max_concurrent_requests,
            pacer,
        )
        self._session: aiohttp.ClientSession | None = None
        self._header_sets: dict[tuple[bool, bool, bool], Mapping[str, str]] = {}
        self._urls = {path: URL(self.base_url + path) for path in (DETECT_PATH, SYNTHESIS_PATH)}
        self.retries = 0
        self.on_retry: Callable[[Exception, int], None] | None = None
        """Told of every retry (the error that caused it, the attempt about to start), to log it per item."""

    def __repr__(self) -> str:
        return f"DashScopeClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> Self:
        timeout = aiohttp.ClientTimeout(
            total=self._config.request_timeout_s, sock_connect=self._config.connect_timeout_s
        )
        connector = aiohttp.TCPConnector(limit=0, ssl=self._config.verify_tls)
        # trust_env: honour HTTPS_PROXY/NO_PROXY like botocore does for storage. Only when a proxy is configured:
        # with trust_env aiohttp re-reads the proxy variables and ~/.netrc on every request (~8 % of the engine's
        # CPU per item at scale), and netrc credentials have no business on API or result-URL requests anyway.
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, raise_for_status=False, trust_env=bool(urllib.request.getproxies())
        )
        if not self._config.verify_tls:
            log.warning("tls.verification_disabled", base_url=self.base_url, hint="set api.verify_tls: true")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session, also used for downloads (which must never carry the API key)."""
        if self._session is None:
            raise RuntimeError("DashScopeClient used outside `async with`")
        return self._session

    # -- plumbing -------------------------------------------------------------------------------------------

    def _headers(self, *, async_call: bool, resolve: bool, json: bool) -> Mapping[str, str]:
        """One of the few header sets every request uses, built once (aiohttp copies it into each request)."""
        flags = (async_call, resolve, json)
        headers = self._header_sets.get(flags)
        if headers is None:
            built = {"Authorization": f"Bearer {self._key.get_secret_value()}"}
            if async_call:
                built["X-DashScope-Async"] = "enable"
            if resolve:
                built[RESOLVE_HEADER] = "enable"
            if json:
                built["Content-Type"] = "application/json"
            if self._config.workspace:
                built["X-DashScope-WorkSpace"] = self._config.workspace
            headers = self._header_sets[flags] = MappingProxyType(built)
        return headers

    async def _once(
        self,
        family: Family,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        async_call: bool = False,
        resolve: bool = False,
    ) -> dict[str, Any]:
        meter = self.budget.meter(family)
        await meter.acquire()
        # orjson: aiohttp's `json=` goes through the stdlib encoder
        data = None if json_body is None else orjson.dumps(json_body)
        headers = self._headers(async_call=async_call, resolve=resolve, json=data is not None)
        url = self._urls.get(path) or self.base_url + path  # the fixed endpoints skip URL parsing
        async with self.budget.in_flight:
            # The pacing lock and this semaphore are asyncio's, which take a free slot without a checkpoint: look
            # for a stop here, so that a stopped run sends no new request (detect and submit are billed), rather
            # than rely on aiohttp yielding somewhere before it writes.
            await anyio.lowlevel.checkpoint_if_cancelled()
            async with self.session.request(method, url, data=data, params=params, headers=headers) as resp:
                raw = await resp.read()
            try:
                body = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                body = None
            if resp.status != 200 or not isinstance(body, dict):
                text = raw.decode("utf-8", "replace")
                err = classify_error(resp.status, body if isinstance(body, dict) else None, text)
                if isinstance(err, RateLimitedError):
                    meter.on_throttled()
                if isinstance(err, RateLimitedError | ServerError):
                    wait = retry_after_s(resp.headers.get("Retry-After"))
                    if wait:
                        # service seconds (the emulator's run `speedup` times faster); never beyond the retry budget
                        meter.hold(min(wait / self._speedup, self._config.retry.total_timeout_s))
                raise err
            meter.on_success()
            return body

    async def _retried(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt` under the configured retry policy, counting the retries made (for the run report)."""
        retry = self._config.retry
        return await call_with_retries(
            attempt, retry_on=is_retryable, policy=retry, timeout_s=retry.total_timeout_s, on_retry=self._count
        )

    def _count(self, error: Exception, attempt: int) -> None:
        self.retries += 1
        if self.on_retry is not None:
            self.on_retry(error, attempt)

    async def _call(
        self,
        family: Family,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        resolve: bool = False,
    ) -> dict[str, Any]:
        """An idempotent call: retried on retryable errors and on any network fault."""

        async def attempt() -> dict[str, Any]:
            try:
                return await self._once(family, method, path, json_body=json_body, params=params, resolve=resolve)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise NetworkError(f"{method} {path}: {exc.__class__.__name__}") from None

        return await self._retried(attempt)

    # -- endpoints ------------------------------------------------------------------------------------------

    async def detect(self, image_url: str) -> DetectResult:
        """§2. `pass: false` is a result (HTTP 200), not an exception. Billed per call."""
        body = await self._call(
            "detect",
            "POST",
            DETECT_PATH,
            json_body={"model": "liveportrait-detect", "input": {"image_url": image_url}},
            resolve=_needs_resolve(image_url),
        )
        out = body.get("output") or {}
        return DetectResult(bool(out.get("pass")), str(out.get("message") or ""), body.get("request_id"))

    async def submit(self, image_url: str, audio_url: str, params: VideoParams) -> SubmitResult:
        """§3. Retried only when the request provably did not create a task.

        A 4xx/5xx/429 answer means the service refused it (safe to retry when retryable). A connect failure means
        it never left. Anything else — a timeout or a reset after the body was sent — raises
        `AmbiguousSubmitError`: the caller must reconcile through `list_tasks` before submitting again.
        """
        payload = {
            "model": "liveportrait",
            "input": {"image_url": image_url, "audio_url": audio_url},
            "parameters": params.model_dump(),
        }
        resolve = _needs_resolve(image_url, audio_url)

        async def attempt() -> SubmitResult:
            sent_at = anyio.current_time()
            try:
                body = await self._once(
                    "submit", "POST", SYNTHESIS_PATH, json_body=payload, async_call=True, resolve=resolve
                )
            except aiohttp.ClientConnectorError as exc:
                raise NetworkError(f"submit: cannot connect ({exc.__class__.__name__})") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise AmbiguousSubmitError(
                    f"submit outcome unknown ({exc.__class__.__name__}); reconcile before resubmitting",
                    sent_at=sent_at,
                ) from None
            out = body.get("output") or {}
            task_id = out.get("task_id")
            if not task_id:
                raise AmbiguousSubmitError("submit answered 200 without a task_id", sent_at=sent_at)
            return SubmitResult(str(task_id), TaskStatus.parse(out.get("task_status")), body.get("request_id"))

        return await self._retried(attempt)

    async def get_task(self, task_id: str) -> TaskInfo:
        """§4. FAILED/UNKNOWN come back as results."""
        body = await self._call("query", "GET", f"/tasks/{task_id}")
        return TaskInfo.from_body(task_id, body)

    async def cancel_task(self, task_id: str) -> bool:
        """§5. True if cancelled; False if the task was no longer PENDING (UnsupportedOperation)."""
        try:
            await self._call("query", "POST", f"/tasks/{task_id}/cancel")
        except ApiError as exc:
            if exc.code == "UnsupportedOperation":
                return False
            raise
        return True

    async def list_tasks(
        self,
        *,
        start_time: str | None = None,
        end_time: str | None = None,
        model_name: str | None = "liveportrait",
        status: TaskStatus | None = None,
        page_no: int = 1,
        page_size: int = 100,
    ) -> TaskListPage:
        """§5. Times as `YYYYMMDDhhmmss`, window ≤ 24 h."""
        optional = {"start_time": start_time, "end_time": end_time, "model_name": model_name}
        params = {"page_no": str(page_no), "page_size": str(page_size)} | {k: v for k, v in optional.items() if v}
        if status:
            params["status"] = status.value
        body = await self._call("query", "GET", "/tasks", params=params)
        return TaskListPage.from_body(body)

    async def get_upload_policy(self, model: str) -> UploadPolicy:
        """§8 step 1: a short-lived credential to upload one file bound to `model`."""
        body = await self._call("upload", "GET", "/uploads", params={"action": "getPolicy", "model": model})
        return UploadPolicy.from_body(model, body, anyio.current_time())

    async def upload_temp(self, policy: UploadPolicy, path: Path, filename: str, *, data: bytes | None = None) -> str:
        """§8 step 2: form upload to the policy's host; returns the `oss://` URL (step 3).

        `data`: the file's bytes when the caller already holds them (read from `path` otherwise).
        """
        key = f"{policy.upload_dir}/{filename}"
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if data is None:
            data = await anyio.Path(path).read_bytes()

        async def attempt() -> str:
            form = aiohttp.FormData()
            form.add_field("OSSAccessKeyId", policy.oss_access_key_id)
            form.add_field("Signature", policy.signature)
            form.add_field("policy", policy.policy)
            form.add_field("key", key)
            form.add_field("x-oss-object-acl", policy.x_oss_object_acl)
            form.add_field("x-oss-forbid-overwrite", policy.x_oss_forbid_overwrite)
            form.add_field("x-oss-content-type", content_type)
            form.add_field("success_action_status", "200")
            form.add_field("file", data, filename=filename, content_type=content_type)  # must be last
            try:
                async with (
                    self.budget.in_flight,
                    self.session.post(policy.upload_host, data=form) as resp,
                ):
                    text = await resp.text()
                    if resp.status != 200:
                        raise classify_error(resp.status, _xml_or_json_error(text), text)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise NetworkError(f"temporary upload: {exc.__class__.__name__}") from None
            return f"oss://{key}"

        return await self._retried(attempt)


def _xml_or_json_error(text: str) -> dict[str, Any] | None:
    """OSS answers PostObject errors in XML; the emulator may answer JSON. Pull out Code/Message either way."""
    try:
        body = json.loads(text)
        return body if isinstance(body, dict) else None
    except json.JSONDecodeError:
        pass
    code = re.search(r"<Code>(.*?)</Code>", text)
    message = re.search(r"<Message>(.*?)</Message>", text)
    if not code:
        return None
    return {"code": code.group(1), "message": message.group(1) if message else ""}
