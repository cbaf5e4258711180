"""Shared fixtures: anyio on asyncio only, and helpers that write batch files into tmp folders."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import stamina

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
def fast_retries() -> Iterator[None]:
    """Retries keep their attempt counts but skip the backoff sleeps."""
    with stamina.set_testing(True, attempts=6, cap=True):
        yield


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
