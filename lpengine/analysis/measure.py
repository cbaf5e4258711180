"""One decoding pass over a video that measures everything the flags are decided from.

Blocking and CPU-bound: it runs in a worker process (`lpengine.analysis.runner`), never on the event loop.

What is measured, and how cheaply:
- durations and frame rate from the container, the streams and the decoded frames themselves;
- still and black runs by FFmpeg's own `freezedetect` and `blackdetect` inside PyAV's filter graph, read from
  the frames' metadata (`lavfi.freezedetect.freeze_start`, `lavfi.black_start`...), which PyAV exposes from 18.1;
- face presence with OpenCV's bundled Haar cascade on a few sampled frames a second, on the luma plane scaled to
  at most 256 px (the decoded Y plane is used as it is: no colour conversion);
- the mouth region (the lower middle of the face box) of every frame, shrunk to 32×16 pixels, for the lip-sync
  measure in `lipsync.py`;
- the voice's samples (the video's own track, or the expected voice track when the video has none), mono 16 kHz.
"""

from __future__ import annotations

import functools
import importlib
import os

# One core per analysis: the worker pool spreads videos over cores, and BLAS threads spinning beside the decoder
# would only burn CPU (set before numpy is first imported in the worker process).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dataclasses import dataclass, field
from typing import Any

import av
import cv2
import numpy as np

from lpengine.analysis import lipsync
from lpengine.analysis.judge import NotAVideo

AUDIO_RATE = 16_000
_FACE_SIDE = 256  # Haar input size: a talking head's face stays large, and detection costs ~8 ms here
_FACES_PER_SECOND = 2.0  # face samples per second of video
_MOUTH_SIZE = (32, 16)  # width, height of the shrunk mouth crop
_FREEZE_GRANULE_S = 0.5  # freezedetect's own minimum duration; runs are then judged against the thresholds
_BLACK_FILTER = "d=0:pix_th=0.10:pic_th=0.98"  # FFmpeg's defaults, any length (the threshold judges length)
_LUMA_FIRST = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "gray"})
_BOX_MOVE = 0.15  # a new detection re-anchors the face only when it moved this share of its width
_STRIP_HEIGHT = 96  # px of each frame in the report's strip
_RETRIES = 2  # frames after a sampled frame that missed the face, looked at before counting it absent


@dataclass(slots=True)
class Measurements:
    container_duration_s: float | None = None
    video_duration_s: float = 0.0
    audio_duration_s: float | None = None
    """The video's own audio track; None when it has none."""
    expected_audio_duration_s: float | None = None
    """The expected voice track's, when one was given as a file."""
    fps: float | None = None
    frame_count: int = 0
    width: int = 0
    height: int = 0
    decode_error: str | None = None
    frozen_runs: list[tuple[float, float]] = field(default_factory=list)
    black_runs: list[tuple[float, float]] = field(default_factory=list)
    face_sightings: list[tuple[float, bool]] = field(default_factory=list)
    """(time, face found) per sampled frame."""
    lip_sync_correlation: float | None = None
    lip_sync_lag_ms: float | None = None
    voice_source: str | None = None
    """"video" (its own track) or "input" (the expected voice track), or None when there is no voice to use."""
    sync_model: dict[str, float] | None = None


def measure(
    path: str,
    expected_audio: str | None = None,
    freeze_noise: float = 0.0001,
    sync_model: str | None = None,
    strip: str | None = None,
) -> Measurements:
    """Decode `path` once. Raises `NotAVideo` for a file that is no video; a video that breaks while decoding
    comes back with `decode_error` set and whatever was measured before. With `strip`, three frames (at 1/6, 1/2
    and 5/6 of the video) are written there side by side as one JPEG."""
    if os.path.getsize(path) == 0:
        raise NotAVideo("the file is empty")
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise NotAVideo(f"not a video PyAV can open ({_short(exc)})") from None
    with container:
        if not container.streams.video:
            raise NotAVideo("the file has no video stream")
        m = Measurements()
        if container.duration is not None:
            m.container_duration_s = container.duration / 1_000_000
        shots: list[np.ndarray] = []
        voice, mouths = _decode(container, m, freeze_noise, shots if strip else None)
    if strip and shots:
        _write_strip(strip, shots)
    if expected_audio is not None:
        expected = read_voice(expected_audio)
        if expected is None:
            raise NotAVideo(f"{expected_audio}: the voice track has no audio stream")
        m.expected_audio_duration_s = len(expected) / AUDIO_RATE
        if voice is None:
            voice = expected
            m.voice_source = "input"
    if voice is not None and len(mouths) and m.fps:
        m.lip_sync_correlation, m.lip_sync_lag_ms = lipsync.best_lag(
            lipsync.loudness_envelope(voice, AUDIO_RATE, m.fps, len(mouths)), lipsync.mouth_signal(mouths), m.fps
        )
        if sync_model is not None:
            m.sync_model = lipsync.run_model(sync_model, mouths, voice, m.fps)
    return m


def warm() -> None:
    _cascade()


def read_voice(path: str) -> np.ndarray | None:
    """The mono 16 kHz samples of an audio file, None when it has no audio stream."""
    with av.open(path, metadata_errors="ignore") as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        chunks = [f.to_ndarray().reshape(-1) for frame in container.decode(stream) for f in resampler.resample(frame)]
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _decode(
    container: Any, m: Measurements, freeze_noise: float, shots: list[np.ndarray] | None
) -> tuple[np.ndarray | None, np.ndarray]:
    video = container.streams.video[0]
    video.codec_context.thread_count = 1  # one core per worker: the pool, not the codec, spreads the load
    audio = container.streams.audio[0] if container.streams.audio else None
    rate = video.average_rate or video.guessed_rate
    m.fps = float(rate) if rate else None
    m.width, m.height = video.codec_context.width, video.codec_context.height
    events = _Events()
    graph = None
    faces = _FaceTracker(m.fps or 25.0)
    expected = video.frames or round((m.container_duration_s or 0.0) * (m.fps or 0.0))
    wanted = {max(0, (expected * k) // 6) for k in (1, 3, 5)} if shots is not None else set()
    mouths: list[np.ndarray] = []
    samples: list[np.ndarray] = []
    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE) if audio is not None else None
    first = last = None
    streams = [video] if audio is None else [video, audio]
    try:
        for packet in container.demux(*streams):
            if packet.stream.type == "audio":
                assert resampler is not None
                samples.extend(f.to_ndarray().reshape(-1) for fr in packet.decode() for f in resampler.resample(fr))
                continue
            for frame in packet.decode():
                if frame.time is not None:
                    first = frame.time if first is None else first
                    last = frame.time
                if graph is None:  # built from the first frame: a damaged header may not know the pixel format
                    graph = _filters(frame, video.time_base, freeze_noise)
                graph.push(frame)
                events.drain(graph)
                crop = faces.mouth(_luma(frame), m.frame_count, frame.time or 0.0)
                if crop is not None:
                    mouths.append(crop)
                if m.frame_count in wanted and shots is not None:
                    height = _STRIP_HEIGHT
                    width = max(2, round(frame.width * height / max(1, frame.height)))
                    shots.append(frame.reformat(width=width, height=height, format="rgb24").to_ndarray())
                m.frame_count += 1
        if resampler is not None:
            samples.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except (av.FFmpegError, ValueError) as exc:
        m.decode_error = _short(exc)
    if graph is not None:
        graph.push(None)
        events.drain(graph)
    step = 1.0 / m.fps if m.fps else 0.0
    if first is not None and last is not None:
        m.video_duration_s = last - first + step
    elif m.fps:
        m.video_duration_s = m.frame_count * step
    end = (last + step) if last is not None else m.video_duration_s
    m.frozen_runs, m.black_runs = events.runs(end)
    m.face_sightings = faces.sightings
    voice = None
    if audio is not None:
        voice = np.concatenate(samples) if samples else np.zeros(0, np.float32)
        m.audio_duration_s = len(voice) / AUDIO_RATE
        m.voice_source = "video"
    # Only frames since the first face sighting have a crop; a video whose face shows late is judged by no_face.
    return voice, np.stack(mouths) if mouths else np.zeros((0, _MOUTH_SIZE[1], _MOUTH_SIZE[0]), np.float32)


def _write_strip(path: str, shots: list[np.ndarray]) -> None:
    """Atomically, so a report never links half a picture."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.hstack(shots), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data.tobytes())
    os.replace(tmp, path)


def _filters(frame: Any, time_base: Any, freeze_noise: float) -> Any:
    graph = av.filter.Graph()
    graph.link_nodes(
        graph.add_buffer(width=frame.width, height=frame.height, format=frame.format, time_base=time_base),
        graph.add("freezedetect", f"n={freeze_noise}:d={_FREEZE_GRANULE_S}"),
        graph.add("blackdetect", _BLACK_FILTER),
        graph.add("buffersink"),
    ).configure()
    return graph


def _luma(frame: Any) -> np.ndarray:
    if frame.format.name in _LUMA_FIRST:
        plane = frame.planes[0]
        rows = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
        return rows[:, : frame.width]
    return frame.to_ndarray(format="gray")  # type: ignore[no-any-return]


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "strerror", None) or exc).strip() or exc.__class__.__name__
    return text.splitlines()[0][:200]


class _Events:
    """Collects freezedetect/blackdetect frame metadata into closed [start, end) runs."""

    def __init__(self) -> None:
        self._open: dict[str, float] = {}
        self._runs: dict[str, list[tuple[float, float]]] = {"freeze": [], "black": []}

    def drain(self, graph: Any) -> None:
        while True:
            try:
                frame = graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            meta = frame.metadata
            if meta:
                self._note(meta)

    def _note(self, meta: dict[str, str]) -> None:
        for kind, start_key, end_key in (
            ("freeze", "lavfi.freezedetect.freeze_start", "lavfi.freezedetect.freeze_end"),
            ("black", "lavfi.black_start", "lavfi.black_end"),
        ):
            if end_key in meta and kind in self._open:
                self._runs[kind].append((self._open.pop(kind), float(meta[end_key])))
            if start_key in meta:
                self._open[kind] = float(meta[start_key])

    def runs(self, end: float) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """Runs still open when the video ends (a video frozen to its last frame) close at its end."""
        for kind, start in self._open.items():
            self._runs[kind].append((start, max(start, end)))
        self._open.clear()
        return self._runs["freeze"], self._runs["black"]


class _FaceTracker:
    """Face presence on sampled frames, and the mouth crop of every frame after the first sighting.

    The crop follows the head: each frame's upper face (eyes and nose, which do not move with speech) is found
    again by template matching near where it was first seen, so that head sway, which moves the whole region, is
    not mistaken for the mouth opening. A detection re-anchors the face only when it really moved (`_BOX_MOVE`).
    """

    def __init__(self, fps: float) -> None:
        self._every = max(1, round(fps / _FACES_PER_SECOND))
        self._cascade = _cascade()
        self._box: tuple[int, int, int, int] | None = None
        self._reference: np.ndarray | None = None
        self._retries = 0
        self.sightings: list[tuple[float, bool]] = []
        """(time, face found) per sampled frame."""

    def mouth(self, luma: np.ndarray, index: int, time: float) -> np.ndarray | None:
        if index % self._every == 0:
            self._retries = _RETRIES
            self.sightings.append((time, self._detect(luma)))
        elif self._retries and not self.sightings[-1][1]:
            # A miss is looked at again on the next frames: one frame caught mid-blink or mid-word is no absence.
            self._retries -= 1
            self.sightings[-1] = (self.sightings[-1][0], self._detect(luma))
        if self._box is None:
            return None
        x, y, w, h = self._box
        top, left = y + (h * 3) // 20, x + (w * 3) // 20
        margin = max(2, int(w * _BOX_MOVE))
        if self._reference is None:
            self._reference = np.ascontiguousarray(luma[top : y + (h * 3) // 5, left : x + (w * 17) // 20])
        dx = dy = 0
        y0, x0 = max(0, top - margin), max(0, left - margin)
        area = luma[y0 : top + self._reference.shape[0] + margin, x0 : left + self._reference.shape[1] + margin]
        if area.shape[0] >= self._reference.shape[0] and area.shape[1] >= self._reference.shape[1]:
            scores = cv2.matchTemplate(np.ascontiguousarray(area), self._reference, cv2.TM_CCOEFF_NORMED)
            _, _, _, (bx, by) = cv2.minMaxLoc(scores)
            dx, dy = x0 + bx - left, y0 + by - top
        size = (max(2, w // 2), max(2, (h * 3) // 10))
        crop = cv2.getRectSubPix(luma, size, (x + w / 2 + dx, y + h * 0.8 + dy))
        return cv2.resize(crop, _MOUTH_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)

    def _detect(self, luma: np.ndarray) -> bool:
        scale = min(1.0, _FACE_SIDE / max(luma.shape))
        small = luma if scale == 1.0 else cv2.resize(luma, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        side = max(24, min(small.shape) // 5)
        found, _, weights = self._cascade.detectMultiScale3(
            cv2.equalizeHist(np.ascontiguousarray(small)),
            scaleFactor=1.15,
            minNeighbors=4,
            minSize=(side, side),
            outputRejectLevels=True,
        )
        if len(found) == 0:
            return False
        # The surest face, not the largest: a background shape can pass the cascade with a larger box.
        x, y, w, h = (int(v / scale) for v in found[int(np.argmax(weights))])
        if self._box is None or _moved(self._box, (x, y, w, h)):
            self._box = (x, y, w, h)
            self._reference = None
        return True


def _moved(old: tuple[int, int, int, int], new: tuple[int, int, int, int]) -> bool:
    ox, oy, ow, oh = old
    nx, ny, nw, nh = new
    return max(abs((ox + ow / 2) - (nx + nw / 2)), abs((oy + oh / 2) - (ny + nh / 2))) > _BOX_MOVE * ow


@functools.cache
def _cascade() -> Any:
    """Loaded once per worker process (~50 ms, as much as judging a short video); a worker judges one video at a
    time, so the classifier is never shared between threads."""
    folder = importlib.import_module("cv2.data").haarcascades  # cv2's stubs lack the `data` module
    return cv2.CascadeClassifier(folder + "haarcascade_frontalface_default.xml")
