"""Where analyses run: `analyze_video` in a worker process, `Analyzer` handing files to a bounded pool of them.

Decoding is CPU work (tens of ms per second of video): on the event loop it would stall every request of the
run, and in threads it would contend for the GIL between numpy calls. anyio's worker processes start once, are
reused, and are killed when a wait is cancelled or times out.
"""

from __future__ import annotations

import anyio
import anyio.to_process

from lpengine.analysis.judge import Expectations, VideoAnalysis, judge
from lpengine.config import AnalysisConfig


def analyze_video(path: str, expect: Expectations, config: AnalysisConfig) -> VideoAnalysis:
    """Blocking: decode and judge one video. Raises `NotAVideo` for a file that is no video at all and
    `OSError` for one that cannot be read."""
    from lpengine.analysis.measure import measure

    measured = measure(path, expect.audio_path, config.thresholds.freeze_noise, config.sync_model)
    return judge(path, measured, expect, config)


class Analyzer:
    """At most `config.workers` analyses at once, each within `config.timeout_s`."""

    def __init__(self, config: AnalysisConfig) -> None:
        self.config = config
        self._limiter = anyio.CapacityLimiter(config.workers)

    async def analyze(self, path: str, expect: Expectations) -> VideoAnalysis:
        """Raises what the worker raised, or `TimeoutError`; the worker is killed on a timeout or cancellation."""
        with anyio.fail_after(self.config.timeout_s):
            return await anyio.to_process.run_sync(
                analyze_video, path, expect, self.config, cancellable=True, limiter=self._limiter
            )
