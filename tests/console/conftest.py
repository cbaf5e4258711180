"""A console on the demo emulator, in the test's event loop (API tests) or in a thread (the browser test)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal
from playwright.sync_api import Page, sync_playwright

from lpengine.web import Console, ConsoleSettings, open_console

ASSETS = Path(__file__).resolve().parents[2] / "lpengine" / "assets"
PORTRAITS = sorted((ASSETS / "portraits").glob("portrait-*.jpg"))
VOICE = ASSETS / "voice.wav"
TOKEN = "test-token-" + "x" * 20


def settings(tmp: Path, **changes: object) -> ConsoleSettings:
    base = {"demo": True, "port": 0, "token": TOKEN, "workspace": tmp / "ws", "emulator_speedup": 200.0}
    return ConsoleSettings(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    async with open_console(settings(tmp_path)) as running:
        yield running


@pytest.fixture
def threaded_console(tmp_path: Path) -> Iterator[Console]:
    """The console in its own thread and event loop, for synchronous callers such as Playwright."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(open_console(settings(tmp_path))) as running,
    ):
        running.portal = portal  # type: ignore[attr-defined]
        yield running


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def page() -> Iterator[Page]:
    """A page in the system Chromium (browsers cannot be downloaded here; `.ci/run` installs Debian's).

    Playwright is started and stopped around each test, not once per session as pytest-playwright's fixtures do:
    its synchronous API keeps an event loop running in the main thread while it is open, and every anyio test
    after it would then fail to start its own.
    """
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()
