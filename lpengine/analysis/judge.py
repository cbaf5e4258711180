"""From measurements to flags, a verdict and a 0–100 score (docs/analysis.md gives each threshold's reason)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lpengine.config import AnalysisConfig
from lpengine.errors import LPEngineError

if TYPE_CHECKING:  # measure imports PyAV and OpenCV, which judging needs not
    from lpengine.analysis.measure import Measurements


class NotAVideo(LPEngineError):
    """The file is not a video at all (empty, not a media container, no video stream): analysing it again
    will not help. The pipeline judges such a download `undecodable`; the CLI names it as a bad input."""


Verdict = Literal["ok", "warn", "bad"]

FLAGS: tuple[str, ...] = (
    "undecodable",
    "audio_missing",
    "duration_mismatch",
    "fps_mismatch",
    "frozen",
    "black_frames",
    "no_face",
    "lip_sync_offset",
    "lip_sync_weak",
)
"""The fixed vocabulary, in the order flags are listed."""

_SEVERITY: dict[str, Literal["warn", "bad"]] = {
    "undecodable": "bad",
    "duration_mismatch": "bad",
    "fps_mismatch": "warn",
    "frozen": "bad",
    "black_frames": "bad",
    "no_face": "bad",
    "lip_sync_offset": "bad",
    "lip_sync_weak": "warn",
}
_PENALTY = {"warn": 15, "bad": 40}


@dataclass(frozen=True, slots=True)
class Expectations:
    """What the video should be, as far as it is known (a loose file may come with none of it)."""

    audio_duration_s: float | None = None
    """The input voice track's length."""
    audio_path: str | None = None
    """The input voice track, used for lip sync when the video carries no audio of its own."""
    fps: int | None = None
    """The requested `video_fps`."""
    photo_size: tuple[int, int] | None = None
    """The input photo's width and height."""
    photo_path: str | None = None
    """The input photo, whose size is read from its header when `photo_size` is not given."""
    mouth_moves: bool = True
    """False when `mouth_move_strength` is 0: a still mouth is then what was asked for."""


@dataclass(frozen=True, slots=True)
class VideoAnalysis:
    path: str
    verdict: Verdict
    flags: list[str]
    score: int
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "verdict": self.verdict, "flags": list(self.flags), "metrics": self.metrics}

    def summary(self) -> dict[str, Any]:
        """What an item's report row and the state store keep."""
        return {"verdict": self.verdict, "flags": list(self.flags), "score": self.score, "metrics": self.metrics}


def undecodable(path: str, reason: str) -> VideoAnalysis:
    return VideoAnalysis(path, "bad", ["undecodable"], 0, {"decode_error": reason, "score": 0})


def judge(path: str, m: Measurements, expect: Expectations, config: AnalysisConfig) -> VideoAnalysis:
    t = config.thresholds
    metrics = _metrics(m, expect)
    flags: set[str] = set()
    if m.decode_error is not None or m.frame_count == 0:
        flags.add("undecodable")
    if m.audio_duration_s is None and config.audio_missing != "ignore":
        flags.add("audio_missing")
    given = expect.audio_duration_s if expect.audio_duration_s is not None else m.expected_audio_duration_s
    reference = given if given is not None else m.audio_duration_s
    if reference is not None and m.frame_count and abs(m.video_duration_s - reference) > t.duration_tolerance_s:
        flags.add("duration_mismatch")
    if expect.fps is not None and m.fps is not None and abs(m.fps - expect.fps) > t.fps_tolerance:
        flags.add("fps_mismatch")
    frozen, black = _merge(m.frozen_runs, m.black_runs, t.black_min_s)
    longest_frozen = max((e - s for s, e in frozen), default=0.0)
    frozen_total = sum(e - s for s, e in frozen)
    metrics["longest_frozen_s"] = round(longest_frozen, 3)
    metrics["frozen_fraction"] = round(frozen_total / m.video_duration_s, 4) if m.video_duration_s else None
    metrics["longest_black_s"] = round(max((e - s for s, e in black), default=0.0), 3)
    if m.video_duration_s and (
        longest_frozen >= t.frozen_min_s or frozen_total >= t.frozen_max_fraction * m.video_duration_s
    ):
        flags.add("frozen")
    if metrics["longest_black_s"] >= t.black_min_s:
        flags.add("black_frames")
    # Black frames show no face by definition and are flagged as what they are; the face is looked for elsewhere.
    sightings = [found for at, found in m.face_sightings if not any(s <= at < e for s, e in black)]
    metrics["face_fraction"] = round(sum(sightings) / len(sightings), 4) if sightings else None
    metrics["face_samples"] = len(sightings)
    if sightings and sum(sightings) / len(sightings) < t.face_min_fraction:
        flags.add("no_face")
    # Lips are judged on a picture that is otherwise sound: a still, black or faceless stretch breaks the mouth's
    # signal for reasons already flagged.
    if expect.mouth_moves and m.lip_sync_correlation is not None and not flags & {"frozen", "black_frames", "no_face"}:
        if m.lip_sync_correlation < t.lip_sync_min_correlation:
            flags.add("lip_sync_weak")
        elif m.lip_sync_lag_ms is not None and abs(m.lip_sync_lag_ms) > t.lip_sync_max_offset_ms:
            flags.add("lip_sync_offset")
    ordered = [f for f in FLAGS if f in flags]
    severities = [_severity(f, config) for f in ordered]
    verdict: Verdict = "bad" if "bad" in severities else "warn" if severities else "ok"
    score = 0 if "undecodable" in flags else max(0, 100 - sum(_PENALTY[s] for s in severities))
    metrics["score"] = score
    return VideoAnalysis(path, verdict, ordered, score, metrics)


def _severity(flag: str, config: AnalysisConfig) -> Literal["warn", "bad"]:
    if flag == "audio_missing":
        return "bad" if config.audio_missing == "bad" else "warn"
    return _SEVERITY[flag]


def _merge(
    frozen: list[tuple[float, float]], black: list[tuple[float, float]], black_min_s: float
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """A black run is also a still run: overlapping still and black runs are merged into one span, which counts as
    black when it holds a black run long enough to flag, and as frozen otherwise."""
    spans: list[list[float]] = []
    for start, end in sorted([*frozen, *black]):
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    still: list[tuple[float, float]] = []
    for start, end in spans:
        inside = [(s, e) for s, e in black if s >= start and e <= end]
        if not any(e - s >= black_min_s for s, e in inside):
            still.append((start, end))
    return still, black


def _metrics(m: Measurements, expect: Expectations) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "container_duration_s": _r(m.container_duration_s),
        "video_duration_s": _r(m.video_duration_s),
        "audio_duration_s": _r(m.audio_duration_s),
        "expected_audio_duration_s": _r(
            expect.audio_duration_s if expect.audio_duration_s is not None else m.expected_audio_duration_s
        ),
        "fps": _r(m.fps),
        "expected_fps": expect.fps,
        "frame_count": m.frame_count,
        "width": m.width,
        "height": m.height,
        "size_vs_photo": None,
        "lip_sync_correlation": m.lip_sync_correlation,
        "lip_sync_lag_ms": m.lip_sync_lag_ms,
        "voice_source": m.voice_source,
    }
    if expect.photo_size and expect.photo_size[0]:
        metrics["size_vs_photo"] = round(m.width / expect.photo_size[0], 4)
    if m.decode_error is not None:
        metrics["decode_error"] = m.decode_error
    if m.sync_model is not None:
        metrics["sync_model"] = m.sync_model
    return metrics


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
