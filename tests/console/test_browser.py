"""The console in a real Chromium: the whole flow a person follows, and the screenshots in docs/console.md."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from lpengine.emulator import FaultRule, FaultSettings
from lpengine.web import Console
from tests.console.conftest import ASSETS, PORTRAITS, VOICE

DOC_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
SHOTS_ENV = "LPENGINE_DOC_SHOTS"
"""Set it to 1 to refresh the screenshots in docs/console/ (otherwise they go to the test's tmp folder, so a test
run leaves the checkout clean)."""
TIMEOUT_MS = 60_000


def _drop_voice_track(page: Page) -> None:
    """Drag and drop, as a person does it: a `drop` event carrying the file, on the drop zone."""
    page.evaluate(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "audio/wav" }));
            const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true });
            document.querySelector("#drop").dispatchEvent(drop);
        }""",
        [VOICE.name, base64.b64encode(VOICE.read_bytes()).decode()],
    )


def _shot(page: Page, name: str, folder: Path) -> None:
    if os.environ.get(SHOTS_ENV) == "1":
        folder = DOC_SHOTS
    folder.mkdir(exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    assert (folder / f"{name}.png").stat().st_size > 10_000  # a real page, not a blank one


def test_upload_watch_play_review_cancel(threaded_console: Console, page: Page, tmp_path: Path) -> None:
    console: Any = threaded_console
    page.set_default_timeout(TIMEOUT_MS)
    page.set_viewport_size({"width": 1200, "height": 900})
    page.goto(console.url)
    expect(page).to_have_url(re.compile(r"/$"))  # the token moved into the cookie

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(PORTRAITS[0].read_bytes()[:3000])
    page.set_input_files("#images", [str(PORTRAITS[0]), str(ASSETS / "portraits" / "noface-coffee.jpg"), str(broken)])
    _drop_voice_track(page)
    expect(page.locator("#files li.bad")).to_have_count(1)
    expect(page.locator("#files li.bad")).to_contain_text("broken.jpg")
    expect(page.locator("#estimate")).to_contain_text("2 photo(s)")
    expect(page.locator("#estimate")).to_contain_text("CNY")
    expect(page.locator("#start")).to_be_enabled()
    page.select_option("#preset", "calm")
    expect(page.locator("#start")).to_be_enabled()
    _shot(page, "new-batch", tmp_path)

    # the one video comes back defective, so that Redo bad has something to make again
    frozen = FaultRule(match="", action="defect", defect="frozen", times=1)
    console.portal.call(console.emulator.set_faults, FaultSettings(rules=[frozen]))
    page.click("#start")
    expect(page).to_have_url(re.compile(r"/batches/\d{8}-\d{6}-[0-9a-f]{6}$"))
    first = page.url
    # pushed by the event stream, no reload; the batch ends once its video is judged (a worker process starts)
    expect(page.locator("#state")).to_have_text("done", timeout=TIMEOUT_MS)
    expect(page.locator("#done")).to_have_text("1")
    expect(page.locator("#failed")).to_have_text("1")
    expect(page.locator("#items tbody tr")).to_have_count(2)
    expect(page.locator("#items")).to_contain_text("detect_failed")
    _shot(page, "batch", tmp_path)

    # Redo bad: its cost first, then a confirmation; only then is the bad video made again (and comes back ok)
    expect(page.locator("#items .verdict")).to_have_text("bad")
    page.click("#redo-bad")
    expect(page.locator("#redo-cost")).to_contain_text("Make 1 video(s) judged bad again")
    expect(page.locator("#redo-cost")).to_contain_text("CNY, paid again")
    assert sum(console.emulator.stats().submissions_per_image.values()) == 1
    page.click("#redo-yes")
    bid = first.rsplit("/", 1)[1]
    page.wait_for_function(
        """async (id) => {
            const body = await (await fetch(`/api/batches/${id}`)).json();
            return body.state === "done" && body.items.some((it) => it.verdict === "ok");
        }""",
        arg=bid,
        polling=250,
    )
    page.reload()
    expect(page.locator("#items .verdict")).to_have_text("ok")
    assert sum(console.emulator.stats().submissions_per_image.values()) == 2

    page.goto(first + "/gallery")
    video = page.locator("video")
    expect(video).to_have_count(1)
    page.evaluate("() => { const v = document.querySelector('video'); v.muted = true; return v.play(); }")
    page.wait_for_function("() => document.querySelector('video').readyState >= 2")
    _shot(page, "gallery", tmp_path)
    page.click("#needs-review")
    expect(page.locator("#matching")).to_have_text("1 item(s)")
    expect(page.locator("figure.card")).to_have_attribute("data-status", "detect_failed")

    # A second batch, held mid-run by the emulator (every call hangs), then cancelled from its page.
    console.portal.call(console.emulator.set_faults, FaultSettings(latency_s=120))
    page.goto(console.url.split("/?")[0] + "/")
    page.set_input_files("#images", [str(p) for p in PORTRAITS[1:3]])
    _drop_voice_track(page)
    expect(page.locator("#start")).to_be_enabled()
    page.click("#start")
    expect(page).to_have_url(re.compile(r"/batches/\d{8}-\d{6}-[0-9a-f]{6}$"))
    expect(page.locator("#state")).to_have_text("running")
    page.click("button[data-action=cancel]")
    console.portal.call(console.emulator.set_faults, FaultSettings())
    expect(page.locator("#state")).to_have_text("cancelled")
    assert console.emulator.stats().tasks_by_status.get("SUCCEEDED", 0) == 2  # the first batch's video and its redo

    page.goto(console.url.split("/?")[0] + "/batches")
    expect(page.locator("#batches tbody tr")).to_have_count(2)
    _shot(page, "batches", tmp_path)
