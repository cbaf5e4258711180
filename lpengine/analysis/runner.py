"""Where analyses run: `analyze_video` in a worker process, `Analyzer` handing files to a bounded pool of them.

Decoding is CPU work (tens of ms per second of video): on the event loop it would stall every request of the
run, and in threads it would contend for the GIL between numpy calls. anyio's worker processes start once, are
reused, and are killed when a wait is cancelled or times out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import anyio
import anyio.to_process
from PIL import Image

from lpengine.analysis.judge import Expectations, VideoAnalysis, judge
from lpengine.config import AnalysisConfig


def analyze_video(path: str, expect: Expectations, config: AnalysisConfig, strip: str | None = None) -> VideoAnalysis:
    """Blocking: decode and judge one video; with `strip`, also write a JPEG of three of its frames there (for
    the HTML report). Raises `NotAVideo` for a file that is no video at all and `OSError` for one that cannot be
    read."""
    from lpengine.analysis.measure import measure

    if expect.photo_size is None and expect.photo_path is not None:
        expect = dataclasses.replace(expect, photo_size=_photo_size(expect.photo_path))
    measured = measure(path, expect.audio_path, config.thresholds.freeze_noise, config.sync_model, strip)
    return judge(path, measured, expect, config)


def _photo_size(path: str) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:  # the header only: no pixels are decoded
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


_NICE = 10  # analysis is background work: a busy core goes to the process that keeps the paid queue fed


def _in_worker(path: str, expect: Expectations, config: AnalysisConfig, strip: str | None) -> VideoAnalysis:
    """`analyze_video` in a worker process, which lowers its own CPU priority once (a no-op where unsupported)."""
    global _niced
    if not _niced:
        _niced = True
        with contextlib.suppress(OSError, AttributeError):
            os.nice(_NICE)
    return analyze_video(path, expect, config, strip)


_niced = False


def _warm() -> None:
    """Import the decoders and load the face cascade, so the first video is judged without that wait."""
    from lpengine.analysis import measure

    measure.warm()


class Analyzer:
    """At most `config.workers` analyses at once, each within `config.timeout_s`."""

    def __init__(self, config: AnalysisConfig) -> None:
        self.config = config
        self._limiter = anyio.CapacityLimiter(config.workers)

    async def warm_up(self) -> None:
        """Start a worker process ahead of the first video (spawn and imports take seconds on a busy host)."""
        with anyio.fail_after(self.config.timeout_s):
            await anyio.to_process.run_sync(_warm, cancellable=True, limiter=self._limiter)

    async def analyze(self, path: str, expect: Expectations, strip: str | None = None) -> VideoAnalysis:
        """Raises what the worker raised, or `TimeoutError`; the worker is killed on a timeout or cancellation."""
        with anyio.fail_after(self.config.timeout_s):
            return await anyio.to_process.run_sync(
                _in_worker, path, expect, self.config, strip, cancellable=True, limiter=self._limiter
            )
