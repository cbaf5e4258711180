"""`lpengine analyze VIDEO...`: loose files judged against an expected voice track and frame rate.

Each input is checked before it reaches a worker, so that a missing path, a directory or an empty file gets one
line naming it (a usage error) while every other video is still analysed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio

from lpengine.analysis.judge import Expectations, NotAVideo, VideoAnalysis
from lpengine.analysis.runner import Analyzer
from lpengine.config import AnalysisConfig
from lpengine.media import MediaError, inspect_audio


@dataclass(frozen=True, slots=True)
class BadInput:
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def expectations(audio: Path | None, fps: int | None) -> Expectations | BadInput:
    """What loose videos are judged against; a voice track that fails the local audio checks is a bad input."""
    if audio is None:
        return Expectations(fps=fps)
    try:
        info = inspect_audio(audio)
    except MediaError as exc:
        return BadInput(str(audio), exc.reason)
    return Expectations(audio_duration_s=info.duration_s, audio_path=str(audio), fps=fps)


def _problem(path: Path) -> str | None:
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "is a folder without report.json (give video files, or a batch's output folder)"
    if not path.is_file():
        return "not a regular file"
    if path.stat().st_size == 0:
        return "the file is empty"
    return None


async def analyze_files(
    paths: list[Path], expect: Expectations, config: AnalysisConfig
) -> list[VideoAnalysis | BadInput]:
    """Results in the order given; the videos are analysed `config.workers` at a time."""
    analyzer = Analyzer(config)
    results: list[VideoAnalysis | BadInput | None] = [None] * len(paths)

    async def one(index: int, path: Path) -> None:
        problem = _problem(path)
        if problem is not None:
            results[index] = BadInput(str(path), problem)
            return
        try:
            results[index] = await analyzer.analyze(str(path), expect)
        except NotAVideo as exc:
            results[index] = BadInput(str(path), str(exc))
        except OSError as exc:
            results[index] = BadInput(str(path), exc.strerror or str(exc))
        except TimeoutError:
            results[index] = BadInput(str(path), f"analysis took longer than {config.timeout_s:g} s")
        except Exception as exc:  # one damaged file must not stop the others being judged
            results[index] = BadInput(str(path), f"analysis failed: {exc.__class__.__name__}: {exc}")

    async with anyio.create_task_group() as tg:
        for index, path in enumerate(paths):
            tg.start_soon(one, index, path)
    return [r for r in results if r is not None]
