"""Pages and the JSON API. The pages are rendered on the server and use the same API as scripts do."""

from __future__ import annotations

import contextlib
import secrets
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from lpengine.config import VideoParams
from lpengine.engine import DryRunReport
from lpengine.errors import ConfigError, LPEngineError
from lpengine.web.batches import BatchBusy, BatchManager
from lpengine.web.uploads import MAX_IMAGES, FileProblem, Intake, UploadRefused, read_intake, video_params

__all__ = ["MANAGER", "SSE_INTERVAL_S", "routes"]

MANAGER = web.AppKey("manager", BatchManager)
SSE_INTERVAL_S = 1.0
"""How often a live stream looks for news: the counters are read once a second whatever the item rate, so the
console's cost does not grow with the batch's speed or the number of listeners' items."""

routes = web.RouteTableDef()


def _manager(request: web.Request) -> BatchManager:
    return request.app[MANAGER]


def _bid(request: web.Request) -> str:
    bid = request.match_info["bid"]
    try:
        _manager(request).folder(bid)
    except KeyError:
        raise web.HTTPNotFound(text=f"no batch {bid!r}") from None
    return bid


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _param_fields() -> list[dict[str, Any]]:
    """The video parameters with their documented ranges, for the form (read from the config model itself)."""
    schema = VideoParams.model_json_schema()["properties"]
    fields = []
    for name, spec in schema.items():
        if name == "template_id":
            continue
        kind = "bool" if spec.get("type") == "boolean" else "number"
        fields.append(
            {
                "name": name,
                "kind": kind,
                "min": spec.get("minimum"),
                "max": spec.get("maximum"),
                "step": 1 if spec.get("type") == "integer" else 0.05,
                "default": spec.get("default"),
                "help": spec.get("description", ""),
            }
        )
    return fields


# -- pages --------------------------------------------------------------------------------------------------------


@routes.get("/")
@aiohttp_jinja2.template("new.html")
async def new_batch_page(request: web.Request) -> dict[str, Any]:
    manager = _manager(request)
    return {
        "page": "new",
        "presets": list(manager.presets),
        "fields": _param_fields(),
        "pricing": manager.pricing,
        "max_images": MAX_IMAGES,
    }


@routes.get("/batches")
@aiohttp_jinja2.template("batches.html")
async def batches_page(request: web.Request) -> dict[str, Any]:
    manager = _manager(request)
    return {"page": "batches", "batches": [await manager.summary(bid, items=False) for bid in manager.ids()]}


@routes.get("/batches/{bid}")
@aiohttp_jinja2.template("batch.html")
async def batch_page(request: web.Request) -> dict[str, Any]:
    bid = _bid(request)
    manager = _manager(request)
    page = _int(request.query.get("page"), 1)
    return {
        "page": "batch",
        "batch": await manager.summary(bid, page=page),
        "log": manager.log_tail(bid),
    }


@routes.get("/batches/{bid}/gallery")
@aiohttp_jinja2.template("gallery.html")
async def gallery_page(request: web.Request) -> dict[str, Any]:
    bid = _bid(request)
    review = request.query.get("filter") == "needs_review"
    page = _int(request.query.get("page"), 1)
    summary = await _manager(request).summary(bid, page=page, per_page=60, needs_review=review)
    return {"page": "gallery", "batch": summary, "review": review}


def _int(text: str | None, default: int, *, lo: int = 1, hi: int = 10**9) -> int:
    try:
        return min(max(int(text), lo), hi) if text else default
    except ValueError:
        return default


# -- API ----------------------------------------------------------------------------------------------------------


async def _intake(request: web.Request) -> tuple[Intake, VideoParams, dict[str, Any]]:
    """Read and check an upload; refused as a whole raises `UploadRefused` with nothing kept."""
    manager = _manager(request)
    incoming = manager.workspace / ".incoming" / secrets.token_hex(8)
    intake = await read_intake(request, incoming)
    try:
        preset = manager.presets.get(intake.preset or "normal")
        if preset is None:
            raise UploadRefused(f"preset {intake.preset!r} is unknown; choose one of {', '.join(manager.presets)}")
        base = manager.video_defaults.model_dump()
        params = video_params(intake, {**base, **preset})
        if intake.server_folder is not None and not intake.server_folder.is_dir():
            raise UploadRefused(f"folder {intake.server_folder} does not exist on the server; check the path")
        if intake.audio is None and not any(p.name == "audio" for p in intake.problems):
            intake.problems.append(_missing_audio())
        if not intake.images and intake.server_folder is None:
            raise UploadRefused("no usable photo: add at least one JPEG, PNG, BMP or WEBP portrait", intake.problems)
    except BaseException:
        intake.discard()
        raise
    estimate = intake.estimate(manager.pricing.detect_per_image, manager.pricing.video_per_second).to_dict()
    return intake, params, estimate


def _missing_audio() -> FileProblem:
    return FileProblem("audio", "no voice track: add a WAV or MP3 file (1 s to 3 min, below 15 MB)")


async def _checked_upload(request: web.Request) -> tuple[Intake, VideoParams, dict[str, Any]] | web.Response:
    """The checked upload, or the 400 answer that refuses it as a whole."""
    try:
        return await _intake(request)
    except UploadRefused as exc:
        return _json({"error": exc.message, "files": [p.to_dict() for p in exc.problems]}, status=400)


@routes.post("/api/estimate")
async def api_estimate(request: web.Request) -> web.Response:
    """The local checks and the dry-run estimate of an upload; nothing is kept, started or paid."""
    got = await _checked_upload(request)
    if isinstance(got, web.Response):
        return got
    intake, _params, estimate = got
    intake.discard()
    return _json({"files": [p.to_dict() for p in intake.problems], "estimate": estimate})


@routes.post("/api/batches")
async def api_create(request: web.Request) -> web.Response:
    got = await _checked_upload(request)
    if isinstance(got, web.Response):
        return got
    intake, params, estimate = got
    if intake.problems:
        intake.discard()
        return _json(
            {
                "error": f"{len(intake.problems)} file(s) refused; nothing was started: fix or leave them out",
                "files": [p.to_dict() for p in intake.problems],
            },
            status=400,
        )
    try:
        bid = _manager(request).create(intake, params, intake.preset, estimate)
    except ConfigError as exc:
        intake.discard()
        return _json({"error": "; ".join(exc.problems), "files": []}, status=400)
    return _json({"id": bid, "estimate": estimate}, status=201)


@routes.get("/api/batches")
async def api_list(request: web.Request) -> web.Response:
    manager = _manager(request)
    return _json({"batches": [await manager.summary(bid, items=False) for bid in manager.ids()]})


@routes.get("/api/batches/{bid}")
async def api_one(request: web.Request) -> web.Response:
    bid = _bid(request)
    summary = await _manager(request).summary(
        bid,
        page=_int(request.query.get("page"), 1),
        per_page=_int(request.query.get("per_page"), 100, hi=1000),
        needs_review=request.query.get("filter") == "needs_review",
    )
    return _json(summary)


def _control(action: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        bid = _bid(request)
        state = getattr(_manager(request), action)(bid)
        return _json({"id": bid, "state": state})

    return handler


for _action in ("cancel", "retry", "pause", "resume"):
    routes.post(f"/api/batches/{{bid}}/{_action}")(_control(_action))


def _redo_answer(bid: str, estimate: DryRunReport) -> dict[str, Any]:
    return {
        "id": bid,
        "items": len(estimate.redo),
        "names": list(estimate.redo_names),
        "video_seconds": round(estimate.redo_seconds, 3),
        "cost_cny": estimate.redo_cost_cny,
        "run_items": estimate.would_submit,
        "run_cost_cny": estimate.estimated_cost_cny,
        "resuming": estimate.redo_resuming,
        "confirm": estimate.redo_digest,
    }


def _nothing_to_redo(estimate: DryRunReport) -> str:
    if estimate.redo_resuming:
        return f"{estimate.redo_resuming} item(s) of the last redo are unfinished: Resume finishes them first"
    return "no video is judged bad: nothing to redo"


@routes.get("/api/batches/{bid}/redo-bad")
async def api_redo_estimate(request: web.Request) -> web.Response:
    """What Redo bad would make again and pay (the dry run of `lpengine run --redo bad`); nothing is changed."""
    bid = _bid(request)
    try:
        estimate = await _manager(request).redo_estimate(bid)
    except ConfigError as exc:
        return _json({"error": "; ".join(exc.problems)}, status=409)
    except LPEngineError as exc:
        return _json({"error": str(exc)}, status=409)
    answer = _redo_answer(bid, estimate)
    return _json(answer if estimate.redo else {"message": _nothing_to_redo(estimate), **answer})


@routes.post("/api/batches/{bid}/redo-bad")
async def api_redo(request: web.Request) -> web.Response:
    """Pay again for the bad videos, given the `confirm` of the estimate the user saw: 202 and the batch queued;
    409 with the estimate as it is now when that selection changed, when there is nothing to redo, or while the
    batch runs."""
    bid = _bid(request)
    try:
        confirm = (await request.json())["confirm"]
        if not isinstance(confirm, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return _json({"error": 'send {"confirm": …} from GET /api/batches/{id}/redo-bad'}, status=400)
    manager = _manager(request)
    try:
        queued, estimate = await manager.redo_bad(bid, confirm)
    except BatchBusy as exc:
        return _json({"error": str(exc)}, status=409)
    except ConfigError as exc:
        return _json({"error": "; ".join(exc.problems)}, status=409)
    except LPEngineError as exc:
        return _json({"error": str(exc)}, status=409)
    answer = _redo_answer(bid, estimate)
    if not queued:
        error = _nothing_to_redo(estimate) if not estimate.redo else "the selection changed since it was priced"
        return _json({"error": error, **answer}, status=409)
    return _json({**answer, "state": manager.meta(bid)["state"]}, status=202)


@routes.get("/api/batches/{bid}/events")
async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the batch summary (no items) whenever it changed, checked every `SSE_INTERVAL_S`."""
    bid = _bid(request)
    manager = _manager(request)
    async with sse_response(request) as sse:
        last: Any = None
        log_seen: list[str] = []
        # A closed tab is how every stream ends: the write that finds the socket gone is not an error to log.
        with contextlib.suppress(ConnectionResetError):
            while sse.is_connected():
                summary = await manager.summary(bid, items=False)
                if summary["version"] != last:
                    last = summary["version"]
                    log = manager.log_tail(bid, lines=12)
                    payload = {"summary": summary, "log": log if log != log_seen else None}
                    log_seen = log
                    await sse.send(orjson.dumps(payload).decode(), event="summary")
                await manager.wait_changed(SSE_INTERVAL_S)
    return sse


@routes.get("/api/batches/{bid}/videos/{name}")
async def api_video(request: web.Request) -> web.StreamResponse:
    path = _manager(request).video_path(_bid(request), request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound(text="no such video in this batch")
    return web.FileResponse(path, headers={"Content-Type": "video/mp4"})


class _Sink:
    """A write-only file for `zipfile` that hands its bytes out in pieces (zipfile streams to unseekable files)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


@routes.get("/api/batches/{bid}/videos.zip")
async def api_zip(request: web.Request) -> web.StreamResponse:
    """Every finished video of the batch as one zip, streamed: memory stays at one chunk whatever the batch."""
    bid = _bid(request)
    manager = _manager(request)
    review = request.query.get("filter") == "needs_review"
    summary = await manager.summary(bid, per_page=10**9, needs_review=review)
    paths = [
        p
        for row in summary["items"]
        if row["video_url"] and (p := manager.video_path(bid, row["video_url"].rsplit("/", 1)[1])) is not None
    ]
    response = web.StreamResponse(
        headers={"Content-Type": "application/zip", "Content-Disposition": f'attachment; filename="{bid}.zip"'}
    )
    await response.prepare(request)
    sink = _Sink()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for path in paths:
            with archive.open(zipfile.ZipInfo(path.name, time.localtime(path.stat().st_mtime)[:6]), "w") as dst:
                for chunk in _chunks(path):
                    dst.write(chunk)
                    await response.write(sink.take())
    await response.write(sink.take())
    await response.write_eof()
    return response


def _chunks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(size):
            yield chunk
