"""The DashScope emulator over real HTTP on 127.0.0.1: every endpoint, status, limit, expiry and fault knob.

Emulated time is driven by a `ManualClock`, so it moves only on `advance()`: no sleeps, no timing races.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import re
import sys
import uuid
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from lpengine.demo_assets import ensure_demo_assets, make_non_faces, make_portraits
from lpengine.emulator import (
    EmulatorSettings,
    FaultRule,
    FaultSettings,
    ManualClock,
    RunningEmulator,
    run_emulator,
)

KEY = "sk-test"
VOICE_S = 3.946125  # lpengine/assets/voice.wav: 63 138 frames at 16 kHz
RUN_S = VOICE_S * 1.5  # default realtime_factor
STEP = RUN_S + 0.001  # advancing by this surely finishes a task, whatever the float rounding
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}$")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- inputs ---------------------------------------------------------------------------------------------------


def _wav(seconds: float, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(b"\x80" * int(seconds * rate))
    return out.getvalue()


def _mp3(wav: bytes) -> bytes:
    import av

    out = io.BytesIO()
    with av.open(io.BytesIO(wav), mode="r") as src, av.open(out, mode="w", format="mp3") as dst:
        stream = dst.add_stream("libmp3lame", rate=16_000)
        stream.layout = "mono"
        for frame in src.decode(audio=0):
            frame.pts = None
            dst.mux(stream.encode(frame))
        dst.mux(stream.encode(None))
    return out.getvalue()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    ensure_demo_assets(root, count=2)  # astronaut.png, portrait-01.jpg, noface-coffee.jpg
    make_portraits(root, 6)
    make_non_faces(root, 1)
    voice = resources.files("lpengine").joinpath("assets", "voice.wav").read_bytes()
    (root / "voice.wav").write_bytes(voice)
    (root / "voice.mp3").write_bytes(_mp3(voice))
    (root / "short.wav").write_bytes(_wav(0.5))
    (root / "long.wav").write_bytes(_wav(181.0))
    (root / "text.wav").write_bytes(b"this is not audio at all" * 10)
    (root / "text.jpg").write_bytes(b"this is not an image" * 10)
    Image.new("RGB", (500, 200), (90, 120, 150)).save(root / "wide.png")
    Image.new("RGB", (64, 64), (200, 0, 0)).save(root / "anim.gif")
    Image.new("RGB", (300, 300), (128, 128, 128)).save(root / "uniform.png")
    return root


@pytest.fixture
async def files(media_dir: Path) -> AsyncIterator[str]:
    """A static file server for the inputs: the emulator fetches image/audio URLs from it like DashScope would."""
    app = web.Application()
    app.router.add_static("/", media_dir)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


# --- the emulator and a raw client ------------------------------------------------------------------------------


@asynccontextmanager
async def emulator(**overrides: Any) -> AsyncIterator[RunningEmulator]:
    settings = EmulatorSettings(**{"api_keys": [KEY, "sk-other"], "speedup": 100.0, "seed": 1, **overrides})
    async with run_emulator(settings, clock=ManualClock()) as emu:
        yield emu


@pytest.fixture
async def emu() -> AsyncIterator[RunningEmulator]:
    async with emulator() as running:
        yield running


class Api:
    """Raw DashScope calls (no lpengine.client): each returns (HTTP status, JSON body)."""

    def __init__(self, http: aiohttp.ClientSession, emu: RunningEmulator) -> None:
        self.http = http
        self.base = emu.base_url

    async def call(
        self,
        method: str,
        path: str,
        *,
        key: str | None = KEY,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[int, dict[str, Any]]:
        sent = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.http.request(method, self.base + path, headers=sent | (headers or {}), **kwargs) as r:
            return r.status, await r.json(content_type=None)

    async def detect(self, image_url: str, **extra: Any) -> tuple[int, dict[str, Any]]:
        body = {"model": "liveportrait-detect", "input": {"image_url": image_url}}
        return await self.call("POST", "/services/aigc/image2video/face-detect", json=body, **extra)

    async def submit(
        self,
        image_url: str,
        audio_url: str,
        parameters: dict[str, Any] | None = None,
        *,
        model: str = "liveportrait",
        headers: dict[str, str] | None = None,
        path: str = "/services/aigc/image2video/video-synthesis",
    ) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"model": model, "input": {"image_url": image_url, "audio_url": audio_url}}
        if parameters is not None:
            body["parameters"] = parameters
        return await self.call("POST", path, json=body, headers={"X-DashScope-Async": "enable"} | (headers or {}))

    async def submit_ok(self, image_url: str, audio_url: str, **kwargs: Any) -> str:
        status, body = await self.submit(image_url, audio_url, **kwargs)
        assert status == 200, body
        assert body["output"]["task_status"] == "PENDING"
        return str(body["output"]["task_id"])

    async def task(self, task_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/tasks/{task_id}")
        assert status == 200, body
        return body

    async def status(self, task_id: str) -> str:
        return str((await self.task(task_id))["output"]["task_status"])

    async def cancel(self, task_id: str) -> tuple[int, dict[str, Any]]:
        return await self.call("POST", f"/tasks/{task_id}/cancel")

    async def list(self, **params: Any) -> tuple[int, dict[str, Any]]:
        return await self.call("GET", "/tasks", params=params)

    async def policy(self, model: str) -> dict[str, Any]:
        status, body = await self.call("GET", "/uploads", params={"action": "getPolicy", "model": model})
        assert status == 200, body
        return dict(body["data"])

    async def upload(self, policy: dict[str, Any], name: str, data: bytes, **override: str) -> tuple[int, str]:
        form = aiohttp.FormData()
        fields = {
            "OSSAccessKeyId": policy["oss_access_key_id"],
            "Signature": policy["signature"],
            "policy": policy["policy"],
            "key": f"{policy['upload_dir']}/{name}",
            "x-oss-object-acl": policy["x_oss_object_acl"],
            "x-oss-forbid-overwrite": policy["x_oss_forbid_overwrite"],
            "success_action_status": "200",
        } | override
        for field, value in fields.items():
            form.add_field(field, value)
        form.add_field("file", data, filename=name)
        async with self.http.post(policy["upload_host"], data=form) as r:
            return r.status, await r.text()

    async def download(self, url: str) -> tuple[int, bytes, aiohttp.ClientResponse]:
        async with self.http.get(url) as r:
            return r.status, await r.read(), r


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(http: aiohttp.ClientSession, emu: RunningEmulator) -> Api:
    return Api(http, emu)


@pytest.fixture
async def roomy(http: aiohttp.ClientSession) -> AsyncIterator[Api]:
    """An emulator whose quotas never get in the way of a test about something else."""
    async with emulator(detect_qps=1000.0, submit_qps=1000.0) as running:
        yield Api(http, running)


def sha(media_dir: Path, name: str) -> str:
    return hashlib.sha256((media_dir / name).read_bytes()).hexdigest()


# --- auth and detect --------------------------------------------------------------------------------------------


async def test_missing_or_unknown_key_is_401_with_flat_body(api: Api, files: str) -> None:
    """§1: no key and a wrong key are 401 InvalidApiKey with {code, message, request_id} only."""
    status, body = await api.detect(f"{files}/astronaut.png", key=None)
    assert status == 401
    assert body["code"] == "InvalidApiKey" and body["message"] == "No API-key provided."
    assert set(body) == {"code", "message", "request_id"}
    uuid.UUID(body["request_id"])
    status, body = await api.call("GET", "/tasks", key="sk-wrong")
    assert (status, body["message"]) == (401, "Invalid API-key provided.")


async def test_detect_passes_portraits_and_rejects_non_faces(
    api: Api, files: str, emu: RunningEmulator, media_dir: Path
) -> None:
    """§2: pass:true and pass:false are both HTTP 200 with usage.image_count; SDK extras in `input` are ignored."""
    body = {
        "model": "liveportrait-detect",
        "input": {"image_url": f"{files}/astronaut.png", "prompt": None, "extend_prompt": True},
    }
    status, passed = await api.call("POST", "/services/aigc/image2video/face-detect", json=body)
    assert status == 200
    assert passed["output"] == {"pass": True, "message": ""}
    assert passed["usage"] == {"image_count": 1}
    for name in ("portrait-0000.jpg", "portrait-0005.jpg", "portrait-01.jpg"):
        assert (await api.detect(f"{files}/{name}"))[1]["output"]["pass"] is True, name
    status, rejected = await api.detect(f"{files}/noface-coffee.jpg")
    assert status == 200
    assert rejected["output"] == {"pass": False, "message": "No human face detected."}
    emu.advance(1.0)  # detect allows 5 per second
    assert (await api.detect(f"{files}/noface-0000.jpg"))[1]["output"]["pass"] is False
    await api.detect(f"{files}/astronaut.png")
    stats = emu.stats()
    assert stats.detect_per_image[sha(media_dir, "astronaut.png")] == 2
    assert stats.requests["detect"] == 7


async def test_detect_input_errors(roomy: Api, files: str, closed_port_url: str) -> None:
    """§2/§6: unreachable, unsupported format, aspect > 2, wrong model and missing URL answer documented 4xx."""
    cases = {
        closed_port_url: "InvalidParameter.InputDownloadFailed",
        f"{files}/missing.png": "InvalidParameter.InputDownloadFailed",
        f"{files}/text.jpg": "InvalidParameter.UnsupportedFileFormat",
        f"{files}/anim.gif": "InvalidParameter.UnsupportedFileFormat",
        f"{files}/wide.png": "InvalidImage.ImageSize",
    }
    for url, code in cases.items():
        status, body = await roomy.detect(url)
        assert (status, body["code"]) == (400, code), url
    body = {"model": "liveportrait", "input": {"image_url": f"{files}/astronaut.png"}}
    status, answer = await roomy.call("POST", "/services/aigc/image2video/face-detect", json=body)
    assert (status, answer["code"]) == (404, "ModelNotFound")
    body = {"model": "liveportrait-detect", "input": {}}
    status, answer = await roomy.call("POST", "/services/aigc/image2video/face-detect", json=body)
    assert (status, answer["code"]) == (400, "InvalidParameter")
    status, answer = await roomy.call("POST", "/services/aigc/image2video/face-detect", data=b"{not json")
    assert (status, answer["code"]) == (400, "InvalidParameter")


async def test_rule_and_always_pass_detectors(http: aiohttp.ClientSession, files: str) -> None:
    """The OpenCV-free `rule` detector rejects near-uniform images and "noface" URLs; `always_pass` rejects none."""
    async with emulator(detector="rule") as emu:
        api = Api(http, emu)
        assert (await api.detect(f"{files}/portrait-0001.jpg"))[1]["output"]["pass"] is True
        assert (await api.detect(f"{files}/uniform.png"))[1]["output"]["pass"] is False
        assert (await api.detect(f"{files}/noface-0000.jpg"))[1]["output"]["pass"] is False
    async with emulator(detector="always_pass") as emu:
        api = Api(http, emu)
        assert (await api.detect(f"{files}/noface-0000.jpg"))[1]["output"]["pass"] is True


# --- submit and the task state machine ----------------------------------------------------------------------------


async def test_one_task_runs_at_a_time_in_submission_order(api: Api, files: str, emu: RunningEmulator) -> None:
    """§7: one RUNNING task per account, FIFO; §4: PENDING/RUNNING/SUCCEEDED payloads and timestamps."""
    audio = f"{files}/voice.wav"
    ids = [await api.submit_ok(f"{files}/portrait-000{i}.jpg", audio) for i in range(3)]
    assert [await api.status(t) for t in ids] == ["RUNNING", "PENDING", "PENDING"]
    pending = (await api.task(ids[1]))["output"]
    assert set(pending) == {"task_id", "task_status", "submit_time"}
    running = (await api.task(ids[0]))["output"]
    assert set(running) == {"task_id", "task_status", "submit_time", "scheduled_time"}
    assert "usage" not in await api.task(ids[0])

    emu.advance(STEP)
    assert [await api.status(t) for t in ids] == ["SUCCEEDED", "RUNNING", "PENDING"]
    done = await api.task(ids[0])
    out = done["output"]
    assert all(TIME_RE.match(out[k]) for k in ("submit_time", "scheduled_time", "end_time"))
    assert out["submit_time"] == "2026-01-01 08:00:00.000"  # ManualClock start, Beijing time
    assert out["scheduled_time"] == out["submit_time"]
    assert out["end_time"] == "2026-01-01 08:00:05.919"  # 3.946 s × 1.5
    assert set(out["results"]) == {"video_url"}
    assert done["usage"] == {"video_duration": 3.95, "video_ratio": "standard"}

    emu.advance(2 * STEP)
    assert [await api.status(t) for t in ids] == ["SUCCEEDED"] * 3
    runs = emu.stats().runs
    assert [r.task_id for r in runs] == ids
    assert all(a.end <= b.scheduled for a, b in itertools.pairwise(runs))
    assert all(math.isclose(r.run_s, RUN_S, rel_tol=1e-3) for r in runs)


async def test_submit_accepts_trailing_slash_mp3_and_edge_parameters(api: Api, files: str) -> None:
    """§3: the documented trailing-slash path, mp3 audio, and every parameter at its range edges."""
    params = {
        "template_id": "active",
        "eye_move_freq": 1,
        "video_fps": 30,
        "mouth_move_strength": 1.5,
        "paste_back": False,
        "head_move_strength": 0.0,
    }
    path = "/services/aigc/image2video/video-synthesis/"
    status, body = await api.submit(f"{files}/portrait-0002.jpg", f"{files}/voice.mp3", params, path=path)
    assert status == 200, body
    assert set(body) == {"output", "request_id"}


async def test_submit_validation_errors(roomy: Api, files: str) -> None:
    """§1/§3: missing async header is 403; out-of-range parameters, bad audio and bad image are 400 at submit."""
    image, audio = f"{files}/portrait-0001.jpg", f"{files}/voice.wav"
    status, body = await roomy.submit(image, audio, headers={"X-DashScope-Async": "disable"})
    assert (status, body["code"]) == (403, "AccessDenied")
    assert body["message"] == "current user api does not support synchronous calls."
    bad = {
        "template_id": "wild",
        "eye_move_freq": 1.1,
        "video_fps": 24.5,
        "mouth_move_strength": -0.1,
        "paste_back": "yes",
        "head_move_strength": True,
    }
    for name, value in bad.items():
        status, body = await roomy.submit(image, audio, {name: value})
        assert (status, body["code"]) == (400, "InvalidParameter"), name
        assert body["message"] == f"The type or value of {name} is out of definition."
    status, body = await roomy.submit(image, audio, {"video_fps": 14})
    assert body["message"] == "The type or value of video_fps is out of definition."
    audio_cases = {
        "short.wav": ("InvalidFile.AudioLengthError", "Audio length must be between 1s and 180s."),
        "long.wav": ("InvalidFile.AudioLengthError", "Audio length must be between 1s and 180s."),
        "text.wav": ("InvalidParameter.UnsupportedFileFormat", "Input files format not supported."),
    }
    for name, (code, message) in audio_cases.items():
        status, body = await roomy.submit(image, f"{files}/{name}")
        assert (status, body["code"], body["message"]) == (400, code, message), name
    status, body = await roomy.submit(f"{files}/wide.png", audio)
    assert (status, body["code"]) == (400, "InvalidImage.ImageSize")
    status, body = await roomy.submit(image, audio, model="liveportrait-detect")
    assert (status, body["code"]) == (404, "ModelNotFound")


async def test_unreachable_inputs_are_refused_at_submit(
    api: Api, emu: RunningEmulator, files: str, closed_port_url: str
) -> None:
    """§6: an image or audio URL the service cannot download is a synchronous 400 InputDownloadFailed; no task."""
    for image, audio in (
        (closed_port_url, f"{files}/voice.wav"),
        (f"{files}/portrait-0001.jpg", f"{files}/nowhere.wav"),
    ):
        status, body = await api.submit(image, audio)
        assert (status, body["code"], body["message"]) == (
            400,
            "InvalidParameter.InputDownloadFailed",
            "Failed to download input files.",
        )
        emu.advance(1.0)  # submit allows 5 per second
    assert emu.stats().tasks_by_status == {}


async def test_a_missing_face_is_found_later_and_fails_the_task(api: Api, files: str) -> None:
    """§3: a face-less image is accepted at submit and ends FAILED InvalidImage.NoHumanFace, without running."""
    no_face = await api.submit_ok(f"{files}/noface-coffee.jpg", f"{files}/voice.wav")
    body = await api.task(no_face)
    assert body["output"]["task_status"] == "FAILED"
    assert body["output"]["code"] == "InvalidImage.NoHumanFace"
    assert body["output"]["message"]
    assert body["output"]["scheduled_time"] == body["output"]["end_time"]  # never ran
    assert "usage" not in body


async def test_cancel_only_while_pending(api: Api, files: str, emu: RunningEmulator) -> None:
    """§5: cancel answers {request_id} for a PENDING task, which then reads CANCELED; anything else is 400."""
    running = await api.submit_ok(f"{files}/portrait-0001.jpg", f"{files}/voice.wav")
    pending = await api.submit_ok(f"{files}/portrait-0002.jpg", f"{files}/voice.wav")
    status, body = await api.cancel(pending)
    assert status == 200 and set(body) == {"request_id"}
    canceled = (await api.task(pending))["output"]
    assert canceled["task_status"] == "CANCELED" and "end_time" in canceled
    for task_id in (running, pending, str(uuid.uuid4())):
        status, body = await api.cancel(task_id)
        assert (status, body["code"]) == (400, "UnsupportedOperation")
    emu.advance(STEP)
    assert await api.status(running) == "SUCCEEDED"
    status, body = await api.cancel(running)
    assert status == 400
    assert emu.stats().tasks_by_status == {"SUCCEEDED": 1, "CANCELED": 1}


async def test_unknown_and_expired_tasks_read_unknown(api: Api, files: str, emu: RunningEmulator) -> None:
    """§4: an unknown id, and a task 24 h after creation, answer HTTP 200 UNKNOWN."""
    missing = str(uuid.uuid4())
    assert (await api.task(missing))["output"] == {"task_id": missing, "task_status": "UNKNOWN"}
    task_id = await api.submit_ok(f"{files}/portrait-0001.jpg", f"{files}/voice.wav")
    emu.advance(86_400 - 1)
    assert await api.status(task_id) == "SUCCEEDED"
    emu.advance(1)
    assert (await api.task(task_id))["output"] == {"task_id": task_id, "task_status": "UNKNOWN"}
    assert emu.stats().tasks_by_status == {"UNKNOWN": 1}


async def test_task_timeout(http: aiohttp.ClientSession, files: str) -> None:
    """§6: no result within task_timeout_s of submission → FAILED InternalError.Timeout (running or waiting)."""
    async with emulator(task_timeout_s=4.0) as emu:
        api = Api(http, emu)
        first = await api.submit_ok(f"{files}/portrait-0001.jpg", f"{files}/voice.wav")
        second = await api.submit_ok(f"{files}/portrait-0002.jpg", f"{files}/voice.wav")
        emu.advance(4.0)
        for task_id in (first, second):
            out = (await api.task(task_id))["output"]
            assert (out["task_status"], out["code"]) == ("FAILED", "InternalError.Timeout")
            assert out["end_time"] == "2026-01-01 08:00:04.000"
        assert "scheduled_time" not in out  # the second never left the queue
        assert [r.run_s for r in emu.stats().runs] == [4.0]


async def test_run_time_noise_is_seeded(http: aiohttp.ClientSession, files: str) -> None:
    """realtime_noise varies run times within ±noise, identically for the same seed."""
    run_times = []
    for _ in range(2):
        async with emulator(realtime_noise=0.2, instant=False) as emu:
            api = Api(http, emu)
            for i in range(3):
                await api.submit_ok(f"{files}/portrait-000{i}.jpg", f"{files}/voice.wav")
            emu.advance(3 * RUN_S * 1.2)
            run_times.append([r.run_s for r in emu.stats().runs])
    assert run_times[0] == run_times[1]
    assert len(set(run_times[0])) == 3
    assert all(0.8 * RUN_S <= r <= 1.2 * RUN_S for r in run_times[0])


async def test_real_clock_with_instant_tasks(http: aiohttp.ClientSession, files: str) -> None:
    """With the real clock and `instant`, a task is already SUCCEEDED when first queried."""
    settings = EmulatorSettings(api_keys=[KEY], speedup=1000.0, instant=True, video="stub")
    async with run_emulator(settings) as emu:
        api = Api(http, emu)
        before = emu.now()
        task_id = await api.submit_ok(f"{files}/portrait-0003.jpg", f"{files}/voice.wav")
        assert await api.status(task_id) == "SUCCEEDED"
        assert emu.now() > before


# --- list ---------------------------------------------------------------------------------------------------------


async def test_list_tasks(api: Api, files: str, emu: RunningEmulator) -> None:
    """§5: filters, paging, the 24 h window, epoch-ms times and the submit request id."""
    status, submitted = await api.submit(f"{files}/portrait-0001.jpg", f"{files}/voice.wav")
    first = submitted["output"]["task_id"]
    second = await api.submit_ok(f"{files}/portrait-0002.jpg", f"{files}/voice.wav")
    status, page = await api.list()
    assert status == 200
    assert (page["total"], page["total_page"], page["page_no"], page["page_size"]) == (2, 1, 1, 10)
    newest, oldest = page["data"]
    assert (newest["task_id"], oldest["task_id"]) == (second, first)
    assert oldest["request_id"] == submitted["request_id"]
    assert oldest["status"] == "RUNNING" and oldest["model_name"] == "liveportrait"
    assert oldest["gmt_create"] == 1_767_225_600_000 and oldest["start_time"] == 1_767_225_600_000
    assert "start_time" not in newest and "end_time" not in oldest
    emu.advance(STEP)
    status, page = await api.list(status="SUCCEEDED")
    assert [t["task_id"] for t in page["data"]] == [first]
    assert page["data"][0]["end_time"] == 1_767_225_600_000 + round(RUN_S * 1000)
    status, page = await api.list(task_id=second)
    assert [t["task_id"] for t in page["data"]] == [second]
    status, page = await api.list(page_size=1, page_no=2)
    assert (page["total"], page["total_page"], [t["task_id"] for t in page["data"]]) == (2, 2, [first])
    status, page = await api.list(start_time="20260101080000", end_time="20260101080000")
    assert page["total"] == 2
    status, page = await api.list(start_time="20251231070000")  # 24 h from 07:00 the day before
    assert page["total"] == 0
    status, page = await api.list(model_name="wanx")
    assert page["total"] == 0
    status, body = await api.list(start_time="20251230000000", end_time="20260101000000")
    assert (status, body["code"]) == (400, "InvalidParameter")
    status, body = await api.list(start_time="yesterday")
    assert status == 400


# --- quotas -------------------------------------------------------------------------------------------------------


async def test_more_than_five_submits_in_one_second_are_throttled(api: Api, files: str, emu: RunningEmulator) -> None:
    """§7: the 6th submit within one emulated second is 429 Throttling.RateQuota; a second later it passes."""
    answers = [await api.submit(f"{files}/portrait-0001.jpg", f"{files}/voice.wav") for _ in range(6)]
    assert [status for status, _ in answers] == [200] * 5 + [429]
    assert answers[-1][1]["code"] == "Throttling.RateQuota"
    assert answers[-1][1]["message"] == "Requests rate limit exceeded, please try again later."
    emu.advance(0.2)
    assert (await api.submit(f"{files}/portrait-0001.jpg", f"{files}/voice.wav"))[0] == 200
    stats = emu.stats()
    assert stats.throttled == {"submit": 1}
    assert list(stats.submissions_per_image.values()) == [6]  # the throttled one created no task


async def test_query_quota_is_shared_by_get_list_and_cancel(api: Api, emu: RunningEmulator) -> None:
    """§7: task get, list and cancel draw on one 20 QPS budget."""
    task_id = str(uuid.uuid4())
    for _ in range(10):
        await api.task(task_id)
    for _ in range(5):
        assert (await api.list())[0] == 200
    for _ in range(5):
        assert (await api.cancel(task_id))[0] == 400
    status, body = await api.list()
    assert (status, body["code"]) == (429, "Throttling.RateQuota")
    emu.advance(1.0)
    assert (await api.list())[0] == 200
    assert emu.stats().throttled == {"list": 1}


async def test_burst_protection(http: aiohttp.ClientSession) -> None:
    """A family may take ⌈qps/2⌉ requests in its first second, then at most double from second to second."""
    async with emulator(burst_protection=True) as emu:
        api = Api(http, emu)
        statuses = [(await api.list())[0] for _ in range(11)]
        assert statuses == [200] * 10 + [429]
        assert (await api.list())[1]["code"] == "Throttling.BurstRate"
        emu.advance(1.0)
        statuses = [(await api.list())[0] for _ in range(20)]
        assert statuses == [200] * 20


# --- results ------------------------------------------------------------------------------------------------------


async def test_result_is_a_playable_mp4_until_its_url_expires(api: Api, files: str, emu: RunningEmulator) -> None:
    """§4: the video_url serves a real H.264 + AAC MP4 with the audio's length, then 403 after 24 h."""
    import av

    task_id = await api.submit_ok(f"{files}/portrait-0004.jpg", f"{files}/voice.wav", parameters={"video_fps": 15})
    emu.advance(STEP)
    url = (await api.task(task_id))["output"]["results"]["video_url"]
    assert "Expires=" in url and "Signature=" in url
    status, data, response = await api.download(url)
    assert status == 200
    assert response.headers["Content-Type"] == "video/mp4"
    assert int(response.headers["Content-Length"]) == len(data)
    assert data[4:8] == b"ftyp"
    with av.open(io.BytesIO(data), mode="r") as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, audio.codec_context.name) == ("h264", "aac")
        assert max(video.width, video.height) <= 256 and video.width % 2 == 0 and video.height % 2 == 0
        assert video.average_rate == 15
        assert container.duration is not None
        assert abs(container.duration / 1_000_000 - VOICE_S) < 0.2
    again = await api.download(url)
    assert again[1] == data

    tampered = url.replace("Signature=", "Signature=0")
    status, body, _ = await api.download(tampered)
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body
    emu.advance(86_400)
    status, body, _ = await api.download(url)
    assert status == 403
    assert b"<Code>AccessDenied</Code>" in body and b"Request has expired." in body
    assert emu.stats().result_downloads == 2


async def test_stub_video_mode(http: aiohttp.ClientSession, files: str) -> None:
    """`video: stub` serves the one shipped MP4 for every task."""
    async with emulator(video="stub", instant=True) as emu:
        api = Api(http, emu)
        task_id = await api.submit_ok(f"{files}/portrait-0001.jpg", f"{files}/voice.wav")
        url = (await api.task(task_id))["output"]["results"]["video_url"]
        status, data, _ = await api.download(url)
    stub = resources.files("lpengine").joinpath("assets", "emulator-stub.mp4").read_bytes()
    assert status == 200 and data == stub and data[4:8] == b"ftyp"


# --- temporary uploads (§8) -----------------------------------------------------------------------------------------


async def test_temporary_upload_flow_and_misuse(api: Api, emu: RunningEmulator, media_dir: Path) -> None:
    """§8: getPolicy + form POST gives an oss:// URL bound to one model, usable only with the resolve header."""
    image = (media_dir / "portrait-0001.jpg").read_bytes()
    detect_policy = await api.policy("liveportrait-detect")
    assert detect_policy["upload_host"] == f"{emu.root_url}/_oss"
    assert detect_policy["expire_in_seconds"] == 300
    assert await api.upload(detect_policy, "face.jpg", image) == (200, "")
    oss_url = f"oss://{detect_policy['upload_dir']}/face.jpg"
    resolve = {"X-DashScope-OssResourceResolve": "enable"}

    status, body = await api.detect(oss_url, headers=resolve)
    assert (status, body["output"]["pass"]) == (200, True)
    status, body = await api.detect(oss_url)
    assert (status, body["code"]) == (400, "invalid_parameter_error")
    # Bound to liveportrait-detect: the video model cannot use it.
    status, body = await api.submit(oss_url, oss_url, headers=resolve)
    assert (status, body["code"]) == (400, "InvalidParameter.DataInspection")

    status, text = await api.upload(detect_policy, "face.jpg", image)
    assert status == 409 and "FileAlreadyExists" in text
    status, text = await api.upload(detect_policy, "x.jpg", image, key="elsewhere/x.jpg")
    assert status == 403 and "Policy Condition failed" in text
    status, text = await api.upload(detect_policy, "y.jpg", image, Signature="AAAA")
    assert status == 403 and "SignatureDoesNotMatch" in text

    video_policy = await api.policy("liveportrait")
    assert await api.upload(video_policy, "face.jpg", image) == (200, "")
    assert await api.upload(video_policy, "voice.wav", (media_dir / "voice.wav").read_bytes()) == (200, "")
    base = f"oss://{video_policy['upload_dir']}"
    task_id = await api.submit_ok(f"{base}/face.jpg", f"{base}/voice.wav", headers=resolve)
    emu.advance(STEP)
    assert await api.status(task_id) == "SUCCEEDED"

    emu.advance(301)
    status, text = await api.upload(video_policy, "late.jpg", image)
    assert status == 403 and "Invalid according to Policy: Policy expired." in text
    emu.advance(172_800)
    status, body = await api.detect(oss_url, headers=resolve)
    assert (status, body["code"]) == (400, "InvalidParameter.DataInspection")
    assert emu.stats().uploads == 3

    status, body = await api.call("GET", "/uploads", params={"action": "getPolicy", "model": "qwen-max"})
    assert (status, body["code"]) == (404, "ModelNotFound")


async def test_policy_quota_is_per_model(http: aiohttp.ClientSession) -> None:
    """§8: getPolicy has its own budget per model."""
    async with emulator(policy_qps=2.0) as emu:
        api = Api(http, emu)
        params = {"action": "getPolicy", "model": "liveportrait"}
        statuses = [(await api.call("GET", "/uploads", params=params))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        await api.policy("liveportrait-detect")


# --- faults ---------------------------------------------------------------------------------------------------------


async def test_fault_rules_on_tasks(api: Api, files: str, emu: RunningEmulator) -> None:
    """fail_task, unknown_task and expire_result rules shape the outcome of matching tasks only."""
    emu.set_faults(
        FaultSettings(
            rules=[
                FaultRule(match="taskfail", action="fail_task", code="InternalError.Algo"),
                FaultRule(match="vanish", action="unknown_task"),
                FaultRule(match="stale", action="expire_result"),
            ]
        )
    )
    audio = f"{files}/voice.wav"
    failing = await api.submit_ok(f"{files}/portrait-0001.jpg?taskfail", audio)
    vanishing = await api.submit_ok(f"{files}/portrait-0002.jpg?vanish", audio)
    stale = await api.submit_ok(f"{files}/portrait-0003.jpg?stale", audio)
    fine = await api.submit_ok(f"{files}/portrait-0004.jpg", audio)
    emu.advance(STEP)
    out = (await api.task(failing))["output"]
    assert (out["task_status"], out["code"]) == ("FAILED", "InternalError.Algo")
    assert out["message"] == "An internal error has occured during algorithm execution."
    assert await api.status(vanishing) == "RUNNING"
    emu.advance(STEP)
    assert await api.status(vanishing) == "UNKNOWN"
    emu.advance(2 * STEP)
    for task_id, expected in ((stale, 403), (fine, 200)):
        url = (await api.task(task_id))["output"]["results"]["video_url"]
        assert (await api.download(url))[0] == expected
    stats = emu.stats()
    assert stats.faults == {"fail_task": 1, "unknown_task": 1, "expire_result": 1}
    assert [r.status for r in stats.runs] == ["FAILED", "UNKNOWN", "SUCCEEDED", "SUCCEEDED"]


async def test_fault_rules_on_requests(api: Api, files: str, emu: RunningEmulator) -> None:
    """error (with `times`), drop, lose_submit_response and detect_fail rules."""
    emu.set_faults(
        FaultSettings(
            rules=[
                FaultRule(match="flaky", action="error", code="ModelUnavailable", endpoint="detect", times=1),
                FaultRule(match="blind", action="detect_fail"),
                FaultRule(match="cut", action="drop", endpoint="task"),
                FaultRule(match="lost", action="lose_submit_response"),
            ]
        )
    )
    status, body = await api.detect(f"{files}/portrait-0001.jpg?flaky")
    assert (status, body["code"]) == (503, "ModelUnavailable")
    assert (await api.detect(f"{files}/portrait-0001.jpg?flaky"))[0] == 200
    assert (await api.detect(f"{files}/portrait-0001.jpg?blind"))[1]["output"]["pass"] is False

    with pytest.raises(aiohttp.ClientConnectionError):
        await api.submit(f"{files}/portrait-0002.jpg?lost", f"{files}/voice.wav")
    status, page = await api.list()
    assert page["total"] == 1  # the lost submit did create a task
    lost = page["data"][0]["task_id"]
    assert await api.status(lost) == "RUNNING"

    cut = await api.submit_ok(f"{files}/portrait-0003.jpg?cut", f"{files}/voice.wav")
    with pytest.raises(aiohttp.ClientConnectionError):
        await api.task(cut)
    faults = emu.stats().faults
    # aiohttp resends an idempotent GET once when a reused connection drops, hence "at least one" drop.
    assert faults.pop("drop") >= 1
    assert faults == {"error": 1, "detect_fail": 1, "lose_submit_response": 1}


async def test_download_faults(api: Api, files: str, emu: RunningEmulator) -> None:
    """truncate_download cuts the body short of its Content-Length; corrupt_download damages the ftyp box."""
    emu.set_faults(
        FaultSettings(
            rules=[
                FaultRule(match="trunc", action="truncate_download", times=1),
                FaultRule(match="rot", action="corrupt_download"),
            ]
        )
    )
    truncated = await api.submit_ok(f"{files}/portrait-0001.jpg?trunc", f"{files}/voice.wav")
    corrupted = await api.submit_ok(f"{files}/portrait-0002.jpg?rot", f"{files}/voice.wav")
    emu.advance(2 * STEP)
    url = (await api.task(truncated))["output"]["results"]["video_url"]
    with pytest.raises(aiohttp.ClientPayloadError):
        await api.download(url)
    status, data, _ = await api.download(url)  # `times=1`: the retry gets everything
    assert status == 200 and data[4:8] == b"ftyp"
    url = (await api.task(corrupted))["output"]["results"]["video_url"]
    status, data, response = await api.download(url)
    assert status == 200 and int(response.headers["Content-Length"]) == len(data)
    assert data[4:8] != b"ftyp"


async def test_random_faults_are_seeded(http: aiohttp.ClientSession) -> None:
    """Random error and drop rates draw from a seeded RNG: the same seed gives the same sequence."""
    faults = FaultSettings(error_rate={"list": 0.5}, error_codes=["InternalError", "ModelUnavailable"], seed=7)
    sequences = []
    for _ in range(2):
        async with emulator(faults=faults) as emu:
            api = Api(http, emu)
            sequences.append([(await api.list())[0] for _ in range(12)])
            emu.set_faults(FaultSettings(drop_rate={"list": 1.0}))
            with pytest.raises(aiohttp.ClientConnectionError):
                await api.list()
    assert sequences[0] == sequences[1]
    assert set(sequences[0]) == {200, 500, 503}


async def test_random_task_faults(api: Api, files: str, emu: RunningEmulator) -> None:
    """task_failure_rate and unknown_task_rate apply to tasks submitted after `set_faults`."""
    emu.set_faults(FaultSettings(task_failure_rate=1.0, task_failure_codes=["DataInspectionFailed"]))
    failed = await api.submit_ok(f"{files}/portrait-0001.jpg", f"{files}/voice.wav")
    emu.set_faults(FaultSettings(unknown_task_rate=1.0))
    vanished = await api.submit_ok(f"{files}/portrait-0002.jpg", f"{files}/voice.wav")
    emu.advance(2 * STEP)
    assert (await api.task(failed))["output"]["code"] == "DataInspectionFailed"
    assert await api.status(vanished) == "UNKNOWN"


def test_fault_settings_are_validated() -> None:
    """Unknown codes and knobs that would do nothing are refused at construction."""
    with pytest.raises(ValueError, match="unknown error code"):
        FaultSettings(error_codes=["NoSuchCode"])
    with pytest.raises(ValueError, match="has no effect"):
        FaultRule(match="x", action="drop", code="InternalError")
    with pytest.raises(ValueError, match="has no effect"):
        FaultRule(match="x", action="fail_task", endpoint="task")
    with pytest.raises(ValueError, match="extra"):
        EmulatorSettings.model_validate({"spedup": 2})
    with pytest.raises(ValueError, match="task_retention_s"):
        EmulatorSettings(task_retention_s=60)


# --- statistics and controls ------------------------------------------------------------------------------------------


async def test_stats_track_runner_time_and_idle_gaps(
    api: Api, files: str, emu: RunningEmulator, media_dir: Path
) -> None:
    """Busy and idle runner time, idle gaps, runs and per-image submissions are in emulated seconds."""
    await api.submit_ok(f"{files}/portrait-0001.jpg", f"{files}/voice.wav")
    emu.advance(RUN_S + 10.0)  # the runner idles 10 s
    await api.submit_ok(f"{files}/portrait-0001.jpg", f"{files}/voice.wav")
    emu.advance(STEP)
    stats = emu.stats()
    assert stats.submissions_per_image == {sha(media_dir, "portrait-0001.jpg"): 2}
    assert math.isclose(stats.runner_busy_s, 2 * RUN_S, rel_tol=1e-6)
    assert len(stats.idle_gaps) == 1 and math.isclose(stats.idle_gaps[0], 10.0, abs_tol=1e-6)
    assert math.isclose(stats.runner_idle_s, 10.0, abs_tol=1e-6)
    assert [r.audio_duration for r in stats.runs] == [VOICE_S, VOICE_S]
    assert stats.requests == {"submit": 2}
    emu.reset()
    assert emu.stats().runs == [] and emu.stats().requests == {}


async def test_http_controls(http: aiohttp.ClientSession, emu: RunningEmulator, api: Api) -> None:
    """/_emulator/stats, faults, advance and reset do over HTTP what the in-process handle does."""
    root = emu.root_url
    async with http.put(f"{root}/_emulator/faults", json={"error_rate": {"list": 1.0}}) as r:
        assert r.status == 200
    assert (await api.list())[0] in (429, 500, 503)
    async with http.put(f"{root}/_emulator/faults", json={"error_rate": {"list": 2}}) as r:
        assert r.status == 400
    async with http.put(f"{root}/_emulator/faults", json={}) as r:
        assert r.status == 200
    before = emu.now()
    async with http.post(f"{root}/_emulator/advance", json={"seconds": 60}) as r:
        assert r.status == 200 and (await r.json())["now"] == before + 60
    async with http.post(f"{root}/_emulator/advance", json={"seconds": -1}) as r:
        assert r.status == 400
    async with http.get(f"{root}/_emulator/stats") as r:
        stats = await r.json()
    assert stats["requests"] == {"list": 1}
    async with http.post(f"{root}/_emulator/reset") as r:
        assert r.status == 200
    assert emu.stats().requests == {}


async def test_module_entry_point_prints_the_base_url(tmp_path: Path) -> None:
    """`python -m lpengine.emulator` prints `DashScope emulator: <base_url>` and serves until stopped."""
    (tmp_path / "settings.json").write_text('{"api_keys": ["sk-cli"], "video": "stub"}')
    command = [sys.executable, "-m", "lpengine.emulator", "--settings", str(tmp_path / "settings.json")]
    async with await anyio.open_process(command) as process:
        assert process.stdout is not None
        try:
            with anyio.fail_after(30):
                line = (await process.stdout.receive()).decode()
            assert line.startswith("DashScope emulator: http://127.0.0.1:")
            base_url = line.split()[-1]
            async with aiohttp.ClientSession() as session:
                headers = {"Authorization": "Bearer sk-cli"}
                async with session.get(f"{base_url}/tasks", headers=headers) as r:
                    assert r.status == 200
        finally:
            process.terminate()
            await process.wait()


def test_demo_assets_are_idempotent_and_distinct(tmp_path: Path) -> None:
    """Demo assets are rewritten only when different; generated portraits all have distinct hashes."""
    dest = ensure_demo_assets(tmp_path / "demo", count=4)
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["astronaut.png", "noface-coffee.jpg", "portrait-01.jpg", "portrait-02.jpg", "portrait-03.jpg"]
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    ensure_demo_assets(tmp_path / "demo", count=4)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    portraits = make_portraits(tmp_path / "many", 50)
    faces = make_portraits(tmp_path / "none", 3, faces=False)
    assert len({hashlib.sha256(p.read_bytes()).digest() for p in portraits}) == 50
    assert all(p.name.startswith("noface-") for p in faces)


async def test_works_without_the_emulator_extra(
    http: aiohttp.ClientSession, files: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without OpenCV/PyAV/numpy, `auto` detection falls back to `rule` and `real` video to the shipped stub."""
    for module in ("cv2", "av", "numpy", "skimage"):
        monkeypatch.setitem(sys.modules, module, None)
    async with emulator(instant=True) as emu:
        api = Api(http, emu)
        assert (await api.detect(f"{files}/uniform.png"))[1]["output"]["pass"] is False
        assert (await api.detect(f"{files}/noface-0000.jpg"))[1]["output"]["pass"] is False
        task_id = await api.submit_ok(f"{files}/portrait-0001.jpg", f"{files}/voice.wav")
        url = (await api.task(task_id))["output"]["results"]["video_url"]
        status, data, _ = await api.download(url)
    assert status == 200
    assert data == resources.files("lpengine").joinpath("assets", "emulator-stub.mp4").read_bytes()
    with pytest.raises(RuntimeError, match=r"pip install 'lpengine\[emulator\]'"):
        make_portraits(tmp_path, 1)
