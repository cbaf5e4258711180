"""Local checks of portrait images, voice tracks and downloaded videos.

Every LivePortrait call is paid (detect per image, synthesis per second of video), and the service refuses a
bad input only after it has been uploaded, queued and sometimes billed. So every limit of the contract
(`dashscope-liveportrait-api.md` §2, §3, §7) that can be decided from the bytes on disk is decided here,
before any request. Formats are always taken from the file's content, never its name: users rename files
freely, and the published object's name and Content-Type must match what the bytes really are.

Each check fails with `MediaError`, whose `reason` says what is wrong and what to do about it, because these
messages are shown verbatim to people preparing hundreds of portraits, not to developers.

All functions are synchronous and do blocking file I/O; the engine runs them in worker threads, except on small
files (a few hundred KB at most) where the hand-off would cost more than the work. Nothing here touches
process-global state (Pillow's `MAX_IMAGE_PIXELS`, warning filters), so concurrent calls are safe.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from mutagen.mp3 import MP3
from mutagen.wave import WAVE
from PIL import BmpImagePlugin, Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from lpengine.errors import InputRejectedError

__all__ = [
    "AUDIO_MAX_BYTES",
    "AUDIO_MAX_SECONDS",
    "AUDIO_MIN_SECONDS",
    "IMAGE_MAX_ASPECT",
    "IMAGE_MAX_BYTES",
    "IMAGE_MAX_SIDE",
    "AudioInfo",
    "ImageInfo",
    "MediaError",
    "inspect_audio",
    "inspect_image",
    "upright_image",
    "verify_mp4",
]

# Importing the four plugins up front registers them before the first call, so worker threads never race on
# Pillow's lazy plugin discovery, and Image.open(formats=[...]) can stay restricted to the sniffed format.
_PLUGINS: Final = (BmpImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin)

_MIB: Final = 1024 * 1024

# Below this size a file is read on the event loop's own thread: handing the work to a worker thread costs more CPU
# (~0.1 ms in futexes and loop wake-ups) than reading and hashing the bytes. Bigger files go to a thread, so a 10 MB
# photo never stalls the loop.
INLINE_IO_BYTES: Final = 256 * 1024

# §2/§7: "file < 10 MB; aspect ratio ≤ 2; longest side ≤ 4096 px".
IMAGE_MAX_BYTES: Final = 10 * _MIB
IMAGE_MAX_SIDE: Final = 4096
IMAGE_MAX_ASPECT: Final = 2
# §3/§7: "wav/mp3, < 15 MB, 1s < duration < 3min" (the older 5 min limit is not relied on).
AUDIO_MAX_BYTES: Final = 15 * _MIB
AUDIO_MIN_SECONDS: Final = 1.0
AUDIO_MAX_SECONDS: Final = 180.0

_IMAGE_KINDS: Final = "JPEG, PNG, BMP or WEBP"
_AUDIO_KINDS: Final = "WAV or MP3"

# Pillow format name -> (our format name, MIME type, canonical suffix).
_IMAGE_FORMATS: Final[dict[str, tuple[str, str, str]]] = {
    "JPEG": ("jpeg", "image/jpeg", ".jpg"),
    "PNG": ("png", "image/png", ".png"),
    "BMP": ("bmp", "image/bmp", ".bmp"),
    "WEBP": ("webp", "image/webp", ".webp"),
}
_AUDIO_FORMATS: Final[dict[str, tuple[str, str]]] = {
    "wav": ("audio/wav", ".wav"),
    "mp3": ("audio/mpeg", ".mp3"),
}


class MediaError(InputRejectedError):
    """A local file is unusable as an input or as a downloaded result: refused before paying, or to be redone.

    `reason` is written for the person who has to fix the file, so the engine can show it without a traceback.
    """

    def __reduce__(self) -> tuple[type[MediaError], tuple[str, str]]:
        # Exception pickling replays self.args, which here is the formatted message, not (path, reason).
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the engine needs to publish an image: the real format decides the object name and Content-Type."""

    path: Path
    format: str
    width: int
    height: int
    size: int
    sha256: str
    content_type: str
    suffix: str
    data: bytes | None = field(default=None, repr=False, compare=False)
    """The bytes that were checked and hashed, kept for small files (`INLINE_IO_BYTES`) so that publishing sends
    exactly them without reading the file again."""
    orientation: int = 1
    """The EXIF Orientation a viewer applies (2–8: the pixels are stored turned or mirrored; `upright_image` turns
    them). `width` and `height` are the upright picture's, as the person who chose the photo sees it."""


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """What the engine needs to publish a voice track; `duration_s` also predicts the billed video length."""

    path: Path
    format: str
    duration_s: float
    size: int
    sha256: str
    content_type: str
    suffix: str
    data: bytes | None = field(default=None, repr=False, compare=False)
    """As `ImageInfo.data`."""


# --------------------------------------------------------------------------------------------------- helpers


def _kept(data: bytes) -> bytes | None:
    """The checked bytes worth keeping for publishing (`ImageInfo.data`): a small file's, not a 10 MB photo's."""
    return data if len(data) <= INLINE_IO_BYTES else None


def _fmt_mb(size: int, limit: int) -> str:
    """Sizes a person can compare with the limit; falls back to bytes where rounding would hide the excess. In MiB,
    as the limits are computed (10 MiB = 10,485,760 bytes), so no file "of 10.0 MB" is refused for being over 10 MB."""
    shown = f"{size / _MIB:.1f}"
    if size >= limit and float(shown) <= limit / _MIB:
        return f"{shown} MiB ({size:,} bytes)"
    return f"{shown} MiB"


def _describe_oserror(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "cannot be read: permission denied — fix the file's permissions or run as a user who can read it"
    if isinstance(exc, FileNotFoundError):
        return "does not exist — check the path (and that the file was not moved or renamed)"
    detail = exc.strerror or type(exc).__name__
    return f"cannot be read ({detail}) — check the disk and the path"


def _read_regular_file(path: Path, *, what: str, max_bytes: int, advice: str) -> bytes:
    """Read a whole input once, after the cheap refusals that must not depend on its content.

    The size is checked on the `stat` result first so that an oversized file is refused without reading it,
    and again on the bytes actually read in case the file changed in between. Special files are refused
    before opening: reading a FIFO or a device could block a worker thread forever.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise MediaError(path, _describe_oserror(exc)) from None
    except ValueError:  # "embedded null byte": a NUL in a manifest cell or a YAML string
        raise MediaError(path, "is not a usable path (it contains a NUL character) — fix the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(path, f"is a directory, not an {what} file — point to the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(path, f"is not a regular file (a device, pipe or socket) — point to an {what} file")
    _check_size(path, st.st_size, what=what, max_bytes=max_bytes, advice=advice)
    try:
        with open(path, "rb") as fh:
            # Sized to the file, not to the limit: read(n) allocates n bytes up front.
            data = fh.read(st.st_size + 1)
    except OSError as exc:
        raise MediaError(path, _describe_oserror(exc)) from None
    if len(data) != st.st_size:
        raise MediaError(
            path,
            f"changed size while being read ({st.st_size:,} → {len(data):,}+ bytes) — "
            f"wait until it is completely written, then retry",
        )
    return data


def _check_size(path: Path, size: int, *, what: str, max_bytes: int, advice: str) -> None:
    if size == 0:
        raise MediaError(path, f"is empty (0 bytes) — replace it with a real {what} file")
    if size >= max_bytes:
        limit_mb = max_bytes // _MIB
        raise MediaError(
            path,
            f"is {_fmt_mb(size, max_bytes)}; {what} files must be under {limit_mb} MiB — {advice}",
        )


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut off at the end of the sample is still text.
        return exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
    return True


def _iso_brand(data: bytes) -> bytes | None:
    """The major brand of an ISO-BMFF file (HEIC, AVIF, MP4, M4A...), None if it is not one."""
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return data[8:12]
    return None


def _one_line(detail: object, limit: int = 120) -> str:
    text = " ".join(str(detail).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------- images


def _sniff_image(data: bytes) -> str | None:
    """Pillow format name for the four accepted formats, None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


_HEIF_BRANDS: Final = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})


def _name_unsupported_image(data: bytes) -> str:
    """A name for what the file really is, so the message tells people which converter they need."""
    brand = _iso_brand(data)
    if brand in _HEIF_BRANDS:
        return "HEIC/HEIF"
    if brand in (b"avif", b"avis"):
        return "AVIF"
    if brand is not None:
        return "MP4/QuickTime (a video, not an image)"
    for magic, name in (
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"%PDF", "PDF"),
        (b"\x00\x00\x01\x00", "ICO"),
        (b"8BPS", "PSD"),
        (b"\xff\x0a", "JPEG XL"),
        (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
        (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    ):
        if data.startswith(magic):
            return name
    head = data[:512].lstrip()
    if head[:5].lower() == b"<?xml" or head[:4].lower() == b"<svg":
        return "SVG/XML"
    if _looks_like_text(data[:512]):
        return "text (not an image at all)"
    return "unknown (not a recognisable image)"


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """WEBP dimensions straight from the header, because Pillow's WEBP open allocates the canvas.

    libwebp's animation decoder (which Pillow's open() creates) allocates width x height x 4 bytes up front,
    and Pillow only refuses above 2x MAX_IMAGE_PIXELS there; a 10000x10000 header would cost 400 MB before
    our 4096 px rule could refuse it. Layouts per the WebP container spec (VP8 / VP8L / VP8X chunks).
    """
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _open_image(path: Path, data: bytes, pil_format: str) -> ImageFile.ImageFile:
    try:
        # Header only: Pillow decodes no pixels here. Its own bomb guard raises DecompressionBombError above
        # 2x MAX_IMAGE_PIXELS; between 1x and 2x it only warns (an exception if warnings are errors) and our
        # side limit refuses the image right after. Either way no pixel buffer is allocated.
        img = Image.open(io.BytesIO(data), formats=[pil_format])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError(
            path,
            f"claims absurd dimensions (a possible decompression bomb); images may be at most "
            f"{IMAGE_MAX_SIDE} px on the longest side — re-export it at a normal size",
        ) from None
    except Exception as exc:  # Pillow raises many types on malformed headers; none may escape as a crash.
        raise _damaged(path, pil_format, exc, "its header is damaged") from None
    return img


def _check_dimensions(path: Path, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise MediaError(path, f"declares an empty {width}x{height} px image — re-export or re-download it")
    long_side, short_side = max(width, height), min(width, height)
    if long_side > IMAGE_MAX_SIDE:
        raise MediaError(
            path,
            f"is {width}x{height} px; the longest side may be at most {IMAGE_MAX_SIDE} px — downscale it",
        )
    # Integer comparison: a float ratio would let 2.0000001 through or refuse exactly 2.
    if long_side > IMAGE_MAX_ASPECT * short_side:
        ratio = long_side / short_side
        shown = f"{ratio:.2f}"
        if float(shown) <= IMAGE_MAX_ASPECT:
            shown = f"{ratio:.6f}".rstrip("0")
        raise MediaError(
            path,
            f"is {width}x{height} px, aspect ratio {shown}; the long side may be at most {IMAGE_MAX_ASPECT}x "
            f"the short side — crop it closer to the face",
        )


def _damaged(path: Path, pil_format: str, exc: BaseException, what: str) -> MediaError:
    """Turn whatever Pillow raised on bad data into one sentence; "truncated" is said as such, it is common.

    Pillow's message is kept when it is meant for humans ("broken data stream"), not for "index out of
    range" or UnidentifiedImageError's repr of our in-memory buffer.
    """
    text = str(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return _truncated(path, pil_format)
    detail = ""
    if isinstance(exc, OSError | SyntaxError | ValueError) and text and "BytesIO" not in text:
        detail = f" ({_one_line(text)})"
    return MediaError(path, f"is not a valid {pil_format}: {what}{detail} — re-export or re-download it")


_PNG_IEND: Final = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _truncated(path: Path, what: str) -> MediaError:
    return MediaError(path, f"is a truncated {what} — re-export or re-download it")


_JPEG_STANDALONE_MARKERS: Final = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the first entropy-coded byte (just past the first SOS segment), None if the walk fails.

    Computed here rather than taken from Pillow's file position, which its MPO (multi-picture) handling moves.
    """
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            return None
        pos += 2 + length
        if marker == 0xDA:
            return pos if pos <= len(data) else None
    return None


def _check_image_integrity(path: Path, img: ImageFile.ImageFile, data: bytes, pil_format: str) -> None:
    """Refuse truncated or structurally corrupt files at a cost far below decoding them.

    Cut-off files (interrupted copies and downloads) are the common case; each format gets the cheapest check
    that catches them, because this runs for every image of every batch:
    - PNG: `verify()` walks every chunk to IEND and checks each CRC; it never inflates pixel data. It stops
      at IEND's header, so the 12-byte IEND chunk itself is looked for too (a cut anywhere is then caught).
    - JPEG: Pillow has no verify. Entropy-coded data cannot contain FF D9 (0xFF is byte-stuffed), so an
      End-Of-Image marker after the start of the first scan proves the file was not cut. Bit flips inside the
      scan are NOT detected: that needs a decode, ~13-20x the cost of this whole function for a 2000 px photo.
      A file that damaged is refused by the service's detect call (0.004 CNY), never reaching synthesis.
    - WEBP: the RIFF size field must be covered (checked before open), and Pillow's open already ran
      libwebp's demuxer over every chunk. VP8 bit flips are not detected, as for JPEG.
    - BMP: uncompressed pixel rows must all be present (stride x height after the pixel offset); for the rare
      RLE-compressed BMPs, the compressed size the header declares. (Pillow's RLE decoder is pure Python:
      seconds for a large image, so it is not run.)
    """
    try:
        if pil_format == "PNG":
            img.verify()
            if data.rfind(_PNG_IEND) < 0:  # rfind: found in the last bytes of a normal file.
                raise _truncated(path, "PNG (its IEND chunk is missing or incomplete)")
        elif pil_format == "JPEG":
            scan_start = _jpeg_scan_start(data)
            if scan_start is None or data.rfind(b"\xff\xd9", scan_start) < 0:
                raise _truncated(path, "JPEG (its End-Of-Image marker is missing)")
        elif pil_format == "BMP":
            decoder, _extents, offset, args = img.tile[0]
            # Pillow's raw tile args are (rawmode, stride, orientation).
            stride = args[1] if decoder == "raw" and isinstance(args, tuple) and len(args) > 1 else None
            if isinstance(stride, int):
                needed = offset + stride * img.height
            else:
                # RLE: biSizeImage (mandatory for compressed BMPs) says where the pixel data ends.
                (rle_size,) = struct.unpack_from("<I", data, 34)
                needed = offset + rle_size if rle_size else len(data) + 1
            if len(data) < needed:
                raise _truncated(path, f"BMP ({len(data):,} of {needed:,} bytes)")
    except MediaError:
        raise
    except Exception as exc:  # Same as in _open_image: corrupt data surfaces as many exception types.
        raise _damaged(path, pil_format, exc, "its data is corrupt") from None
    finally:
        img.close()


def inspect_image(path: Path) -> ImageInfo:
    """Check a portrait against every local rule of the detect and synthesis APIs, then describe it.

    The order is cheapest-first and never decodes pixels of a file already known to be unacceptable: stat
    (existence, type, size) → magic bytes → header (format, dimensions, bomb guard) → integrity.
    """
    path = Path(path)
    data = _read_regular_file(
        path,
        what="image",
        max_bytes=IMAGE_MAX_BYTES,
        advice="resize or recompress it (JPEG quality 90 is plenty)",
    )
    pil_format = _sniff_image(data)
    if pil_format is None:
        raise MediaError(path, f"unsupported format {_name_unsupported_image(data)}; use {_IMAGE_KINDS}")
    if pil_format == "WEBP":
        riff_end = 8 + int.from_bytes(data[4:8], "little")
        if len(data) < riff_end:
            raise _truncated(path, f"WEBP ({len(data):,} of {riff_end:,} bytes)")
        if (declared := _webp_canvas_size(data)) is not None:
            _check_dimensions(path, *declared)
    img = _open_image(path, data, pil_format)
    orientation = _orientation(img)[0]
    width, height = img.size[::-1] if orientation in _TURNED else img.size
    try:
        _check_dimensions(path, width, height)
    except MediaError:
        img.close()
        raise
    _check_image_integrity(path, img, data, pil_format)
    fmt, content_type, suffix = _IMAGE_FORMATS[pil_format]
    return ImageInfo(
        path=path,
        format=fmt,
        width=width,
        height=height,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=content_type,
        suffix=suffix,
        data=_kept(data),
        orientation=orientation,
    )


_TURNED: Final = frozenset({5, 6, 7, 8})
"""EXIF Orientations whose upright picture has width and height swapped."""

_UPRIGHT: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""What a viewer does to the stored pixels for each EXIF Orientation (TIFF tag 274), as `ImageOps.exif_transpose`."""


def _orientation(img: ImageFile.ImageFile) -> tuple[int, bytes]:
    """The EXIF Orientation Pillow found before the pixels (JPEG APP1, PNG eXIf, WEBP EXIF), and for 2–8 the EXIF
    block with it set to 1 (for the upright copy; everything else in it kept byte for byte). (1, b"") when absent,
    unreadable or out of range: the file is then sent as it is.

    Read here, not with `Image.getexif`: Pillow warns on the malformed EXIF that editors and old cameras write (and a
    warning filter is process-wide state, see the module docstring), and its PNG plugin decodes the whole image to
    look for an `eXIf` chunk after the pixel data."""
    exif = img.info.get("exif")
    if not isinstance(exif, bytes):
        return 1, b""
    base = 6 if exif.startswith(b"Exif\x00\x00") else 0
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(exif[base : base + 4])
    if order is None:
        return 1, b""
    try:
        (ifd,) = struct.unpack_from(order + "I", exif, base + 4)
        (count,) = struct.unpack_from(order + "H", exif, base + ifd)
        for entry in range(base + ifd + 2, base + ifd + 2 + 12 * count, 12):
            tag, kind, n, value = struct.unpack_from(order + "HHIH", exif, entry)
            if tag == 0x0112:
                if kind != 3 or n != 1 or value not in _UPRIGHT:  # one SHORT, 2–8
                    return 1, b""
                return value, exif[: entry + 8] + struct.pack(order + "H", 1) + exif[entry + 10 :]
    except struct.error:  # an offset or a count past the end of the block
        pass
    return 1, b""


def upright_image(path: Path, sha256: str, data: bytes | None = None) -> bytes:
    """The photo as viewers show it: its EXIF Orientation applied to the pixels and set to 1 (the rest of its EXIF
    and its colour profile kept as they are), re-encoded in its own format: JPEG with its own quantisation tables and
    chroma subsampling, so about as large and as sharp; PNG and lossless WEBP without loss.

    Phone cameras store the sensor's pixels and an Orientation tag; whether the service applies the tag is not
    documented, and a face lying on its side is a paid "No human face detected.". Upright pixels tagged 1 are right
    either way. Decodes the image: CPU work, for a worker thread. `data`: the checked bytes when the caller still
    holds them; else `path` is read again and must still hash to `sha256`. A photo without an Orientation to apply
    is returned as it is.
    """
    path = Path(path)
    if data is None:
        data = _read_regular_file(path, what="image", max_bytes=IMAGE_MAX_BYTES, advice="")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise MediaError(path, "changed since it was checked — run again to check the new file")
    pil_format = _sniff_image(data)
    if pil_format is None:
        raise MediaError(path, f"unsupported format {_name_unsupported_image(data)}; use {_IMAGE_KINDS}")
    out = io.BytesIO()
    with _open_image(path, data, pil_format) as img:
        orientation, exif = _orientation(img)
        if orientation == 1:
            return data
        try:
            upright = img.transpose(_UPRIGHT[orientation])  # decodes
        except Exception as exc:  # as in _open_image: damaged data surfaces as many exception types
            raise _damaged(path, pil_format, exc, "its data is corrupt") from None
        options: dict[str, object] = {"exif": exif}
        if icc := img.info.get("icc_profile"):
            options["icc_profile"] = icc
        if pil_format == "JPEG":
            assert isinstance(img, JpegImagePlugin.JpegImageFile)
            options["qtables"] = img.quantization
            if (sampling := JpegImagePlugin.get_sampling(img)) != -1:
                options["subsampling"] = sampling
        elif pil_format == "WEBP" and data[12:16] == b"VP8L":
            options["lossless"] = True
        elif pil_format == "WEBP":
            options["quality"] = 90
        upright.save(out, format=pil_format, **options)
    turned = out.getvalue()
    _check_size(
        path,
        len(turned),
        what="image",
        max_bytes=IMAGE_MAX_BYTES,
        advice="it is stored turned (EXIF Orientation) and, turned upright, no longer fits; export it upright "
        "at a lower quality",
    )
    return turned


# ----------------------------------------------------------------------------------------------------- audio


def _is_mpeg_audio_frame(head: bytes) -> bool:
    """An MPEG-1/2/2.5 Layer III frame header, strict enough that text or AAC never passes for MP3."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version = (head[1] >> 3) & 0b11
    layer = (head[1] >> 1) & 0b11
    bitrate_index = head[2] >> 4
    rate_index = (head[2] >> 2) & 0b11
    return version != 0b01 and layer == 0b01 and bitrate_index not in (0b0000, 0b1111) and rate_index != 0b11


def _sniff_audio(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:3] == b"ID3" or _is_mpeg_audio_frame(data[:4]):
        return "mp3"
    return None


def _name_unsupported_audio(data: bytes) -> str:
    brand = _iso_brand(data)
    if brand is not None:
        return "M4A/MP4 (AAC)"
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xF6 == 0xF0:
        return "AAC (ADTS)"
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "MPEG audio that is not Layer III (MP1/MP2)"
    for magic, name in (
        (b"fLaC", "FLAC"),
        (b"OggS", "Ogg (Vorbis/Opus)"),
        (b"\x1aE\xdf\xa3", "WebM/Matroska"),
        (b"#!AMR", "AMR"),
        (b"RF64", "RF64 (a WAV variant for files over 4 GB)"),
    ):
        if data.startswith(magic):
            return name
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if data[:4] == b"RIFF":
        return f"RIFF/{data[8:12].decode('latin-1')!r} (not WAVE)"
    if _looks_like_text(data[:512]):
        return "text (not audio at all)"
    return "unknown (not recognisable audio)"


def _wav_data_problem(data: bytes) -> str | None:
    """Say what is structurally wrong with a RIFF/WAVE file, or None.

    mutagen computes the duration from the data chunk's declared size, so a truncated file (or a recorder's
    never-finalised 0 / 0xFFFFFFFF placeholder) would yield a duration the service would not agree with.
    """
    offset = 12
    seen_fmt = False
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (chunk_size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if chunk_id == b"fmt ":
            seen_fmt = True
            if chunk_size >= 16 and body + 16 <= len(data):
                _tag, channels, rate, _byte_rate, block_align = struct.unpack_from("<HHIIH", data, body)
                if not channels or not rate or not block_align:
                    return f"its 'fmt ' chunk is impossible ({channels} channels, {rate} Hz, {block_align}-byte frames)"
        elif chunk_id == b"data":
            if not seen_fmt:
                return "its 'data' chunk comes before the 'fmt ' chunk that describes it"
            if chunk_size == 0 or chunk_size == 0xFFFFFFFF:
                return "its header was never finalised (the audio length field is a placeholder)"
            if body + chunk_size > len(data):
                return (
                    f"is truncated: the header promises {chunk_size:,} bytes of audio "
                    f"but only {len(data) - body:,} are present"
                )
            return None
        offset = body + chunk_size + (chunk_size & 1)  # RIFF chunks are padded to even sizes.
    if not seen_fmt:
        return "it has no 'fmt ' chunk"
    return "it has no 'data' chunk"


def _audio_duration(path: Path, data: bytes, fmt: str) -> float:
    if fmt == "wav":
        problem = _wav_data_problem(data)
        if problem is not None:
            raise MediaError(path, f"is a broken WAV: {problem} — re-export it as 16-bit PCM WAV or MP3")
    try:
        # getattr: mutagen leaves `info` None for some malformed files instead of raising.
        length = getattr((WAVE if fmt == "wav" else MP3)(io.BytesIO(data)).info, "length", None)
    except Exception as exc:  # mutagen raises its own errors but also struct/ValueError/ZeroDivision on junk.
        if fmt == "wav":
            problem = f"has a broken WAV header ({_one_line(exc)})"
        else:
            problem = "is an MP3 without valid audio frames"
        raise MediaError(path, f"{problem} — re-export it as 16-bit PCM WAV or MP3") from None
    if not isinstance(length, int | float) or not math.isfinite(length) or length < 0:
        raise MediaError(path, f"has an unreadable duration ({length!r}) — re-export it as WAV or MP3")
    return float(length)


def inspect_audio(path: Path, *, max_seconds: float = AUDIO_MAX_SECONDS) -> AudioInfo:
    """Check a voice track against the synthesis API's limits (§3), then describe it.

    Duration rule, as the current docs write it: 1 s < duration < `max_seconds` (180 s by default, "< 3 min"). Both
    bounds are exclusive, so clips of exactly 1.0 s and of exactly 180.0 s are refused: the error text ("between
    1s and 180s") could also be read inclusively, and refusing here costs nothing while a refusal at submit comes
    after the paid detect.
    """
    if not max_seconds > AUDIO_MIN_SECONDS:
        raise ValueError(f"max_seconds must be greater than {AUDIO_MIN_SECONDS}, got {max_seconds!r}")
    path = Path(path)
    data = _read_regular_file(
        path,
        what="audio",
        max_bytes=AUDIO_MAX_BYTES,
        advice="trim it or re-encode it as MP3 (128 kbps is plenty)",
    )
    fmt = _sniff_audio(data)
    if fmt is None:
        raise MediaError(path, f"unsupported format {_name_unsupported_audio(data)}; use {_AUDIO_KINDS}")
    duration = _audio_duration(path, data, fmt)
    if duration <= AUDIO_MIN_SECONDS:
        raise MediaError(
            path,
            f"is {duration:.2f} s long; audio must be longer than {AUDIO_MIN_SECONDS:g} s — use a longer clip",
        )
    if duration >= max_seconds:
        raise MediaError(
            path,
            f"is {duration:.1f} s long; audio must be shorter than {max_seconds:g} s — trim it or split it into parts",
        )
    content_type, suffix = _AUDIO_FORMATS[fmt]
    return AudioInfo(
        path=path,
        format=fmt,
        duration_s=duration,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=content_type,
        suffix=suffix,
        data=_kept(data),
    )


# ------------------------------------------------------------------------------------------------- hashing


# ----------------------------------------------------------------------------------------------------- video


# Top-level boxes of ISO/IEC 14496-12 files as encoders write them (plain, fast-start and fragmented MP4).
_TOP_LEVEL_BOXES: Final = frozenset(
    {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"uuid", b"moof", b"mfra", b"meta", b"pdin"}
    | {b"styp", b"sidx", b"ssix", b"prft", b"emsg"}
)


def _box_type_ok(box_type: bytes) -> bool:
    # ISO-BMFF types are four printable characters; Apple also uses "©" (0xA9) as the first byte.
    return all(0x20 <= b <= 0x7E for b in box_type[1:]) and (0x20 <= box_type[0] <= 0x7E or box_type[0] == 0xA9)


def verify_mp4(path: Path, *, expected_size: int | None = None) -> None:
    """Prove a downloaded result is a complete MP4 before the batch records it as done.

    A cut or garbled download is otherwise only noticed by whoever watches the video, long after the 24 h
    result URL has expired. Walking the top-level boxes catches both: a truncated file has a last box running
    past EOF, a garbled one has box headers that make no sense. Only headers are read (seek + 16 bytes per
    box), so multi-hundred-MB files cost microseconds.
    """
    path = Path(path)
    redo = "download it again"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise MediaError(path, _describe_oserror(exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(path, f"is not a regular file — expected a downloaded MP4; {redo}")
    size = st.st_size
    if expected_size is not None and size != expected_size:
        raise MediaError(
            path,
            f"is {size:,} bytes but the server announced {expected_size:,}; "
            f"the download is incomplete or corrupt — {redo}",
        )
    try:
        with open(path, "rb") as fh:
            check_mp4_boxes(fh, size, path)
    except OSError as exc:
        raise MediaError(path, _describe_oserror(exc)) from None


def check_mp4_boxes(fh: BinaryIO, size: int, path: Path) -> list[tuple[bytes, int, int]]:
    """The box walk of `verify_mp4` over an open file of `size` bytes (the download checks the `.part` file it has
    just written through the same handle: no second open and stat per video). Returns the top-level boxes as
    (type, offset, size), which the recipe tag uses to find `moov` without walking the file again."""
    redo = "download it again"
    if size == 0:
        raise MediaError(path, f"is empty (0 bytes), the download produced nothing — {redo}")
    boxes: list[tuple[bytes, int, int]] = []
    fh.seek(0)
    offset = 0
    while offset < size:
        header = fh.read(8)
        if len(header) < 8:
            raise MediaError(
                path,
                f"is truncated or corrupt: {len(header)} stray bytes follow the last complete box — {redo}",
            )
        box_size, box_type = struct.unpack(">I4s", header)
        header_len = 8
        if box_size == 1:
            large = fh.read(8)
            if len(large) < 8:
                raise MediaError(path, f"is truncated inside a box header at offset {offset:,} — {redo}")
            (box_size,) = struct.unpack(">Q", large)
            header_len = 16
        elif box_size == 0:  # "extends to end of file" — legal for the last box only, by definition.
            box_size = size - offset
        if offset == 0 and box_type != b"ftyp":
            raise MediaError(path, f"is not an MP4 file (it does not start with an 'ftyp' box) — {redo}")
        if not _box_type_ok(box_type):
            raise MediaError(path, f"is corrupt: garbage box header at offset {offset:,} ({header.hex()}) — {redo}")
        shown = box_type.decode("latin-1")
        if box_size < header_len or (box_type == b"ftyp" and box_size < header_len + 8):
            raise MediaError(
                path,
                f"is corrupt: box '{shown}' at offset {offset:,} has impossible size {box_size} — {redo}",
            )
        if offset + box_size > size:
            # A known box running past EOF is the signature of a cut download; an unknown one is
            # more likely a garbled header whose "size" is noise.
            what = "truncated" if box_type in _TOP_LEVEL_BOXES else "corrupt or truncated"
            raise MediaError(
                path,
                f"is {what}: box '{shown}' at offset {offset:,} needs {box_size:,} bytes"
                f" but the file ends {offset + box_size - size:,} bytes early — {redo}",
            )
        boxes.append((box_type, offset, box_size))
        offset += box_size
        fh.seek(offset)
    seen = {box_type for box_type, _, _ in boxes}
    missing = [name for name in (b"moov", b"mdat") if name not in seen]
    if missing:
        names = " and ".join(f"'{m.decode()}'" for m in missing)
        raise MediaError(path, f"is not a playable MP4: it has no {names} box — {redo}")
    return boxes
