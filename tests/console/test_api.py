"""The console's JSON API over real HTTP: every endpoint, the token and origin checks, and hostile uploads."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, ManualClock, run_emulator
from lpengine.errors import ConfigError
from lpengine.web import Console, ConsoleSettings, open_console
from tests.console.conftest import PORTRAITS, TOKEN, VOICE, settings

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _root(console: Console) -> str:
    return console.url.split("/?")[0]


@pytest.fixture
async def http(console: Console) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(_root(console), headers=AUTH) as session:
        yield session


def _form(images: list[tuple[str, bytes]], audio: bytes | None = None, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, data in images:
        form.add_field("images", data, filename=name, content_type="image/jpeg")
    if audio is not None:
        form.add_field("audio", audio, filename="voice.wav", content_type="audio/wav")
    for key, value in fields.items():
        form.add_field(key, value)
    return form


class _Raw:
    """A multipart body written by hand: aiohttp's own FormData would percent-encode a hostile file name."""

    def __init__(self, parts: list[tuple[str, str, bytes]]) -> None:
        self.boundary = "lpengine-test-boundary"
        chunks = []
        for field, name, data in parts:
            chunks.append(
                f'--{self.boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode()
                + data
                + b"\r\n"
            )
        self.body = b"".join(chunks) + f"--{self.boundary}--\r\n".encode()


def _raw_multipart(images: list[tuple[str, bytes]], audio: bytes) -> Any:
    raw = _Raw([*(("images", n, d) for n, d in images), ("audio", "voice.wav", audio)])
    return aiohttp.BytesPayload(raw.body, content_type=f"multipart/form-data; boundary={raw.boundary}")


def _photos(n: int = 2) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in PORTRAITS[:n]]


async def _until(console: Console, bid: str, states: set[str]) -> dict[str, Any]:
    """Wait on the manager's change notifications (no sleeps) until the batch is in one of `states`."""
    with anyio.fail_after(60):
        while True:
            summary = await console.manager.summary(bid, items=False)
            if summary["state"] in states:
                return summary
            await console.manager.wait_changed(5)


async def _create(http: aiohttp.ClientSession, n: int = 2, **fields: str) -> str:
    async with http.post("/api/batches", data=_form(_photos(n), VOICE.read_bytes(), **fields)) as rsp:
        body = await rsp.json()
        assert rsp.status == 201, body
        return str(body["id"])


async def test_batch_lifecycle_endpoints(console: Console, http: aiohttp.ClientSession) -> None:
    bid = await _create(http, preset="calm", params=json.dumps({"eye_move_freq": 0.2}))
    await _until(console, bid, {"done"})

    async with http.get("/api/batches") as rsp:
        listed = await rsp.json()
    assert [b["id"] for b in listed["batches"]] == [bid]

    async with http.get(f"/api/batches/{bid}") as rsp:
        one = await rsp.json()
    assert {"id", "state", "counts", "cost", "items"} <= one.keys()
    assert one["state"] == "done" and one["counts"]["succeeded"] == 2
    assert one["params"]["template_id"] == "calm" and one["params"]["eye_move_freq"] == 0.2
    assert one["cost"]["spent_cny"] > 0
    for item in one["items"]:
        assert {"name", "status", "error", "video_url", "verdict", "flags"} <= item.keys()
        assert item["status"] == "succeeded"

    url = one["items"][0]["video_url"]
    async with http.get(url) as rsp:
        data = await rsp.read()
        assert rsp.status == 200 and rsp.content_type == "video/mp4"
    assert data[4:8] == b"ftyp"
    async with http.get(url, headers={"Range": "bytes=0-99"}) as rsp:  # seeking in <video> needs ranges
        assert rsp.status == 206 and len(await rsp.read()) == 100

    async with http.get(f"/api/batches/{bid}/videos.zip") as rsp:
        archive = zipfile.ZipFile(io.BytesIO(await rsp.read()))
    assert sorted(archive.namelist()) == sorted(i["video_url"].rsplit("/", 1)[1] for i in one["items"])
    assert archive.testzip() is None

    async with http.get(f"/api/batches/{bid}/events") as rsp:
        assert rsp.content_type == "text/event-stream"
        line = b""
        while not line.startswith(b"data:"):
            line = await rsp.content.readline()
    assert json.loads(line[5:])["summary"]["state"] == "done"

    async with http.post(f"/api/batches/{bid}/retry") as rsp:  # a finished batch re-runs and pays nothing
        assert rsp.status == 200
    done = await _until(console, bid, {"done"})
    assert done["cost"]["spent_cny"] == one["cost"]["spent_cny"]
    assert console.emulator is not None
    assert all(n == 1 for n in console.emulator.stats().submissions_per_image.values())  # type: ignore[attr-defined]


async def _stopped_mid_run(console: Console, http: aiohttp.ClientSession, n: int, action: str) -> tuple[str, Any]:
    """A batch held mid-run by the emulator (every API call hangs), then paused or cancelled through the API."""
    emulator: Any = console.emulator
    emulator.set_faults(FaultSettings(latency_s=60))
    bid = await _create(http, n=n)
    await _until(console, bid, {"running"})
    async with http.post(f"/api/batches/{bid}/{action}") as rsp:
        assert rsp.status == 200
    emulator.set_faults(FaultSettings())
    return bid, await _until(console, bid, {"cancelled" if action == "cancel" else "paused"})


async def test_cancel_mid_run(console: Console, http: aiohttp.ClientSession) -> None:
    _bid, cancelled = await _stopped_mid_run(console, http, 3, "cancel")
    assert cancelled["counts"]["succeeded"] == 0
    assert console.emulator.stats().tasks_by_status.get("SUCCEEDED", 0) == 0  # type: ignore[attr-defined]


async def test_unknown_batch_and_escaping_video_names(console: Console, http: aiohttp.ClientSession) -> None:
    async with http.get("/api/batches/nope") as rsp:
        assert rsp.status == 404
    async with http.post("/api/batches/../../etc/cancel") as rsp:
        assert rsp.status == 404
    bid = await _create(http, n=1)
    await _until(console, bid, {"done"})
    for name in ("..%2Fbatch.yaml", "..%2F..%2Fconsole.json", "%2Fetc%2Fpasswd", "batch.yaml", "x.mp4"):
        async with http.get(f"/api/batches/{bid}/videos/{name}") as rsp:
            assert rsp.status == 404, name


async def test_token_required(console: Console) -> None:
    root = _root(console)
    async with aiohttp.ClientSession(root) as anon:
        for path in ("/", "/batches", "/api/batches", "/static/console.js"):
            async with anon.get(path) as rsp:
                assert rsp.status == 401, path
        async with anon.get("/api/batches", headers={"Authorization": "Bearer wrong"}) as rsp:
            assert rsp.status == 401
        async with anon.post("/api/batches", data=_form(_photos(1), VOICE.read_bytes())) as rsp:
            assert rsp.status == 401
    assert not any((console.manager.workspace).glob("2*"))


async def test_first_visit_sets_a_strict_httponly_cookie(console: Console) -> None:
    jar = aiohttp.CookieJar(unsafe=True)  # the console's address is an IP, which the default jar refuses
    async with aiohttp.ClientSession(_root(console), cookie_jar=jar) as browser:
        async with browser.get(f"/?token={TOKEN}", allow_redirects=False) as rsp:
            assert rsp.status == 303 and rsp.headers["Location"] == "/"
            cookie = rsp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        async with browser.get("/batches") as rsp:  # the cookie now opens every page
            assert rsp.status == 200
        async with browser.get(f"/?token={TOKEN}x", allow_redirects=False) as rsp:
            assert rsp.status != 303


async def test_cross_site_post_refused(console: Console) -> None:
    root = _root(console)
    async with aiohttp.ClientSession(root, cookies={"lpengine_console": TOKEN}) as browser:
        form = _form(_photos(1), VOICE.read_bytes())
        async with browser.post("/api/batches", data=form, headers={"Origin": "http://evil.example"}) as rsp:
            assert rsp.status == 403
        async with browser.post("/api/batches", data=_form(_photos(1), VOICE.read_bytes())) as rsp:
            assert rsp.status == 403  # no Origin at all: not provably same-site
        same_site = {"Origin": root}
        async with browser.post("/api/batches", data=_form(_photos(1), VOICE.read_bytes()), headers=same_site) as rsp:
            assert rsp.status == 201


async def test_dns_rebinding_host_refused(console: Console) -> None:
    async with aiohttp.ClientSession(_root(console), headers=AUTH) as http:
        async with http.get("/api/batches", headers={"Host": "attacker.example:8710"}) as rsp:
            assert rsp.status == 403
        async with http.get("/api/batches", headers={"Host": "localhost"}) as rsp:
            assert rsp.status == 200


async def test_non_loopback_needs_an_explicit_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LPENGINE_CONSOLE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="LPENGINE_CONSOLE_TOKEN"):
        async with open_console(ConsoleSettings(demo=True, host="0.0.0.0", port=0, workspace=tmp_path)):
            pass


async def test_env_token_fixes_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LPENGINE_CONSOLE_TOKEN", "from-the-environment-123456")
    async with open_console(settings(tmp_path, token=None)) as console:
        assert console.url.endswith("?token=from-the-environment-123456")


async def test_hostile_uploads(console: Console, http: aiohttp.ClientSession) -> None:
    good = _photos(1)
    big = b"\xff\xd8\xff\xe0" + b"\0" * (12 * 1024 * 1024)
    hostile = [*good, ("big.jpg", big), ("notes.jpg", b"just some text, not a photo\n")]
    hostile += [("../../escape.jpg", good[0][1]), ("sub/escape.jpg", good[0][1])]
    async with http.post("/api/batches", data=_raw_multipart(hostile, VOICE.read_bytes())) as rsp:
        body = await rsp.json()
        assert rsp.status == 400
    problems = {f["name"]: f["problem"] for f in body["files"]}
    assert set(problems) == {"big.jpg", "notes.jpg", "../../escape.jpg", "sub/escape.jpg"}
    assert "too large" in problems["big.jpg"]
    assert "not an image" in problems["notes.jpg"]
    assert all("file name" in problems[n] for n in ("../../escape.jpg", "sub/escape.jpg"))
    assert body["error"]
    ws = console.manager.workspace
    assert not list(ws.parent.rglob("escape.jpg"))
    assert not [p for p in ws.glob("*") if p.name != ".incoming"] and not any((ws / ".incoming").iterdir())

    many = [(f"p{i:04}.jpg", b"x") for i in range(1000)]
    async with http.post("/api/batches", data=_form(many, VOICE.read_bytes())) as rsp:
        body = await rsp.json()
        assert rsp.status == 400
    assert "too many photos" in body["error"]

    async with http.post("/api/batches", data=_form(good, VOICE.read_bytes(), params='{"video_fps": 60}')) as rsp:
        body = await rsp.json()
        assert rsp.status == 400 and "video_fps" in body["error"]
    async with http.post("/api/batches", data=_form(good, None)) as rsp:
        body = await rsp.json()
        assert rsp.status == 400 and any(f["name"] == "audio" for f in body["files"])
    assert console.emulator is not None
    assert sum(console.emulator.stats().requests.values()) == 0  # type: ignore[attr-defined]  # nothing paid


async def test_estimate_lists_problems_and_cost(http: aiohttp.ClientSession) -> None:
    files = [*_photos(2), ("broken.jpg", PORTRAITS[0].read_bytes()[:2000])]
    async with http.post("/api/estimate", data=_form(files, VOICE.read_bytes())) as rsp:
        body = await rsp.json()
        assert rsp.status == 200
    assert [f["name"] for f in body["files"]] == ["broken.jpg"]
    estimate = body["estimate"]
    assert estimate["images"] == 2 and estimate["calls"] == 4
    assert estimate["video_seconds"] > 0 and estimate["cost_cny"] > 0


async def test_pages_never_show_the_api_key(console: Console, http: aiohttp.ClientSession) -> None:
    bid = await _create(http, n=1)
    await _until(console, bid, {"done"})
    key = "sk-emulator-"
    for path in ("/", "/batches", f"/batches/{bid}", f"/batches/{bid}/gallery", "/api/batches", f"/api/batches/{bid}"):
        async with http.get(path) as rsp:
            assert rsp.status == 200, path
            assert key not in await rsp.text(), path


async def test_console_batch_is_an_ordinary_batch_for_the_cli(console: Console, http: aiohttp.ClientSession) -> None:
    """`lpengine run` on the batch.yaml the console wrote resumes it: here, finished, so it pays nothing again."""
    bid = await _create(http, n=2)
    await _until(console, bid, {"done"})
    config = console.manager.workspace / bid / "batch.yaml"
    result = await anyio.run_process(
        [sys.executable, "-m", "lpengine", "run", str(config), "--log-format", "json"], check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout.decode().splitlines()[-1])
    assert summary["counts"] == {"succeeded": 2}
    assert summary["api_requests"].get("detect", 0) == summary["api_requests"].get("submit", 0) == 0
    async with http.get(f"/api/batches/{bid}") as rsp:
        assert (await rsp.json())["counts"]["succeeded"] == 2


async def test_a_batch_paused_in_the_console_is_finished_by_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One account, one state store, two ways in: a (non-demo) console submits both tasks and is paused while the
    service still runs them; the CLI resumes the batch, collects the two tasks without submitting again, and the
    console then shows the batch done from the CLI's work. (A demo console has no service to share: the CLI
    would start an emulator of its own.)"""
    key = "sk-test-console-cli-0123456789"
    monkeypatch.setenv("DASHSCOPE_API_KEY", key)
    quick = {"detect_qps": 1000.0, "submit_qps": 1000.0, "query_qps": 1000.0}
    service = EmulatorSettings(api_keys=[key], video="stub", detector="rule", **quick)  # type: ignore[arg-type]
    async with run_emulator(service, clock=ManualClock()) as emulator:  # its tasks run only when the test says
        base = tmp_path / "base.yaml"
        base.write_text(
            f"inputs: {{images: photos}}\naudio: voice.wav\napi: {{base_url: '{emulator.base_url}', speedup: 200}}\n"
            "storage: {backend: dashscope_temp}\n"
        )
        async with (
            open_console(settings(tmp_path, demo=False, config=base)) as console,
            aiohttp.ClientSession(_root(console), headers=AUTH) as http,
        ):
            bid = await _create(http, n=2)
            async with http.get(f"/api/batches/{bid}/events") as rsp:  # until both tasks are at the service
                stages: dict[str, Any] = {}
                while (stages.get("submit") or {}).get("done") != 2:
                    line = await rsp.content.readline()
                    if line.startswith(b"data:"):
                        stages = json.loads(line[5:])["summary"]["counts"]["stages"] or {}
            async with http.post(f"/api/batches/{bid}/pause") as rsp:
                assert rsp.status == 200
            await _until(console, bid, {"paused"})
            assert emulator.stats().requests["submit"] == 2
            emulator.advance(3600)  # both tasks finish while nobody watches
            config = console.manager.workspace / bid / "batch.yaml"
            result = await anyio.run_process(
                [sys.executable, "-m", "lpengine", "run", str(config), "--log-format", "json"], check=False
            )
            async with http.get(f"/api/batches/{bid}") as rsp:
                shown = await rsp.json()
        stats = emulator.stats()
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout.decode().splitlines()[-1])["counts"] == {"succeeded": 2}
    assert stats.requests["submit"] == 2 and set(stats.submissions_per_image.values()) == {1}
    assert shown["counts"]["succeeded"] == 2
    assert all(item["status"] == "succeeded" and item["video_url"] for item in shown["items"])
    # the event stream closed early (a closed tab): the next write finds the socket gone, which is no server error
    assert not [record for record in caplog.records if record.name == "aiohttp.server"]


async def test_pause_then_resume_finishes_without_paying_twice(console: Console, http: aiohttp.ClientSession) -> None:
    emulator: Any = console.emulator
    bid, paused = await _stopped_mid_run(console, http, 2, "pause")
    assert paused["cost"]["projected_remaining_cny"] > 0  # still to spend: it is only paused
    async with http.post(f"/api/batches/{bid}/resume") as rsp:
        assert rsp.status == 200
    done = await _until(console, bid, {"done"})
    assert done["counts"]["succeeded"] == 2 and done["cost"]["projected_remaining_cny"] == 0
    assert set(emulator.stats().submissions_per_image.values()) == {1}


async def test_history_survives_a_console_restart(tmp_path: Path) -> None:
    async with open_console(settings(tmp_path)) as first, aiohttp.ClientSession(_root(first), headers=AUTH) as http:
        bid = await _create(http, n=1)
        before = await _until(first, bid, {"done"})
    async with open_console(settings(tmp_path)) as second, aiohttp.ClientSession(_root(second), headers=AUTH) as http:
        async with http.get("/api/batches") as rsp:
            listed = (await rsp.json())["batches"]
        async with http.get(f"/api/batches/{bid}") as rsp:
            again = await rsp.json()
    assert [b["id"] for b in listed] == [bid]
    assert again["state"] == "done" and again["counts"]["succeeded"] == 1
    assert again["cost"]["spent_cny"] == before["cost"]["spent_cny"]
    assert again["items"][0]["video_url"]


async def test_named_presets_are_offered_and_resolved(console: Console, http: aiohttp.ClientSession) -> None:
    presets = console.manager.presets
    assert {"normal", "calm", "active", "news-anchor"} <= set(presets)
    async with http.get("/") as rsp:
        assert '<option value="news-anchor">' in await rsp.text()
    bid = await _create(http, n=1, preset="news-anchor", params=json.dumps({"video_fps": 25}))
    async with http.get(f"/api/batches/{bid}") as rsp:
        params = (await rsp.json())["params"]
    assert params["video_fps"] == 25  # the adjustment wins over the preset
    assert all(params[k] == v for k, v in presets["news-anchor"].items() if k != "video_fps")
    await _until(console, bid, {"done"})


async def test_redo_bad_shows_its_cost_first_and_pays_once_confirmed(
    console: Console, http: aiohttp.ClientSession
) -> None:
    emulator: Any = console.emulator
    emulator.set_faults(FaultSettings(rules=[FaultRule(match="", action="defect", defect="frozen", times=1)]))
    bid = await _create(http, n=2)
    await _until(console, bid, {"done"})

    def paid() -> tuple[int, int]:
        stats = emulator.stats()
        return sum(stats.detect_per_image.values()), sum(stats.submissions_per_image.values())

    async with http.get(f"/api/batches/{bid}") as rsp:
        assert sorted(i["verdict"] for i in (await rsp.json())["items"]) == ["bad", "ok"]
    assert paid() == (2, 2)

    async with http.get(f"/api/batches/{bid}/redo-bad") as rsp:
        estimate = await rsp.json()
    assert rsp.status == 200 and estimate["items"] == 1 and estimate["resuming"] == 0
    assert estimate["video_seconds"] == pytest.approx(3.946, abs=0.01)
    assert estimate["cost_cny"] == estimate["run_cost_cny"] == pytest.approx(3.946 * 0.02, abs=1e-3)

    async with http.post(f"/api/batches/{bid}/redo-bad") as rsp:  # no confirmation at all
        assert rsp.status == 400
    async with http.post(f"/api/batches/{bid}/redo-bad", json={"confirm": "another-selection"}) as rsp:
        refused = await rsp.json()
        assert rsp.status == 409 and refused["confirm"] == estimate["confirm"]  # what to look at now
    async with aiohttp.ClientSession(_root(console), cookies={"lpengine_console": TOKEN}) as browser:
        cross_site = {"Origin": "http://evil.example"}
        async with browser.post(f"/api/batches/{bid}/redo-bad", json=estimate, headers=cross_site) as rsp:
            assert rsp.status == 403
    assert paid() == (2, 2) and console.manager.meta(bid)["state"] == "done"

    # queued, then cancelled before it ran: the redo is withdrawn with it, and Resume alone pays nothing again
    assert (await console.manager.redo_bad(bid, estimate["confirm"]))[0]
    assert console.manager.cancel(bid) == "cancelled"
    console.manager.resume(bid)
    await _until(console, bid, {"done"})
    assert paid() == (2, 2)

    async with http.post(f"/api/batches/{bid}/redo-bad", json={"confirm": estimate["confirm"]}) as rsp:
        accepted = await rsp.json()
    assert rsp.status == 202 and accepted["state"] == "queued" and accepted["items"] == 1
    done = await _until(console, bid, {"done", "failed"})
    assert done["state"] == "done", done["error"]
    assert paid() == (2, 3)  # one task more, no face check
    async with http.get(f"/api/batches/{bid}") as rsp:
        assert [i["verdict"] for i in (await rsp.json())["items"]] == ["ok", "ok"]

    async with http.get(f"/api/batches/{bid}/redo-bad") as rsp:  # nothing bad any more: nothing to pay
        again = await rsp.json()
    assert (again["items"], again["cost_cny"], again["message"]) == (0, 0.0, "no video is judged bad: nothing to redo")
    async with http.post(f"/api/batches/{bid}/redo-bad", json={"confirm": again["confirm"]}) as rsp:
        assert rsp.status == 409
    assert paid() == (2, 3)
