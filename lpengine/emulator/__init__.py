"""A local DashScope LivePortrait emulator: the API contract (docs/dashscope-liveportrait-api.md) over real HTTP,
with emulated time, quotas, the one-at-a-time queue, temporary uploads, expiring result URLs and fault injection.

See docs/emulator.md. Start one in-process with `run_emulator`, or from a shell with `python -m lpengine.emulator`.
"""

from lpengine.emulator.app import RunningEmulator, run_emulator, serve_forever
from lpengine.emulator.settings import EmulatorSettings, FaultRule, FaultSettings
from lpengine.emulator.state import EmulatorStats, FinishedRun, ManualClock

__all__ = [
    "EmulatorSettings",
    "EmulatorStats",
    "FaultRule",
    "FaultSettings",
    "FinishedRun",
    "ManualClock",
    "RunningEmulator",
    "run_emulator",
    "serve_forever",
]
