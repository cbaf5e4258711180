"""Shared fixtures: anyio on asyncio only, and helpers that write batch files into tmp folders."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import stamina
from aiohttp import web

pytest_plugins = ["tests.s3server", "tests.pg"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp is asyncio-only


@pytest.fixture(autouse=True)
def _no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see a developer's real credentials."""
    for name in ("DASHSCOPE_API_KEY", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _own_user_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tests never see a developer's own presets: the user config folder (platformdirs, XDG) is per test."""
    home = tmp_path / "xdg-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home / "lpengine" / "presets"


@pytest.fixture
def closed_port_url() -> str:
    """An http URL on a loopback port nothing listens on: a download that fails at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.png"


@pytest.fixture
async def static_files(tmp_path: Path) -> AsyncIterator[tuple[Path, str]]:
    """A loopback file server the emulator fetches input URLs from, like DashScope fetches public URLs."""
    root = tmp_path / "served"
    root.mkdir()
    app = web.Application()
    app.router.add_static("/", root)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield root, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.fixture
def fast_retries() -> Iterator[None]:
    """Retries keep their attempt counts but skip the backoff sleeps."""
    with stamina.set_testing(True, attempts=6, cap=True):
        yield


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
