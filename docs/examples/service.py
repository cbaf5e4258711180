"""Embedding lpengine in an async service: one Engine for the process, items fed one at a time.

Runs as is against the bundled emulator (no key, no cost):  python docs/examples/service.py
Point `config` at your own YAML (and set DASHSCOPE_API_KEY) to use the real service.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio

from lpengine import Engine, ItemState, ProgressEvent, load_config

ASSETS = Path(__file__).resolve().parents[2] / "lpengine" / "assets"


async def main() -> int:
    with tempfile.TemporaryDirectory() as out:
        # The demo config starts the emulator in-process; --output-like override via load_config.
        config = load_config(ASSETS / "demo.yaml", overrides={"output.dir": out})
        seen: list[ProgressEvent] = []

        async with Engine(config, on_event=seen.append) as engine:
            # A web handler would do this per request; here three requests arrive at once.
            portraits = sorted((ASSETS / "portraits").glob("*"))[:3]
            results = {}

            async def handle(image: Path) -> None:
                results[image.name] = await engine.process(image)

            async with anyio.create_task_group() as tg:
                for image in portraits:
                    tg.start_soon(handle, image)

        for name, result in sorted(results.items()):
            print(f"{name}: {result.state.value} {result.output or result.reason}")
        print(f"{len(seen)} progress events received")
        ok = all(r.state in (ItemState.SUCCEEDED, ItemState.DETECT_FAILED) for r in results.values())
        return 0 if ok and results else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main))
