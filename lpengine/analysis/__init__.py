"""Result analysis (结果分析): judge every downloaded video before anyone watches it.

`analyze_video` decodes one file and returns its verdict (`ok`/`warn`/`bad`), flags from a fixed vocabulary, a
0–100 score and the metrics behind them; `Analyzer` runs it in worker processes for the pipeline and the CLI.
Decoding needs the `analysis` extra (PyAV, OpenCV, numpy); this package imports them only where it decodes, so
the engine runs without them and says how to install them (`missing_extra`).
"""

from __future__ import annotations

import importlib.util

from lpengine.analysis.judge import FLAGS, Expectations, NotAVideo, Verdict, VideoAnalysis, undecodable
from lpengine.analysis.runner import Analyzer, analyze_video

__all__ = [
    "FLAGS",
    "INSTALL_HINT",
    "Analyzer",
    "Expectations",
    "NotAVideo",
    "Verdict",
    "VideoAnalysis",
    "analyze_video",
    "missing_extra",
    "undecodable",
]

INSTALL_HINT = (
    "video analysis needs the `analysis` extra (PyAV, OpenCV, numpy): bash scripts/setup.sh analysis, "
    "or pip install 'lpengine[analysis]'"
)


def missing_extra() -> str | None:
    """The install hint when a module the analysis decodes with is missing, else None."""
    for module in ("av", "cv2", "numpy"):
        try:
            if importlib.util.find_spec(module) is None:
                return INSTALL_HINT
        except ValueError:  # blocked with sys.modules[module] = None
            return INSTALL_HINT
    return None
