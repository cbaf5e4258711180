"""Stage 6: judge the downloaded video (`lpengine.analysis`) before anyone has to watch it.

The item has already succeeded and its video is on disk; this stage only adds a verdict. Whatever goes wrong
here (a worker crash, a timeout, a bug) marks the judgement `analysis_failed` with the reason and never fails the
item or touches its video.
"""

from __future__ import annotations

import time
from pathlib import Path

from lpengine.analysis import Analyzer, Expectations, NotAVideo, undecodable
from lpengine.models import Item
from lpengine.stages.context import StageContext


async def analyse(ctx: StageContext, analyzer: Analyzer, item: Item) -> None:
    assert item.output_path is not None  # only succeeded items come here
    started = time.perf_counter()
    params = item.spec.params
    image = Path(item.spec.image)
    expect = Expectations(
        audio_duration_s=item.audio_duration or None,
        audio_path=str(item.audio.path) if item.audio else None,
        fps=params.video_fps,
        photo_path=str(image) if image.is_absolute() else None,
        mouth_moves=params.mouth_move_strength > 0,
    )
    strip = ctx.output_dir / ".lpengine" / "frames" / f"{Path(item.output_path).stem}.jpg"
    try:
        result = await analyzer.analyze(item.output_path, expect, strip=str(strip))
        item.analysis = result.summary()
    except NotAVideo as exc:
        item.analysis = undecodable(item.output_path, str(exc)).summary()
    except TimeoutError:
        item.analysis = _failed(f"analysis took longer than {analyzer.config.timeout_s:g} s")
    except Exception as exc:  # a judgement that fails must not fail the item it judges
        ctx.emit(item, "analysis.internal_error", level="error", error=repr(exc), exc_info=True)
        item.analysis = _failed(f"{exc.__class__.__name__}: {exc}")
    item.timings["analysis"] = time.perf_counter() - started
    ctx.emit(item, "analysis.done", verdict=item.analysis["verdict"], flags=item.analysis["flags"])


def _failed(reason: str) -> dict[str, object]:
    return {"verdict": "analysis_failed", "flags": [], "score": None, "metrics": {"error": reason}}
