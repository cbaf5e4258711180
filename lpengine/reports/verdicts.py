"""`lpengine analyze OUTPUT_DIR`: judge a finished batch's videos again (or for the first time) and write the
verdicts into its report.json, report.csv and report.html.

Each row of report.json says which voice track and parameters its video was made with, so the videos are judged
against what was asked, exactly as the pipeline's analysis stage would. Only the reports are rewritten; the state
store keeps what the run recorded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import anyio

from lpengine.analysis import Analyzer, Expectations, NotAVideo, VideoAnalysis
from lpengine.analysis.files import BadInput
from lpengine.config import AnalysisConfig
from lpengine.models import ItemResult, ItemState, RunReport
from lpengine.reports import write_reports


def looks_like_batch(path: Path) -> bool:
    return path.is_dir() and (path / "report.json").is_file()


def read_rows(out_dir: Path) -> tuple[dict[str, Any], list[ItemResult]] | BadInput:
    path = out_dir / "report.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        summary, rows = document["summary"], [ItemResult.from_dict(row) for row in document["items"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return BadInput(str(path), f"not a report.json lpengine wrote ({exc.__class__.__name__}: {exc})")
    return summary, rows


def _expectations(row: ItemResult) -> Expectations:
    params = row.params or {}
    audio = row.audio if row.audio and Path(row.audio).is_file() else None
    fps = params.get("video_fps")
    strength = params.get("mouth_move_strength")
    return Expectations(
        audio_path=audio,
        fps=fps if isinstance(fps, int) else None,
        photo_path=row.input if Path(row.input).is_file() else None,
        mouth_moves=not (isinstance(strength, int | float) and strength == 0),
    )


async def judge_batch(
    out_dir: Path, summary: dict[str, Any], rows: list[ItemResult], config: AnalysisConfig
) -> list[VideoAnalysis | BadInput]:
    """Judge every succeeded row's video, rewrite the three reports, and return the judgements in row order."""
    analyzer = Analyzer(config)
    judged: dict[int, VideoAnalysis | BadInput] = {}

    async def one(index: int, row: ItemResult) -> None:
        assert row.output is not None
        if _missing(row.output):
            judged[index] = BadInput(row.output, "no such file (moved or deleted since the run)")
            return
        strip = out_dir / ".lpengine" / "frames" / f"{Path(row.output).stem}.jpg"
        try:
            judged[index] = await analyzer.analyze(row.output, _expectations(row), strip=str(strip))
        except NotAVideo as exc:
            judged[index] = BadInput(row.output, str(exc))
        except Exception as exc:  # one video that cannot be judged must not stop the others
            judged[index] = BadInput(row.output, f"analysis failed: {exc.__class__.__name__}: {exc}")

    async with anyio.create_task_group() as tg:
        for index, row in enumerate(rows):
            if row.state is ItemState.SUCCEEDED and row.output:
                tg.start_soon(one, index, row)
    updated = [_with_verdict(row, judged.get(index)) for index, row in enumerate(rows)]
    report = RunReport(
        items=updated,
        wall_time_s=float(summary.get("wall_time_s") or 0.0),
        dry_run=bool(summary.get("dry_run")),
        api_requests=dict(summary.get("api_requests") or {}),
        throttled=int(summary.get("throttled") or 0),
        retries=int(summary.get("retries") or 0),
    )
    await anyio.to_thread.run_sync(write_reports, report, out_dir)
    return [judged[index] for index in sorted(judged)]


def _missing(path: str) -> bool:
    return not Path(path).is_file()


def _with_verdict(row: ItemResult, judged: VideoAnalysis | BadInput | None) -> ItemResult:
    if judged is None:
        return row
    if isinstance(judged, BadInput):
        return dataclasses.replace(
            row, verdict="analysis_failed", flags=[], score=None, metrics={"error": judged.problem}
        )
    return dataclasses.replace(
        row, verdict=judged.verdict, flags=judged.flags, score=judged.score, metrics=judged.metrics
    )
