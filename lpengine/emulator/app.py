"""The emulator's HTTP face: DashScope's API under `/api/v1`, an OSS-like upload host and result URLs, and
`/_emulator/*` controls.

Request handling order for every API call: count → injected latency → auth (401) → quota (429) → injected
drop/error → validation (400/403/404) → work. Upload and download calls skip auth and quota, like OSS.
"""

from __future__ import annotations

import math
import sys
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, TypeGuard
from xml.sax.saxutils import escape

import aiohttp
import anyio
import anyio.to_thread
import structlog
from aiohttp import web
from pydantic import ValidationError

from lpengine.emulator.media import (
    AUDIO_MAX_BYTES,
    IMAGE_MAX_BYTES,
    NO_FACE_MESSAGE,
    AudioInfo,
    FaceDetector,
    ImageInfo,
    MediaError,
    inspect_audio,
    inspect_image,
    make_thumbnail,
    resolve_detector,
    stub_video,
    video_encoder_available,
)
from lpengine.emulator.settings import ERROR_CATALOGUE, Defect, EmulatorSettings, Endpoint, FaultSettings
from lpengine.emulator.state import (
    UPLOAD_MAX_MB,
    ApiError,
    Clock,
    EmulatorState,
    EmulatorStats,
    Family,
    MediaKey,
    OssError,
    Result,
    SystemClock,
    Task,
    format_time,
    parse_list_time,
)
from lpengine.emulator.talking import Look, render

__all__ = ["RunningEmulator", "run_emulator", "serve_forever"]

API: Final = "/api/v1"
DETECT_MODEL: Final = "liveportrait-detect"
VIDEO_MODEL: Final = "liveportrait"
_FETCH_TIMEOUT_S = 30.0  # real seconds the emulator waits for an input URL
_VIDEO_CACHE_BYTES = 256 * 1024 * 1024  # encoded result MP4s kept in memory (LRU)
_LIST_WINDOW_S = 86_400.0  # §5
_LIST_MAX_PAGE_SIZE = 100
_OSS_RESOLVE_HEADER: Final = "X-DashScope-OssResourceResolve"
_REQUEST_ID = web.RequestKey("request_id", str)
_ENDPOINT = web.RequestKey[Endpoint]("endpoint")
_OSS_STYLE = web.RequestKey("oss_style", bool)
"""Errors of this request are answered in OSS's XML (upload host, result URLs) instead of DashScope's JSON."""
_USER_API_KEY: Final = "apikey:v1:aigc:image2video:video-synthesis:liveportrait"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Drop(Exception):
    """Close the connection without (the rest of) a response."""


def _bad_request(message: str = "The request parameter is invalid.") -> ApiError:
    return ApiError(400, "InvalidParameter", message)


def _missing(name: str) -> ApiError:
    return _bad_request(f"Required parameter({name}) missing or invalid, please check the request parameters.")


_INVALID_URL = ERROR_CATALOGUE["InvalidURL"][1]


def _download_failed() -> ApiError:
    return ApiError(400, "InvalidParameter.InputDownloadFailed", "Failed to download input files.")  # §6


def _out_of_definition(name: str) -> ApiError:
    return _bad_request(f"The type or value of {name} is out of definition.")  # §3


def _oss_xml(error: OssError | ApiError, request_id: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
        f"<Code>{escape(error.code)}</Code><Message>{escape(error.message)}</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>emulator</HostId></Error>"
    )
    return web.Response(status=error.status, text=body, content_type="application/xml")


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _look(parameters: object, defect: Defect | None) -> tuple[int, Look]:
    """Validate `parameters` against §3's ranges; returns the frame rate (default 24) and how the head moves."""
    fps = _video_fps(parameters)
    given = parameters if isinstance(parameters, dict) else {}
    defaults = Look()
    look = Look(
        template_id=given.get("template_id", defaults.template_id),
        head_move_strength=float(given.get("head_move_strength", defaults.head_move_strength)),
        eye_move_freq=float(given.get("eye_move_freq", defaults.eye_move_freq)),
        mouth_move_strength=float(given.get("mouth_move_strength", defaults.mouth_move_strength)),
        defect=defect,
    )
    return fps, look


def _video_fps(parameters: object) -> int:
    if parameters is None:
        return 24
    if not isinstance(parameters, dict):
        raise _out_of_definition("parameters")
    ranges = {"eye_move_freq": 1.0, "mouth_move_strength": 1.5, "head_move_strength": 1.0}
    for name, top in ranges.items():
        value = parameters.get(name)
        if value is not None and not (_is_number(value) and 0.0 <= value <= top):
            raise _out_of_definition(name)
    template = parameters.get("template_id")
    if template is not None and template not in ("normal", "calm", "active"):
        raise _out_of_definition("template_id")
    paste_back = parameters.get("paste_back")
    if paste_back is not None and not isinstance(paste_back, bool):
        raise _out_of_definition("paste_back")
    fps = parameters.get("video_fps")
    if fps is None:
        return 24
    if not isinstance(fps, int) or isinstance(fps, bool) or not 15 <= fps <= 30:
        raise _out_of_definition("video_fps")
    return fps


def _input_url(body: dict[str, Any] | None, name: str) -> str | None:
    inputs = body.get("input") if body else None
    value = inputs.get(name) if isinstance(inputs, dict) else None
    return value if isinstance(value, str) and value else None


def _require(body: dict[str, Any] | None, model: str) -> dict[str, Any]:
    if body is None:
        raise _bad_request()
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _missing("model")
    if body["model"] != model:
        raise ApiError(404, "ModelNotFound", "Model can not be found.")
    if not isinstance(body.get("input"), dict):
        raise _missing("input")
    return body


def _corrupt(data: bytes) -> bytes:
    """Same length, but the `ftyp` box and every 1024th byte flipped: any MP4 check must fail."""
    damaged = bytearray(data)
    for index in [*range(min(16, len(damaged))), *range(16, len(damaged), 1024)]:
        damaged[index] ^= 0xFF
    return bytes(damaged)


class _Emulator:
    def __init__(self, settings: EmulatorSettings, clock: Clock) -> None:
        self.settings = settings
        self.state = EmulatorState(settings, clock)
        self.detector = FaceDetector(resolve_detector(settings.detector))
        self.real_video = settings.video == "real" and video_encoder_available()
        self._videos: OrderedDict[MediaKey, bytes] = OrderedDict()
        self._video_bytes = 0
        self._encoding: dict[MediaKey, anyio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.cleanup_ctx.append(self._http_client)
        synthesis = f"{API}/services/aigc/image2video/video-synthesis"
        app.add_routes(
            [
                web.post(f"{API}/services/aigc/image2video/face-detect", self._detect),
                web.post(synthesis, self._submit),
                web.post(synthesis + "/", self._submit),  # §3: the docs write the trailing slash
                web.get(f"{API}/tasks", self._list),
                web.get(f"{API}/tasks/", self._list),  # §5
                web.get(f"{API}/tasks/{{task_id}}", self._task),
                web.get(f"{API}/tasks/{{task_id}}/", self._task),  # the SDK's aio client appends a slash (§9)
                web.post(f"{API}/tasks/{{task_id}}/cancel", self._cancel),
                web.get(f"{API}/uploads", self._policy),
                web.post("/_oss", self._upload),
                web.get("/_results/{token:[0-9a-f]+}.mp4", self._download),
                web.get("/_emulator/stats", self._control_stats),
                web.put("/_emulator/faults", self._control_faults),
                web.post("/_emulator/advance", self._control_advance),
                web.post("/_emulator/reset", self._control_reset),
            ]
        )
        return app

    async def _http_client(self, _app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=_FETCH_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            yield
        self._session = None

    # --- plumbing ---------------------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        request[_REQUEST_ID] = request_id
        try:
            return await handler(request)
        except (ApiError, OssError) as error:
            endpoint = request.get(_ENDPOINT)
            if error.status == 429 and endpoint is not None:
                self.state.count_throttled(endpoint)
            return self._error_response(request, error)
        except _Drop:
            if request.transport is not None:
                request.transport.close()
            # aiohttp fails to write this to the closed transport and drops the connection quietly.
            return web.Response()
        except web.HTTPException:
            raise
        except Exception as error:
            # A bug of the emulator's own: answer like the service's 500 (a client retries it) and log one
            # structured line; its traceback is shown only when debug logging asks for it (`lpengine run --debug`).
            structlog.get_logger("lpengine.emulator").error(
                "emulator.internal_error", path=request.path, error=repr(error), exc_info=error
            )
            return self._error_response(request, ApiError.catalogued("InternalError"))

    @staticmethod
    def _error_response(request: web.Request, error: ApiError | OssError) -> web.Response:
        if isinstance(error, OssError) or request.get(_OSS_STYLE, False):
            return _oss_xml(error, request[_REQUEST_ID])
        body = {"code": error.code, "message": error.message, "request_id": request[_REQUEST_ID]}
        response = web.json_response(body, status=error.status)
        if error.status == 429:  # whole seconds (RFC 9110 delta-seconds), at least one
            response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
        return response

    async def _enter(
        self,
        request: web.Request,
        endpoint: Endpoint,
        subject: str,
        family: Family | None = None,
        bucket: str | None = None,
    ) -> str:
        """The common prelude; returns the caller's API key ("" for OSS-style calls, which carry none)."""
        request[_ENDPOINT] = endpoint
        self.state.count_request(endpoint)
        if self.state.faults.latency_s:
            await anyio.sleep(self.state.faults.latency_s)
        api_key = ""
        if family is not None:
            api_key = self._authenticate(request)
            throttled = self.state.admit(family, bucket or family)
            if throttled is not None:
                raise throttled
        fault = self.state.request_fault(endpoint, subject)
        if fault == "drop":
            raise _Drop
        if fault is not None:
            raise fault
        return api_key

    def _authenticate(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "").strip()
        if not header:
            raise ApiError(401, "InvalidApiKey", "No API-key provided.")
        scheme, _, key = header.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or self.state.key_id(key) is None:
            raise ApiError(401, "InvalidApiKey", "Invalid API-key provided.")
        return key

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any] | None:
        try:
            body = await request.json()
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            return None
        return body if isinstance(body, dict) else None

    def _reply(self, request: web.Request, payload: dict[str, Any]) -> web.Response:
        return web.json_response({**payload, "request_id": request[_REQUEST_ID]})

    async def _fetch(self, request: web.Request, url: str, model: str, limit: int) -> bytes | None:
        """Input bytes, or None when the URL cannot be downloaded. `oss://` misuse is a 400 (§8)."""
        if url.startswith("oss://"):
            if request.headers.get(_OSS_RESOLVE_HEADER, "").lower() != "enable":
                raise ApiError(
                    400,
                    "invalid_parameter_error",
                    "InternalError.Algo.InvalidParameter: The provided URL does not appear to be valid. "
                    "Ensure it is correctly formatted.",
                )
            return self.state.resolve_upload(url.removeprefix("oss://"), model)
        if not url.startswith(("http://", "https://")) or self._session is None:
            return None
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    return None
                data = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > limit:  # enough to know it is too large
                        break
                return bytes(data)
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _inspect_image(self, data: bytes) -> ImageInfo:
        try:
            return await anyio.to_thread.run_sync(inspect_image, data)
        except MediaError as error:
            raise ApiError(400, error.code, error.message) from error

    async def _inspect_audio(self, data: bytes) -> AudioInfo:
        try:
            return await anyio.to_thread.run_sync(inspect_audio, data, self.settings.audio_max_s)
        except MediaError as error:
            raise ApiError(400, error.code, error.message) from error

    async def _face_problem(self, image: ImageInfo, url: str) -> str | None:
        """None when a face is found, else the rejection message."""
        if not await anyio.to_thread.run_sync(self.detector.has_face, image, url):
            return NO_FACE_MESSAGE
        rule = self.state.rule("detect_fail", url)
        return None if rule is None else rule.message or NO_FACE_MESSAGE

    # --- §2 detect --------------------------------------------------------------------------------------------

    async def _detect(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        await self._enter(request, "detect", _input_url(body, "image_url") or "", "detect")
        image_url = _input_url(_require(body, DETECT_MODEL), "image_url")
        if image_url is None:
            raise _missing("input.image_url")
        data = await self._fetch(request, image_url, DETECT_MODEL, IMAGE_MAX_BYTES)
        if data is None:
            raise _download_failed()
        image = await self._inspect_image(data)
        problem = await self._face_problem(image, image_url)
        self.state.count_detect(image.sha256)
        output = {"pass": problem is None, "message": problem or ""}
        return self._reply(request, {"output": output, "usage": {"image_count": 1}})

    # --- §3 submit --------------------------------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        api_key = await self._enter(request, "submit", _input_url(body, "image_url") or "", "submit")
        if request.headers.get("X-DashScope-Async", "").lower() != "enable":
            raise ApiError(403, "AccessDenied", "current user api does not support synchronous calls.")  # §1
        payload = _require(body, VIDEO_MODEL)
        image_url, audio_url = _input_url(payload, "image_url"), _input_url(payload, "audio_url")
        if image_url is None:
            raise _missing("input.image_url")
        if audio_url is None:
            raise _missing("input.audio_url")
        defect = self.state.rule("defect", image_url)
        fps, look = _look(payload.get("parameters"), defect.defect if defect else None)
        image_bytes = await self._fetch(request, image_url, VIDEO_MODEL, IMAGE_MAX_BYTES)
        audio_bytes = await self._fetch(request, audio_url, VIDEO_MODEL, AUDIO_MAX_BYTES)
        if image_bytes is None or audio_bytes is None:
            if self.settings.unreachable_input == "reject":
                raise _download_failed()  # §6's synchronous code for an input the service cannot download
            # §3's other shape: the task is queued and fails `InvalidURL` when it reaches the runner
            return self._queue(request, api_key, image_url, None, 0.0, None, ("InvalidURL", _INVALID_URL))
        # Format, size and length problems are 400s at submit too; a missing face is only found "later" (§3):
        # the task is queued and fails when it reaches the runner.
        image = await self._inspect_image(image_bytes)
        audio = await self._inspect_audio(audio_bytes)
        media = None
        failure: tuple[str, str] | None = None
        if problem := await self._face_problem(image, image_url):
            failure = ("InvalidImage.NoHumanFace", problem)
        elif self.real_video:
            thumbnail = await anyio.to_thread.run_sync(make_thumbnail, image)
            media = ((image.sha256, audio.sha256, fps, look), thumbnail, audio_bytes)
        return self._queue(request, api_key, image_url, image.sha256, audio.duration, media, failure)

    def _queue(
        self,
        request: web.Request,
        api_key: str,
        image_url: str,
        image_sha256: str | None,
        audio_duration: float,
        media: tuple[MediaKey, bytes, bytes] | None,
        failure: tuple[str, str] | None,
    ) -> web.Response:
        task = self.state.submit(
            request_id=request[_REQUEST_ID],
            api_key=api_key,
            image_url=image_url,
            image_sha256=image_sha256,
            audio_duration=audio_duration,
            media=media,
            input_failure=failure,
        )
        faults = self.state.faults
        if self.state.applies("lose_submit_response", image_url, faults.lose_submit_response_rate):
            raise _Drop
        return self._reply(request, {"output": {"task_id": task.task_id, "task_status": "PENDING"}})

    # --- §4 query, §5 list and cancel -------------------------------------------------------------------------

    def _subject(self, task_id: str) -> str:
        task = self.state.peek(task_id)
        return task.image_url if task else ""

    async def _task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        await self._enter(request, "task", self._subject(task_id), "query")
        task = self.state.task(task_id)
        if task is None:
            return self._reply(request, {"output": {"task_id": task_id, "task_status": "UNKNOWN"}})
        output: dict[str, Any] = {
            "task_id": task.task_id,
            "task_status": self.settings.status_aliases.get(task.status, task.status),
            "submit_time": format_time(task.submitted_at),
        }
        if task.scheduled_at is not None:
            output["scheduled_time"] = format_time(task.scheduled_at)
        if task.status in ("SUCCEEDED", "FAILED", "CANCELED") and task.ends_at is not None:
            output["end_time"] = format_time(task.ends_at)
        if task.status == "FAILED":
            output["code"], output["message"] = task.code, task.message
        if task.status != "SUCCEEDED":
            return self._reply(request, {"output": output})
        url = self.state.result_url(self._origin(request), task)
        if self.settings.result_shape == "results":
            output["results"] = {"video_url": url}
        elif self.settings.result_shape == "flat":
            output["video_url"] = url
        usage = {"video_duration": round(task.audio_duration, 2), "video_ratio": "standard"}
        return self._reply(request, {"output": output, "usage": usage})

    async def _cancel(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        await self._enter(request, "cancel", self._subject(task_id), "query")
        if not self.state.cancel(task_id):
            raise ApiError(
                400,
                "UnsupportedOperation",
                "Failed to cancel the task, please confirm if the task is in PENDING status.",
            )
        return self._reply(request, {})

    async def _list(self, request: web.Request) -> web.Response:
        await self._enter(request, "list", "", "query")
        query = request.query
        try:
            start = parse_list_time(query["start_time"]) if "start_time" in query else None
            # An end given to the second includes that whole second.
            end = parse_list_time(query["end_time"]) + 1.0 if "end_time" in query else None
        except ValueError as error:
            raise _bad_request("start_time and end_time must be formatted as YYYYMMDDhhmmss.") from error
        # §5: no bounds = the last 24 h; one bound = 24 h from/to it.
        if start is None:
            end = self.state.now() + 1.0 if end is None else end
            start = end - _LIST_WINDOW_S
        elif end is None:
            end = start + _LIST_WINDOW_S
        if not 0 < end - start <= _LIST_WINDOW_S + 1.0:
            raise _bad_request("The time range between start_time and end_time must be within 24 hours.")
        page_no = self._int_param(query, "page_no", 1, 1, sys.maxsize)
        page_size = self._int_param(query, "page_size", 10, 1, _LIST_MAX_PAGE_SIZE)
        status = query.get("status")
        if status not in (None, "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"):
            raise _missing("status")
        tasks = self.state.list_tasks(
            start=start, end=end, task_id=query.get("task_id"), model_name=query.get("model_name"), status=status
        )
        page = tasks[(page_no - 1) * page_size : page_no * page_size]
        return self._reply(
            request,
            {
                "total": len(tasks),
                "total_page": math.ceil(len(tasks) / page_size),
                "page_no": page_no,
                "page_size": page_size,
                "data": [self._list_item(task) for task in page],
            },
        )

    @staticmethod
    def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
        raw = query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError as error:
            raise _missing(name) from error
        if not low <= value <= high:
            raise _missing(name)
        return value

    @staticmethod
    def _list_item(task: Task) -> dict[str, Any]:
        item: dict[str, Any] = {
            "task_id": task.task_id,
            "status": task.status,
            "model_name": VIDEO_MODEL,
            "api_key_id": task.api_key_id,
            "caller_uid": "emulator",
            "caller_parent_id": "emulator",
            "region": "cn-beijing",
            "request_id": task.request_id,
            "gmt_create": int(task.submitted_at * 1000),
            "user_api_unique_key": _USER_API_KEY,
        }
        if task.scheduled_at is not None:
            item["start_time"] = int(task.scheduled_at * 1000)
        if task.status in ("SUCCEEDED", "FAILED", "CANCELED") and task.ends_at is not None:
            item["end_time"] = int(task.ends_at * 1000)
        return item

    # --- §8 temporary uploads ---------------------------------------------------------------------------------

    async def _policy(self, request: web.Request) -> web.Response:
        model = request.query.get("model", "")
        await self._enter(request, "policy", model, "policy", bucket=f"policy:{model}")
        if request.query.get("action") != "getPolicy":
            raise _missing("action")
        if not model:
            raise _missing("model")
        if model not in (DETECT_MODEL, VIDEO_MODEL):
            raise ApiError(404, "ModelNotFound", "Model can not be found.")
        return self._reply(request, {"data": self.state.issue_policy(model, self._origin(request))})

    async def _upload(self, request: web.Request) -> web.Response:
        request[_OSS_STYLE] = True
        not_multipart = OssError(400, "InvalidArgument", "The body of your POST request is not multipart/form-data.")
        if request.content_type != "multipart/form-data":
            raise not_multipart
        try:
            reader = await request.multipart()
        except ValueError as error:  # no boundary
            raise not_multipart from error
        fields: dict[str, str] = {}
        while True:
            part = await reader.next()
            if not isinstance(part, aiohttp.BodyPartReader):
                raise OssError(400, "InvalidArgument", "The body of your POST request has no file field.")
            if part.name == "file":
                break
            fields[part.name or ""] = await part.text()
        key = fields.get("key", "")
        await self._enter(request, "upload", key)
        for name in ("OSSAccessKeyId", "Signature", "policy", "key"):
            if not fields.get(name):
                raise OssError(400, "InvalidArgument", f"Missing required field: {name}.")
        policy = self.state.check_upload(
            access_key_id=fields["OSSAccessKeyId"], signature=fields["Signature"], policy=fields["policy"], key=key
        )
        limit = UPLOAD_MAX_MB * 1024 * 1024
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            data += chunk
            if len(data) > limit:
                raise OssError(400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size.")
        self.state.store_upload(policy, key, bytes(data))
        status = 200 if fields.get("success_action_status") == "200" else 204
        return web.Response(status=status)

    # --- results ----------------------------------------------------------------------------------------------

    async def _download(self, request: web.Request) -> web.StreamResponse:
        request[_OSS_STYLE] = True
        token = request.match_info["token"]
        result = self.state.peek_result(token)
        subject = result.image_url if result else ""
        await self._enter(request, "download", subject)
        query = request.query
        result = self.state.open_result(token, query.get("Expires", ""), query.get("Signature", ""))
        body = await self._video(result)
        faults = self.state.faults
        if self.state.applies("truncate_download", subject, faults.truncate_download_rate):
            response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            raise _Drop
        if self.state.applies("corrupt_download", subject, faults.corrupt_download_rate):
            body = _corrupt(body)
        return web.Response(body=body, content_type="video/mp4")

    async def _video(self, result: Result) -> bytes:
        """Real mode: encode once per (image, audio, fps), then serve from the LRU cache."""
        key = result.media
        if key is None or not self.real_video:
            return stub_video()
        lock = self._encoding.setdefault(key, anyio.Lock())
        async with lock:
            cached = self._videos.get(key)
            if cached is None:
                thumbnail, audio = self.state.blob(key[0]), self.state.blob(key[1])
                cached = await anyio.to_thread.run_sync(render, thumbnail, audio, key[2], key[3])
                self._videos[key] = cached
                self._video_bytes += len(cached)
                while self._video_bytes > _VIDEO_CACHE_BYTES and len(self._videos) > 1:
                    self._video_bytes -= len(self._videos.popitem(last=False)[1])
            self._videos.move_to_end(key)
        if not lock.statistics().tasks_waiting:
            self._encoding.pop(key, None)
        return cached

    @staticmethod
    def _origin(request: web.Request) -> str:
        return str(request.url.origin())

    # --- controls ---------------------------------------------------------------------------------------------

    async def _control_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.state.stats().model_dump(mode="json"))

    async def _control_faults(self, request: web.Request) -> web.Response:
        try:
            faults = FaultSettings.model_validate_json(await request.read())
        except ValidationError as error:
            return web.json_response({"error": error.errors(include_url=False)}, status=400)
        self.state.set_faults(faults)
        return web.json_response(faults.model_dump(mode="json"))

    async def _control_advance(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        seconds = body.get("seconds") if body else None
        if not _is_number(seconds) or seconds < 0:
            return web.json_response({"error": 'body must be {"seconds": N} with N >= 0'}, status=400)
        self.state.clock.advance(seconds)
        return web.json_response({"now": self.state.settle()})

    async def _control_reset(self, _request: web.Request) -> web.Response:
        self.state.reset()
        return web.json_response({"now": self.state.now()})


class RunningEmulator:
    """A started emulator: its URLs and in-process controls (the same as the `/_emulator/*` endpoints)."""

    def __init__(self, emulator: _Emulator, root_url: str) -> None:
        self._emulator = emulator
        self.root_url = root_url
        """`http://host:port`."""
        self.base_url = root_url + API
        """The DashScope base URL to give a client (`…/api/v1`)."""

    @property
    def settings(self) -> EmulatorSettings:
        return self._emulator.settings

    def now(self) -> float:
        """The virtual clock, epoch seconds."""
        return self._emulator.state.now()

    def stats(self) -> EmulatorStats:
        return self._emulator.state.stats()

    def set_faults(self, faults: FaultSettings) -> None:
        """Replace every fault knob; rule `times` counters and the fault RNG start over."""
        self._emulator.state.set_faults(faults)

    def advance(self, seconds: float) -> None:
        """Jump emulated time forward; the queue, expiries and quotas catch up on the next read."""
        self._emulator.state.clock.advance(seconds)
        self._emulator.state.settle()

    def reset(self) -> None:
        """Forget tasks, uploads, results and statistics (settings, faults and the clock stay)."""
        self._emulator.state.reset()


@asynccontextmanager
async def run_emulator(
    settings: EmulatorSettings | None = None, *, clock: Clock | None = None
) -> AsyncIterator[RunningEmulator]:
    """Serve the emulator on `settings.host:settings.port` for the duration of the block.

    `clock` replaces real time (e.g. `ManualClock` so that emulated time moves only on `advance()`).
    """
    settings = settings or EmulatorSettings()
    emulator = _Emulator(settings, clock or SystemClock())
    runner = web.AppRunner(emulator.build_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        root = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        yield RunningEmulator(emulator, root)
    finally:
        await runner.cleanup()


async def serve_forever(settings: EmulatorSettings | None = None) -> None:
    """Run until cancelled; prints one line `DashScope emulator: <base_url>` when ready (for humans and scripts)."""
    async with run_emulator(settings) as emulator:
        sys.stdout.write(f"DashScope emulator: {emulator.base_url}\n")
        sys.stdout.flush()
        await anyio.sleep_forever()
