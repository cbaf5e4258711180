"""`lpengine serve`: the console's aiohttp app in the engine's own process, and how it is started.

In demo mode one in-process emulator plays the account for every batch (no key, no cost), as `lpengine demo` does;
otherwise the batches reach DashScope with the key from the environment or the base config's `.env`, which stays
in this process: no page or API answer carries it.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp_jinja2
import anyio
import jinja2
from aiohttp import web
from pydantic import SecretStr

from lpengine.config import BatchConfig, EmbeddedEmulatorConfig, load_config, load_secrets
from lpengine.engine import Engine
from lpengine.errors import ConfigError
from lpengine.stages.context import ProgressEvent
from lpengine.web.batches import BatchManager, EngineOpener
from lpengine.web.security import TOKEN_ENV, Guard, is_loopback, make_token
from lpengine.web.views import MANAGER, routes

__all__ = ["Console", "ConsoleSettings", "create_app", "open_console", "serve_forever"]

_HERE = Path(__file__).parent
DEMO_CONFIG = _HERE.parent / "assets" / "demo.yaml"
MAX_BODY = 1024 * 1024 * 1024
"""The whole upload body. Each file is capped on its own too (uploads.py); this bounds what one request can send."""


@dataclass(frozen=True)
class ConsoleSettings:
    config: Path | None = None
    """The base batch YAML (API, storage, pricing, concurrency, default video parameters) for new batches."""
    demo: bool = False
    host: str = "127.0.0.1"
    port: int = 8710
    token: str | None = None
    """None: `LPENGINE_CONSOLE_TOKEN`, else a random one."""
    workspace: Path = Path("lpengine-console")
    """Where the console's batches live (one folder each)."""
    emulator_speedup: float | None = None
    """Demo only: override the demo config's speedup (tests and benchmarks)."""


@dataclass
class Console:
    url: str
    """The address to open, token included."""
    token: str
    manager: BatchManager
    emulator: object | None = None
    """The demo's `RunningEmulator` (its controls), None against the real service."""


def create_app(manager: BatchManager, guard: Guard) -> web.Application:
    app = web.Application(middlewares=[guard.middleware], client_max_size=MAX_BODY)
    app[MANAGER] = manager
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True),
    )
    app.add_routes(routes)
    app.router.add_static("/static", _HERE / "static")
    return app


def _check_bind(settings: ConsoleSettings, token: str | None) -> None:
    if not is_loopback(settings.host) and token is None:
        raise ConfigError(
            [
                f"--host {settings.host}: a console reachable from other machines needs a token you chose; set "
                f"{TOKEN_ENV} (a long random string) or bind 127.0.0.1"
            ]
        )


@asynccontextmanager
async def open_console(settings: ConsoleSettings) -> AsyncIterator[Console]:
    """Serve the console for the duration of the block (the queue runs in the same task group)."""
    explicit = settings.token or os.environ.get(TOKEN_ENV) or None
    _check_bind(settings, explicit)
    token = explicit or make_token()
    base = settings.config or DEMO_CONFIG
    base_cfg = load_config(base)
    async with AsyncExitStack() as stack:
        emulator = None
        if settings.demo:
            from lpengine.emulator import EmulatorSettings, run_emulator

            key = f"sk-emulator-{secrets.token_hex(8)}"
            emu = base_cfg.api.emulator or EmbeddedEmulatorConfig()
            speedup = settings.emulator_speedup or base_cfg.speedup
            emulator = await stack.enter_async_context(
                run_emulator(
                    EmulatorSettings(
                        api_keys=[key],
                        speedup=speedup,
                        realtime_factor=emu.realtime_factor,
                        detector=emu.detector,
                        video=emu.video,
                    )
                )
            )
            opener = _demo_opener(emulator.base_url, key, speedup)
        else:
            opener = _live_opener(load_secrets(base_cfg.base_dir).api_key)
        manager = BatchManager(settings.workspace.absolute(), base.absolute(), opener)
        app = create_app(manager, Guard(token, is_loopback(settings.host)))
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        shown = f"[{shown}]" if ":" in shown else shown
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.serve)
            yield Console(f"http://{shown}:{port}/?token={token}", token, manager, emulator)
            tg.cancel_scope.cancel()


def _demo_opener(base_url: str, key: str, speedup: float) -> EngineOpener:
    """Every demo batch talks to the one shared emulator, as batches of one account talk to one service."""

    def open_engine(cfg: BatchConfig, on_event: Callable[[ProgressEvent], None]) -> Engine:
        api = cfg.api.model_copy(update={"emulator": None, "base_url": base_url, "speedup": speedup})
        return Engine(cfg.model_copy(update={"api": api}), api_key=key, on_event=on_event)

    return open_engine


def _live_opener(key: SecretStr | None) -> EngineOpener:
    def open_engine(cfg: BatchConfig, on_event: Callable[[ProgressEvent], None]) -> Engine:
        return Engine(cfg, api_key=key, on_event=on_event)

    return open_engine


async def serve_forever(settings: ConsoleSettings) -> None:
    """Run until cancelled; prints one line with the URL to open (token included), as Jupyter does."""
    async with open_console(settings) as console:
        sys.stdout.write(f"lpengine console: {console.url}\n")
        sys.stdout.flush()
        await anyio.sleep_forever()
