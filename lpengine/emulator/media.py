"""What the emulator does with input bytes: validate them like the service (§2, §3), decide "face or not", and
make the result MP4.

OpenCV, PyAV and numpy come from the `emulator` extra and are imported inside the functions that need them, so
`import lpengine.emulator` works without them: detection then falls back to the rule detector and every result is
the stub MP4 shipped in `lpengine/assets/`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import threading
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from mutagen import MutagenError
from mutagen.mp3 import MP3
from mutagen.wave import WAVE
from PIL import Image, ImageStat, UnidentifiedImageError

__all__ = [
    "AudioInfo",
    "FaceDetector",
    "ImageInfo",
    "MediaError",
    "inspect_audio",
    "inspect_image",
    "make_thumbnail",
    "resolve_detector",
    "sha256",
    "stub_video",
    "video_encoder_available",
]

IMAGE_MAX_BYTES = 10 * 1024 * 1024  # §2: < 10 MB
AUDIO_MAX_BYTES = 15 * 1024 * 1024  # §3: < 15 MB
_IMAGE_MAX_SIDE = 4096  # §2
_IMAGE_MAX_ASPECT = 2.0  # §2
_IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "WEBP"}  # §2: jpeg/jpg/png/bmp/webp (MPO: a camera JPEG)
_AUDIO_MIN_S = 1.0  # §3: 1 s < duration
_THUMB_SIDE = 256  # result videos are small on purpose: they are only checked, never watched at scale
_HAAR_SIDE = 256  # detection input size: large enough for a portrait's face, fast (~8 ms)
_RULE_MIN_STDDEV = 8.0  # grayscale stddev below this = a near-uniform image, no face possible
_STUB_ASSET = "emulator-stub.mp4"

Detector = Literal["haar", "rule", "always_pass"]
NO_FACE_MESSAGE = "No human face detected."  # §2


class MediaError(Exception):
    """The input breaks a documented limit; `code`/`message` are what the service answers (HTTP 400, §6)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_UNSUPPORTED = ("InvalidParameter.UnsupportedFileFormat", "Input files format not supported.")
_IMAGE_SIZE = ("InvalidImage.ImageSize", "The size of image is beyond limit.")


@dataclass(frozen=True, slots=True)
class ImageInfo:
    sha256: str
    pixels: Image.Image
    """Decoded RGB pixels, kept for detection and the thumbnail."""


@dataclass(frozen=True, slots=True)
class AudioInfo:
    sha256: str
    duration: float


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inspect_image(data: bytes) -> ImageInfo:
    """Apply §2's image limits to the real bytes (the URL's extension and Content-Type are not trusted)."""
    if len(data) >= IMAGE_MAX_BYTES:
        raise MediaError(*_IMAGE_SIZE)
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(*_UNSUPPORTED) from exc
    if img.format not in _IMAGE_FORMATS:
        raise MediaError(*_UNSUPPORTED)
    width, height = img.size
    if max(width, height) > _IMAGE_MAX_SIDE or max(width, height) > _IMAGE_MAX_ASPECT * min(width, height):
        raise MediaError(*_IMAGE_SIZE)
    try:
        pixels = img.convert("RGB")  # decodes: a truncated file fails here, not later in a worker
    except (OSError, ValueError) as exc:
        raise MediaError(*_UNSUPPORTED) from exc
    return ImageInfo(sha256(data), pixels)


def inspect_audio(data: bytes, max_duration_s: float) -> AudioInfo:
    """Apply §3's audio limits: wav/mp3 by content, < 15 MB, 1 s < duration < `max_duration_s` (both bounds
    exclusive, as the docs write them; the same reading as the client's local check)."""
    if len(data) >= AUDIO_MAX_BYTES:
        # The contract documents no code for an oversized audio file; the generic one is the safest guess.
        raise MediaError("InvalidParameter", "The size of audio file is beyond limit.")
    parser: Any  # mutagen is untyped
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        parser = WAVE
    elif data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        parser = MP3  # an ID3 tag, or an MPEG audio frame sync
    else:
        raise MediaError(*_UNSUPPORTED)
    try:
        duration = float(parser(io.BytesIO(data)).info.length)
    except (MutagenError, ValueError, ZeroDivisionError) as exc:
        raise MediaError(*_UNSUPPORTED) from exc
    if not _AUDIO_MIN_S < duration < max_duration_s:
        raise MediaError("InvalidFile.AudioLengthError", f"Audio length must be between 1s and {max_duration_s:g}s.")
    return AudioInfo(sha256(data), duration)


_IMPORT_LOCK = threading.Lock()


def _heavy(module: str) -> Any:
    """Import an optional heavy module under one lock, from whichever worker thread needs it first.

    OpenCV's package swaps itself out of `sys.modules` for its native extension while it loads, so another thread
    that imports `cv2.data` at that moment finds a `cv2` that is not a package and fails (seen under load in the
    demo). Serialising these imports lets the first one finish before anyone else looks; later calls only take an
    uncontended lock and read `sys.modules`.
    """
    with _IMPORT_LOCK:
        return importlib.import_module(module)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # blocked with sys.modules[module] = None
        return False


def resolve_detector(choice: Literal["auto", "haar", "rule", "always_pass"]) -> Detector:
    if choice != "auto":
        if choice == "haar" and not _installed("cv2"):
            raise RuntimeError("detector 'haar' needs OpenCV: pip install 'lpengine[emulator]'")
        return choice
    return "haar" if _installed("cv2") else "rule"


class FaceDetector:
    """Face verdicts, cached by image sha256 (the same bytes always get the same answer, like a real model).

    `haar`: OpenCV's bundled frontal-face Haar cascade on a ≤256 px equalised grayscale copy; at least one face of
    at least 1/5 of the shorter side must be found (a portrait, not a crowd). `rule`: no OpenCV; passes unless the
    image is near-uniform or its URL contains "noface". `always_pass`: every image passes.
    """

    def __init__(self, mode: Detector) -> None:
        self.mode: Detector = mode
        self._verdicts: dict[str, bool] = {}
        self._local = threading.local()  # CascadeClassifier is not safe to share between worker threads

    def has_face(self, image: ImageInfo, url: str) -> bool:
        """Blocking (runs OpenCV); call it from a worker thread."""
        if self.mode == "always_pass":
            return True
        if self.mode == "rule" and "noface" in url.lower():
            return False
        verdict = self._verdicts.get(image.sha256)
        if verdict is None:
            verdict = self._haar(image.pixels) if self.mode == "haar" else _not_uniform(image.pixels)
            self._verdicts[image.sha256] = verdict
        return verdict

    def _haar(self, pixels: Image.Image) -> bool:
        cv2, np = _heavy("cv2"), _heavy("numpy")
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            folder = _heavy("cv2.data").haarcascades
            cascade = cv2.CascadeClassifier(folder + "haarcascade_frontalface_default.xml")
            self._local.cascade = cascade
        gray = pixels.convert("L")
        gray.thumbnail((_HAAR_SIDE, _HAAR_SIDE), Image.Resampling.BILINEAR)
        arr = cv2.equalizeHist(np.asarray(gray))
        side = max(24, min(arr.shape) // 5)
        faces = cascade.detectMultiScale(arr, scaleFactor=1.15, minNeighbors=4, minSize=(side, side))
        return len(faces) > 0


def _not_uniform(pixels: Image.Image) -> bool:
    return bool(ImageStat.Stat(pixels.convert("L")).stddev[0] >= _RULE_MIN_STDDEV)


def make_thumbnail(image: ImageInfo) -> bytes:
    """≤256 px, even sides (H.264 with yuv420p needs them), JPEG: what a real-mode result video shows."""
    thumb = image.pixels.copy()
    thumb.thumbnail((_THUMB_SIDE, _THUMB_SIDE), Image.Resampling.LANCZOS)
    w, h = max(2, thumb.width - thumb.width % 2), max(2, thumb.height - thumb.height % 2)
    if (w, h) != thumb.size:
        thumb = thumb.crop((0, 0, w, h))
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=90)
    return out.getvalue()


def video_encoder_available() -> bool:
    return _installed("av") and _installed("numpy")


@cache
def stub_video() -> bytes:
    """A 1 s, 64×64 grey H.264 + silent AAC MP4 (made once with `talking.render`; see docs/emulator.md)."""
    return resources.files("lpengine").joinpath("assets", _STUB_ASSET).read_bytes()
