"""`lpengine check`: prove the environment can run the batch before any money is spent.

Every check is free: the key is verified by listing tasks (no charge), storage by writing, fetching through the URL
the API would get, and deleting one probe object. Each failure carries the fix.
"""

from __future__ import annotations

import importlib.metadata
import platform
import secrets
import shutil
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import anyio
from pydantic import SecretStr

from lpengine.client.api import DashScopeClient
from lpengine.config import BatchConfig, is_url, load_secrets
from lpengine.errors import ApiError, AuthError, LPEngineError, NetworkError, QuotaError
from lpengine.media import inspect_audio
from lpengine.plan import PlanProblem, input_problems, iter_plan
from lpengine.storage import open_storage

_MB_PER_VIDEO_SECOND = 0.25  # generous: the service's 24 fps H.264 portraits run ~0.1–0.2 MB/s
_PACKAGES = ("aiohttp", "anyio", "pydantic", "structlog", "aioboto3", "pillow", "mutagen")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


async def run_checks(config: BatchConfig) -> list[Check]:
    """All checks, in the order a user would fix them; never raises for an expected failure."""
    results: list[Check] = [_python(), _packages()]
    problems = input_problems(config)
    results.append(Check("inputs", not problems, "; ".join(problems) or "inputs found", "fix inputs.* in the config"))
    audio_seconds = await _audio(config, results)
    results.append(await _output(config, audio_seconds))
    async with AsyncExitStack() as stack:
        client = await _api(config, stack, results)
        if client is not None:
            await _storage(config, client, stack, results)
    return results


def _python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, platform.python_version(), "install Python 3.11 or newer")


def _packages() -> Check:
    versions = []
    missing = []
    for name in ("lpengine", *_PACKAGES):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return Check(
        "packages",
        not missing,
        ", ".join(versions) + (f"; missing: {', '.join(missing)}" if missing else ""),
        "reinstall: bash scripts/setup.sh",
    )


async def _audio(config: BatchConfig, results: list[Check]) -> float:
    if config.audio is None:
        results.append(Check("audio", True, "no default audio (every manifest row must name one)"))
        return 10.0
    ref = config.resolve_ref(config.audio)
    if is_url(ref):
        results.append(Check("audio", True, f"{config.audio} (URL: checked by the service)"))
        return 10.0
    try:
        info = await anyio.to_thread.run_sync(inspect_audio, Path(ref))
    except LPEngineError as exc:
        results.append(Check("audio", False, str(exc), "use a wav or mp3 of 1–180 s under 15 MB"))
        return 10.0
    results.append(Check("audio", True, f"{info.format}, {info.duration_s:.1f} s, {info.size / 1e6:.2f} MB"))
    return info.duration_s


async def _output(config: BatchConfig, audio_seconds: float) -> Check:
    out = config.output_dir

    def probe() -> Check:
        try:
            out.mkdir(parents=True, exist_ok=True)
            marker = out / f".lpengine-check-{secrets.token_hex(4)}"
            marker.write_bytes(b"ok")
            marker.unlink()
        except OSError as exc:
            return Check("output", False, f"{out}: {exc.strerror}", "choose a writable output.dir")
        items = sum(1 for entry in iter_plan(config) if not isinstance(entry, PlanProblem))
        need_mb = items * audio_seconds * _MB_PER_VIDEO_SECOND
        free_mb = shutil.disk_usage(out).free / 1e6
        ok = free_mb > need_mb * 1.2
        detail = f"{out} writable; {items} item(s) need ~{need_mb:.0f} MB, {free_mb:.0f} MB free"
        return Check("output", ok, detail, "free disk space or choose another output.dir")

    return await anyio.to_thread.run_sync(probe)


async def _api(config: BatchConfig, stack: AsyncExitStack, results: list[Check]) -> DashScopeClient | None:
    base_url, key = config.api.base_url, load_secrets(config.base_dir).api_key
    if config.api.emulator is not None:
        from lpengine.emulator import EmulatorSettings, run_emulator

        key = SecretStr(f"sk-emulator-{secrets.token_hex(8)}")
        emulator = await stack.enter_async_context(
            run_emulator(EmulatorSettings(api_keys=[key.get_secret_value()], speedup=config.speedup, video="stub"))
        )
        base_url = emulator.base_url
    if key is None:
        results.append(Check("api key", False, "DASHSCOPE_API_KEY is not set", "export it or put it in .env"))
        return None
    if config.api.emulator is not None:
        results.append(Check("api key", True, "not needed: api.emulator runs the local emulator with its own key"))
    else:
        results.append(Check("api key", True, "DASHSCOPE_API_KEY is set"))
    client = await stack.enter_async_context(
        DashScopeClient(config.api, key, base_url=base_url, speedup=config.speedup)
    )
    ok, detail, fix = await _attempt(client.list_tasks)
    results.append(Check("api", ok, f"{base_url}: {detail}", fix))
    return client if ok else None


async def _attempt(call: Callable[[], Awaitable[object]]) -> tuple[bool, str, str]:
    try:
        with anyio.fail_after(60):
            await call()
    except AuthError as exc:
        return False, f"{exc.code}: {exc.message}", "check the key; LivePortrait needs a Beijing-region key"
    except QuotaError as exc:
        return False, f"{exc.code}: {exc.message}", "settle the account or disable free-tier-only mode"
    except (NetworkError, TimeoutError) as exc:
        return False, f"unreachable ({exc})", "check network/proxy (HTTPS_PROXY) and api.base_url"
    except ApiError as exc:
        return False, f"{exc.code}: {exc.message}", "see docs/troubleshooting.md"
    return True, "key accepted (task list read, no charge)", ""


async def _storage(config: BatchConfig, client: DashScopeClient, stack: AsyncExitStack, results: list[Check]) -> None:
    name = f"storage ({config.storage.backend})"
    try:
        storage = await stack.enter_async_context(open_storage(config, client, load_secrets(config.base_dir)))
        detail = await storage.probe()
    except LPEngineError as exc:
        results.append(Check(name, False, str(exc), "see docs/storage.md"))
        return
    results.append(Check(name, True, detail))
