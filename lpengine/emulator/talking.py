"""The emulator's result video: a talking head made from the portrait, and the defects a real result can have.

A still picture would pass no honest analysis (it is `frozen`, and its mouth does not follow the voice), so the
emulator animates the portrait the way the parameters ask, cheaply enough to make hundreds of results:

- the mouth (the lower middle of the face the Haar cascade finds) opens with the voice's loudness, scaled by
  `mouth_move_strength`;
- the head sways a little, more for `active` than `calm`, scaled by `head_move_strength`;
- the eyes blink `eye_move_freq` × 0.6 times a second (0.5 gives ~18 blinks a minute, a person's usual rate).

`Look.defect` makes a defective result on request (the `defect` fault rule), so that tests, the demo and the
benchmark can exercise every analysis flag: `frozen` (the picture stops for 2.5 s), `black` (1 s of black),
`truncated` (video and audio cut to half the voice), `wrong_fps` (10 fps off the request), `lip_lag` (the mouth
follows the voice 400 ms late), `lip_unsynced` (the mouth moves, to the voice played backwards), `face_lost` (the
head slides out of the picture for the middle 60 %), `no_audio` (no audio track), `corrupt` (the media data is
garbage inside an intact MP4 box structure).

Blocking; the emulator calls it from a worker thread (OpenCV, PyAV and numpy are imported through `media._heavy`,
whose lock keeps concurrent first imports from racing).
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any, NamedTuple

from PIL import Image

from lpengine.emulator.media import _heavy
from lpengine.emulator.settings import Defect

DEFECTS: tuple[Defect, ...] = (
    "frozen",
    "black",
    "truncated",
    "wrong_fps",
    "lip_lag",
    "lip_unsynced",
    "face_lost",
    "no_audio",
    "corrupt",
)

AUDIO_RATE = 16_000  # mono speech: a quarter of the AAC encoding work of 44.1 kHz
_SWAY = {"calm": 0.012, "normal": 0.025, "active": 0.05}  # head sway amplitude, share of the picture's side
_BLINK_PER_S = 0.6  # blinks per second at eye_move_freq = 1
_BLINK_S = 0.12
_LIP_LAG_S = 0.4
_FROZEN_S = 2.5
_BLACK_S = 1.0
_FPS_OFFSET = 10
_FACE_SIDE = 256


class Look(NamedTuple):
    """The video parameters that change the picture, plus an optional defect (hashable: a cache key part)."""

    template_id: str = "normal"
    head_move_strength: float = 0.7
    eye_move_freq: float = 0.5
    mouth_move_strength: float = 1.0
    defect: Defect | None = None


def render(thumbnail_jpeg: bytes, audio: bytes, fps: int, look: Look) -> bytes:
    """H.264 + AAC MP4 of the animated portrait for the audio's whole length (shorter when `truncated`)."""
    av, np = _heavy("av"), _heavy("numpy")
    pixels = np.asarray(Image.open(io.BytesIO(thumbnail_jpeg)).convert("RGB"))
    voice = _voice(audio)
    if look.defect == "truncated":
        voice = voice[: len(voice) // 2]
    duration = len(voice) / AUDIO_RATE
    out_fps = fps
    if look.defect == "wrong_fps":
        out_fps = fps + _FPS_OFFSET if fps <= 20 else fps - _FPS_OFFSET
    frames = _Animator(pixels, look, out_fps).frames(voice, max(1, math.ceil(duration * out_fps)))
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as dst:
        video = dst.add_stream("libx264", rate=out_fps)
        video.width, video.height = pixels.shape[1], pixels.shape[0]
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "ultrafast"}
        sound = None
        if look.defect != "no_audio":
            sound = dst.add_stream("aac", rate=AUDIO_RATE)
            sound.layout = "mono"
            sound.bit_rate = 48_000
            sound.options = {"aac_coder": "fast"}  # 4× faster than the default coder; this is speech, not music
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts = index
            dst.mux(video.encode(frame))
        dst.mux(video.encode(None))
        if sound is not None:
            for start in range(0, len(voice), 1024):
                chunk = av.AudioFrame.from_ndarray(voice[None, start : start + 1024], format="fltp", layout="mono")
                chunk.sample_rate = AUDIO_RATE
                chunk.pts = start  # from 0: the muxer then writes an edit list that hides the encoder's priming
                dst.mux(sound.encode(chunk))
            dst.mux(sound.encode(None))
    data = out.getvalue()
    return _scramble_media(data) if look.defect == "corrupt" else data


def _voice(audio: bytes) -> Any:
    av, np = _heavy("av"), _heavy("numpy")
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=AUDIO_RATE)
    chunks: list[Any] = []
    with av.open(io.BytesIO(audio), mode="r") as src:
        for frame in src.decode(audio=0):
            chunks.extend(f.to_ndarray()[0] for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray()[0] for f in resampler.resample(None))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(AUDIO_RATE, np.float32)


class _Animator:
    def __init__(self, pixels: Any, look: Look, fps: int) -> None:
        self.pixels = pixels
        self.look = look
        self.fps = fps
        h, w = pixels.shape[:2]
        self.box = _face_box(pixels) or (w * 3 // 10, h // 4, w * 2 // 5, h * 9 // 20)
        x, y, bw, bh = self.box
        cheek = pixels[y + bh * 45 // 100 : y + bh * 55 // 100, x + bw // 4 : x + bw * 3 // 4]
        self.skin = tuple(int(c) for c in cheek.reshape(-1, 3).mean(axis=0)) if cheek.size else (200, 160, 140)
        self.fill = tuple(int(c) for c in pixels.reshape(-1, 3).mean(axis=0))

    def frames(self, voice: Any, count: int) -> Any:
        np = _heavy("numpy")
        openness = _openness(voice, self.fps, count)
        if self.look.defect == "lip_lag":
            lag = round(_LIP_LAG_S * self.fps)
            openness = np.concatenate([np.zeros(lag), openness])[:count]
        elif self.look.defect == "lip_unsynced":
            openness = openness[::-1]
        blinks = self._blinks(count)
        frozen = self._span(count, 0.3, _FROZEN_S) if self.look.defect == "frozen" else None
        black = self._span(count, 0.4, _BLACK_S) if self.look.defect == "black" else None
        lost = (round(count * 0.2), round(count * 0.8)) if self.look.defect == "face_lost" else None
        held = None
        for index in range(count):
            if frozen and frozen[0] <= index < frozen[1] and held is not None:
                yield held
                continue
            if black and black[0] <= index < black[1]:
                yield np.zeros_like(self.pixels)
                continue
            rgb = self._draw(
                index, float(openness[index]), index in blinks, lost is not None and lost[0] <= index < lost[1]
            )
            held = rgb
            yield rgb

    def _span(self, count: int, at: float, seconds: float) -> tuple[int, int]:
        start = round(count * at)
        return start, min(count, start + round(seconds * self.fps))

    def _blinks(self, count: int) -> set[int]:
        rate = self.look.eye_move_freq * _BLINK_PER_S
        if rate <= 0:
            return set()
        every, length = self.fps / rate, max(1, round(_BLINK_S * self.fps))
        return {round(k * every + every / 2) + i for k in range(int(count / every) + 1) for i in range(length)}

    def _draw(self, index: int, openness: float, blink: bool, lost: bool) -> Any:
        cv2, np = _heavy("cv2"), _heavy("numpy")
        rgb = self.pixels.copy()
        x, y, w, h = self.box
        if blink:
            for ex in (x + w * 3 // 10, x + w * 7 // 10):
                cv2.ellipse(rgb, (ex, y + h * 38 // 100), (max(2, w // 9), max(2, h // 14)), 0, 0, 360, self.skin, -1)
        mouth_h = max(1, round(openness * self.look.mouth_move_strength * h * 0.1))
        cv2.ellipse(rgb, (x + w // 2, y + h * 4 // 5), (max(3, w // 6), mouth_h), 0, 0, 360, (70, 20, 25), -1)
        t = index / self.fps
        side = max(rgb.shape[:2])
        sway = _SWAY.get(self.look.template_id, _SWAY["normal"]) * self.look.head_move_strength * side
        dx = sway * math.sin(2 * math.pi * 0.31 * t)
        dy = 0.6 * sway * math.sin(2 * math.pi * 0.23 * t + 1.0)
        if lost:
            dx += rgb.shape[1]
        if dx == 0 and dy == 0:
            return rgb
        shift = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
        return cv2.warpAffine(
            rgb, shift, (rgb.shape[1], rgb.shape[0]), borderMode=cv2.BORDER_CONSTANT, borderValue=self.fill
        )


def _openness(voice: Any, fps: int, count: int) -> Any:
    """The voice's loudness under each frame, 0–1 (1 at the loud end of speech, the 95th percentile)."""
    np = _heavy("numpy")
    bounds = np.minimum((np.arange(count + 1) * (AUDIO_RATE / fps)).astype(np.int64), len(voice))
    energy = np.concatenate([[0.0], np.cumsum(voice.astype(np.float64) ** 2)])
    rms = np.sqrt((energy[bounds[1:]] - energy[bounds[:-1]]) / np.maximum(bounds[1:] - bounds[:-1], 1))
    top = float(np.percentile(rms, 95)) if len(rms) else 0.0
    return np.clip(rms / top, 0.0, 1.0) if top > 0 else np.zeros(count)


def _face_box(pixels: Any) -> tuple[int, int, int, int] | None:
    """The largest frontal face, found on a ≤256 px copy like the emulator's detector (a full-size search finds
    more false faces in the background)."""
    cv2, np = _heavy("cv2"), _heavy("numpy")
    folder = _heavy("cv2.data").haarcascades
    cascade = cv2.CascadeClassifier(folder + "haarcascade_frontalface_default.xml")
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, _FACE_SIDE / max(gray.shape))
    if scale < 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    side = max(24, min(gray.shape) // 5)
    found, _, weights = cascade.detectMultiScale3(
        gray, scaleFactor=1.15, minNeighbors=4, minSize=(side, side), outputRejectLevels=True
    )
    if len(found) == 0:
        return None
    x, y, w, h = (int(v / scale) for v in found[int(np.argmax(weights))])  # the surest face, not the largest
    return x, y, w, h


def _scramble_media(data: bytes) -> bytes:
    """Garbage in place of the `mdat` payload, every box header intact: the download's structure check passes
    (as it would for a result the service encoded badly), and only decoding finds out."""
    out = bytearray(data)
    offset = 0
    while offset + 8 <= len(out):
        size, kind = struct.unpack(">I4s", out[offset : offset + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", out[offset + 8 : offset + 16])[0], 16
        if size < header:
            break
        if kind == b"mdat":
            np = _heavy("numpy")
            end = min(offset + size, len(out))
            garbage = np.random.default_rng(0).integers(0, 256, end - offset - header, np.uint8)
            out[offset + header : end] = garbage.tobytes()
        offset += size
    return bytes(out)
