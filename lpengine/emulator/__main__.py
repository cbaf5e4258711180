"""`python -m lpengine.emulator`: serve the emulator until Ctrl-C.

Flags cover the common knobs; `--settings FILE` takes a JSON `EmulatorSettings` document (faults included) for
everything else, and flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import anyio

from lpengine.emulator.app import serve_forever
from lpengine.emulator.settings import EmulatorSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lpengine.emulator",
        description="Local DashScope LivePortrait emulator (see docs/emulator.md).",
    )
    parser.add_argument("--settings", type=Path, help="JSON file with EmulatorSettings fields")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 0 = a free one, printed on start)")
    parser.add_argument("--api-key", action="append", dest="api_keys", help="accepted key (repeatable)")
    parser.add_argument("--speedup", type=float, help="emulated seconds per real second")
    parser.add_argument("--realtime-factor", type=float, help="task run time ÷ audio duration")
    parser.add_argument("--instant", action="store_true", default=None, help="tasks take no time")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--detector", choices=["auto", "haar", "rule", "always_pass"])
    parser.add_argument("--video", choices=["real", "stub"])
    parser.add_argument("--burst-protection", action="store_true", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    base = args.settings.read_text(encoding="utf-8") if args.settings else "{}"
    overrides = {name: value for name, value in vars(args).items() if name != "settings" and value is not None}
    try:
        settings = EmulatorSettings.model_validate({**json.loads(base), **overrides})
    except (ValueError, TypeError) as error:  # bad JSON or a ValidationError
        sys.stderr.write(f"invalid emulator settings:\n{error}\n")
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(serve_forever, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
