"""A console on the demo emulator, in the test's event loop (API tests) or in a thread (the browser test)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal

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


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, object]) -> dict[str, object]:
    """The system Chromium: browsers cannot be downloaded here (`.ci/run` installs Debian's)."""
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed: apt-get install chromium")
    return {
        **browser_type_launch_args,
        "executable_path": str(CHROMIUM),
        "args": [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    }
