"""Local media checks: every refusal here is a paid API call that never happens.

All fixtures are generated in tmp_path (Pillow, wave, hand-built MP3 frames and MP4 boxes); the only binary
file in the repository is the demo voice clip, which is checked as a known-good input.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import pickle
import stat
import struct
import time
import tracemalloc
import wave
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFile

from lpengine import media
from lpengine.media import (
    AudioInfo,
    ImageInfo,
    MediaError,
    inspect_audio,
    inspect_image,
    verify_mp4,
)

MIB = 1024 * 1024
ASSETS = Path(media.__file__).parent / "assets"

# Property tests write a file per example; tmp_path is shared across examples on purpose.
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------------ builders


def portrait(size: tuple[int, int] = (300, 300), mode: str = "RGB") -> Image.Image:
    """A cheap stand-in for a portrait: flat background, a 'face', some edges for the encoders to chew on."""
    img = Image.new("RGB", size, (182, 201, 222))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.ellipse((w * 0.3, h * 0.2, w * 0.7, h * 0.75), fill=(231, 190, 160), outline=(90, 60, 40), width=3)
    draw.rectangle((w * 0.42, h * 0.6, w * 0.58, h * 0.64), fill=(160, 60, 60))
    return img.convert(mode)


def save_image(path: Path, fmt: str, size: tuple[int, int] = (300, 300), **kw: object) -> Path:
    portrait(size).save(path, fmt, **kw)
    return path


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A structurally valid PNG whose header claims any size while the file stays tiny (a 'bomb' header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def write_wav(path: Path, seconds: float, *, rate: int = 8000, sampwidth: int = 1, frames: int | None = None) -> Path:
    n = round(seconds * rate) if frames is None else frames
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(sampwidth)
        w.setframerate(rate)
        silence = b"\x80" if sampwidth == 1 else b"\x00" * sampwidth
        w.writeframes(silence * n)
    return path


# MPEG-1 Layer III, 128 kbit/s, 44.1 kHz, no CRC, no padding: 417-byte frames of 1152 samples each.
MP3_FRAME = b"\xff\xfb\x90\x00" + b"\x00" * 413
MP3_FRAME_SECONDS = 1152 / 44100


def mp3_bytes(seconds: float, *, id3: bool = False) -> bytes:
    body = MP3_FRAME * math.ceil(seconds / MP3_FRAME_SECONDS)
    if id3:
        tag = b"TIT2" + struct.pack(">I", 6) + b"\x00\x00" + b"\x03demo\x00"
        body = b"ID3\x03\x00\x00" + bytes([0, 0, 0, len(tag)]) + tag + body
    return body


def box(kind: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def minimal_mp4(*, mdat_payload: bytes = b"\x00" * 64) -> bytes:
    ftyp = box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41")
    moov = box(b"moov", box(b"mvhd", b"\x00" * 100))
    return ftyp + moov + box(b"free") + box(b"mdat", mdat_payload)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(MediaError) as info:
        call()
    err = info.value
    assert str(err) == f"{err.path}: {err.reason}"
    assert "\n" not in err.reason and "Traceback" not in err.reason
    assert " — " in err.reason or "; use " in err.reason, "every reason must also say what to do"
    return err.reason


# ----------------------------------------------------------------------------------------------- MediaError


def test_media_error_shape_and_pickling() -> None:
    err = MediaError(Path("/x/a b.png"), "is empty (0 bytes) — replace it")
    assert err.path == "/x/a b.png"
    assert str(err) == "/x/a b.png: is empty (0 bytes) — replace it"
    clone = pickle.loads(pickle.dumps(err))  # crosses process pools intact
    assert (clone.path, clone.reason) == (err.path, err.reason)


# --------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("fmt", "name", "expected"),
    [
        ("JPEG", "a.jpg", ("jpeg", "image/jpeg", ".jpg")),
        ("PNG", "a.png", ("png", "image/png", ".png")),
        ("BMP", "a.bmp", ("bmp", "image/bmp", ".bmp")),
        ("WEBP", "a.webp", ("webp", "image/webp", ".webp")),
    ],
)
def test_good_images_are_described(tmp_path: Path, fmt: str, name: str, expected: tuple[str, str, str]) -> None:
    path = save_image(tmp_path / name, fmt, (320, 240))
    info = inspect_image(path)
    assert isinstance(info, ImageInfo)
    assert (info.format, info.content_type, info.suffix) == expected
    assert (info.width, info.height) == (320, 240)
    assert info.size == path.stat().st_size
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.path == path


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_lossless_webp_and_palette_png_are_accepted(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    portrait((200, 150)).convert("P").save(path, fmt, lossless=True)
    assert inspect_image(path).format == fmt.lower()


def test_format_comes_from_bytes_not_name(tmp_path: Path) -> None:
    path = save_image(tmp_path / "actually_png.jpg", "PNG")
    info = inspect_image(path)
    assert (info.format, info.suffix, info.content_type) == ("png", ".png", "image/png")


def test_unicode_and_spaces_in_names(tmp_path: Path) -> None:
    folder = tmp_path / "Фото портретов 2024"
    folder.mkdir()
    path = save_image(folder / "张伟 – portrait (1).JPG", "JPEG")
    assert inspect_image(path).format == "jpeg"
    assert inspect_image(Path(str(path))).path == path


def test_str_path_is_accepted(tmp_path: Path) -> None:
    path = save_image(tmp_path / "a.png", "PNG")
    assert inspect_image(str(path)).path == path  # type: ignore[arg-type]


def test_empty_file(tmp_path: Path) -> None:
    assert "empty (0 bytes)" in reason_of(lambda: inspect_image(write(tmp_path / "e.jpg", b"")))


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in reason_of(lambda: inspect_image(tmp_path / "nope.png"))


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    assert "is a directory" in reason_of(lambda: inspect_image(tmp_path / "dir.png"))


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert "not a regular file" in reason_of(lambda: inspect_image(fifo))


def test_permission_denied_is_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, which reads anything, so the OS error is simulated where the module opens files.
    path = save_image(tmp_path / "locked.png", "PNG")

    def denied(*_args: object, **_kw: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(media, "open", denied, raising=False)
    assert "permission denied" in reason_of(lambda: inspect_image(path))
    assert "permission denied" in reason_of(lambda: inspect_audio(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file_for_real(tmp_path: Path) -> None:
    path = save_image(tmp_path / "locked.png", "PNG")
    path.chmod(0)
    try:
        assert "permission denied" in reason_of(lambda: inspect_image(path))
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"hello, I am a text file pretending to be a photo\n", "text"),
        ("こんにちは、これは画像ではありません".encode(), "text"),
        (b"II*\x00" + b"\x00" * 64, "TIFF"),
        (b"MM\x00*" + b"\x00" * 64, "TIFF"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "HEIC"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1" + b"\x00" * 64, "AVIF"),
        (b"%PDF-1.7\n" + b"\x00" * 64, "PDF"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (bytes(range(256)) * 4, "unknown"),
    ],
)
def test_unsupported_formats_are_named(tmp_path: Path, data: bytes, named: str) -> None:
    reason = reason_of(lambda: inspect_image(write(tmp_path / "photo.jpg", data)))
    assert reason.startswith("unsupported format ")
    assert named in reason
    assert reason.endswith("use JPEG, PNG, BMP or WEBP")


def test_gif_is_refused_even_when_named_png(tmp_path: Path) -> None:
    path = tmp_path / "anim.png"
    portrait().save(path, "GIF")
    assert reason_of(lambda: inspect_image(path)) == "unsupported format GIF; use JPEG, PNG, BMP or WEBP"


def test_size_limit_is_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_image(tmp_path / "big.png", "PNG")
    with path.open("r+b") as fh:  # valid PNG start, sparse tail: the size alone must refuse it
        fh.truncate(10 * MIB + 1)

    def no_decode(*_a: object, **_k: object) -> None:
        raise AssertionError("decoded a file that is too big")

    monkeypatch.setattr(media, "open", no_decode, raising=False)
    monkeypatch.setattr(Image, "open", no_decode)
    reason = reason_of(lambda: inspect_image(path))
    assert reason.startswith("is 10.0 MiB (10,485,761 bytes); image files must be under 10 MiB")
    assert "resize or recompress" in reason


def test_real_big_bmp_is_refused_by_size(tmp_path: Path) -> None:
    path = tmp_path / "huge.bmp"
    Image.new("RGB", (2048, 1800), (10, 20, 30)).save(path, "BMP")
    assert path.stat().st_size > 10 * MIB
    assert reason_of(lambda: inspect_image(path)).startswith("is 10.5 MiB; image files must be under 10 MiB")


def test_size_limit_boundary(tmp_path: Path) -> None:
    """Under 10 MB: 10*1024*1024 - 1 bytes is fine, 10*1024*1024 is not (padding after IEND is legal)."""
    path = save_image(tmp_path / "edge.png", "PNG")
    with path.open("r+b") as fh:
        fh.truncate(10 * MIB - 1)
    assert inspect_image(path).size == 10 * MIB - 1
    with path.open("r+b") as fh:
        fh.truncate(10 * MIB)
    assert "must be under 10 MiB" in reason_of(lambda: inspect_image(path))


@pytest.mark.parametrize(
    ("size", "ok"),
    [
        ((4096, 2048), True),
        ((2048, 4096), True),
        ((4097, 2100), False),
        ((2100, 4097), False),
        ((200, 100), True),
        ((100, 200), True),
        ((201, 100), False),
        ((100, 201), False),
        ((2001, 1000), False),
        ((1, 1), True),
    ],
)
def test_dimension_rules(tmp_path: Path, size: tuple[int, int], ok: bool) -> None:
    path = tmp_path / "dims.png"
    Image.new("1", size).save(path, "PNG")  # mode "1": a 4097 px image is a few hundred bytes
    if ok:
        info = inspect_image(path)
        assert (info.width, info.height) == size
    else:
        reason = reason_of(lambda: inspect_image(path))
        assert f"is {size[0]}x{size[1]} px" in reason
        assert ("4096 px" in reason) == (max(size) > 4096)


def test_aspect_message_shows_a_ratio_that_is_visibly_over_two(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("1", (2001, 1000)).save(path, "PNG")
    reason = reason_of(lambda: inspect_image(path))
    assert "aspect ratio 2.001;" in reason and "crop" in reason
    Image.new("1", (201, 100)).save(path, "PNG")
    assert "aspect ratio 2.01;" in reason_of(lambda: inspect_image(path))


def test_decompression_bomb_header_is_refused_fast_without_allocating(tmp_path: Path) -> None:
    path = write(tmp_path / "bomb.png", png_header_only(100_000, 100_000))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        reason = reason_of(lambda: inspect_image(path))
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "decompression bomb" in reason
    assert elapsed < 0.5
    assert peak < 5 * MIB
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the global guard is left alone


@pytest.mark.parametrize("warnings_as", ["error", "ignore"])
def test_bomb_between_pillow_warning_and_error_thresholds(
    tmp_path: Path, warnings_as: Literal["error", "ignore"]
) -> None:
    """10000x10000 is 1x..2x MAX_IMAGE_PIXELS: Pillow only warns; refused either way, by our rules."""
    import warnings

    path = write(tmp_path / "bomb.png", png_header_only(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter(warnings_as)
        reason = reason_of(lambda: inspect_image(path))
    assert "decompression bomb" in reason or "10000x10000 px" in reason


def test_webp_bomb_header_is_refused_before_libwebp_allocates(tmp_path: Path) -> None:
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (16383).to_bytes(3, "little") * 2
    data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    path = write(tmp_path / "bomb.webp", data)
    tracemalloc.start()
    try:
        reason = reason_of(lambda: inspect_image(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "16384x16384 px" in reason
    assert peak < 5 * MIB


@pytest.mark.parametrize(("fmt", "step"), [("JPEG", 7), ("PNG", 3), ("BMP", 97), ("WEBP", 5)])
def test_every_truncation_is_refused(tmp_path: Path, fmt: str, step: int) -> None:
    """A cut anywhere — header, pixels, trailer — must be refused (sampled every `step` bytes + the ends)."""
    good = tmp_path / "good"
    save_image(good, fmt, (120, 90), **({"quality": 85} if fmt == "JPEG" else {}))
    data = good.read_bytes()
    inspect_image(good)
    cut = tmp_path / "cut"
    for length in sorted({*range(1, len(data), step), len(data) - 1, len(data) - 2, len(data) - 4}):
        cut.write_bytes(data[:length])
        with pytest.raises(MediaError):
            inspect_image(cut)


@pytest.mark.parametrize(("fmt", "expected"), [("JPEG", "End-Of-Image"), ("PNG", "PNG")])
def test_truncated_photo_message(tmp_path: Path, fmt: str, expected: str) -> None:
    good = save_image(tmp_path / "good", fmt, (640, 480))
    path = write(tmp_path / "cut", good.read_bytes()[: good.stat().st_size // 2])
    reason = reason_of(lambda: inspect_image(path))
    assert "truncated" in reason and expected in reason and "re-download" in reason


def test_truncated_jpeg_with_an_eoi_inside_its_exif_is_still_refused(tmp_path: Path) -> None:
    """An EXIF thumbnail carries its own FF D9; only an EOI after the first scan counts."""
    fake_thumbnail = b"\xff\xd8\xff\xdb" + b"\x00" * 40 + b"\xff\xd9"
    path = tmp_path / "exif.jpg"
    portrait((400, 300)).save(path, "JPEG", exif=b"Exif\x00\x00" + fake_thumbnail)
    data = path.read_bytes()
    assert data.find(b"\xff\xd9") < len(data) - 2
    inspect_image(path)
    cut = write(tmp_path / "cut.jpg", data[: len(data) * 3 // 4])
    assert "End-Of-Image" in reason_of(lambda: inspect_image(cut))


@pytest.mark.parametrize("kind", ["progressive", "mpo", "cmyk", "grayscale"])
def test_jpeg_variants(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "v.jpg"
    img = portrait((240, 320))
    if kind == "progressive":
        img.save(path, "JPEG", progressive=True)
    elif kind == "mpo":
        img.save(path, "MPO", save_all=True, append_images=[portrait((240, 320), "L").convert("RGB")])
    else:
        img.convert("CMYK" if kind == "cmyk" else "L").save(path, "JPEG")
    info = inspect_image(path)
    assert (info.format, info.width, info.height) == ("jpeg", 240, 320)
    cut = write(tmp_path / "cut.jpg", path.read_bytes()[:2000])
    with pytest.raises(MediaError):
        inspect_image(cut)


def test_file_that_changes_while_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_image(tmp_path / "growing.png", "PNG")
    real_stat = os.stat

    def stale_stat(p: object) -> os.stat_result:
        st_ = real_stat(p)  # type: ignore[arg-type]
        fields = list(st_)
        fields[stat.ST_SIZE] = st_.st_size - 100  # as if the copy was still in progress at stat time
        return os.stat_result(fields)

    monkeypatch.setattr(os, "stat", stale_stat)
    assert "changed size while being read" in reason_of(lambda: inspect_image(path))


def test_png_with_corrupt_crc_is_refused(tmp_path: Path) -> None:
    data = bytearray(save_image(tmp_path / "good.png", "PNG").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    reason = reason_of(lambda: inspect_image(write(tmp_path / "bad.png", bytes(data))))
    assert reason.startswith("is not a valid PNG: its data is corrupt (broken PNG file")


def test_integrity_checks_never_decode_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost rule: JPEG/PNG/WEBP/uncompressed BMP are judged from structure, never by decoding."""

    def no_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    for fmt in ("JPEG", "PNG", "BMP"):
        assert inspect_image(save_image(tmp_path / f"a.{fmt}", fmt)).width == 300
    # Pillow's WEBP plugin overrides load(); it must not be called either.
    from PIL import WebPImagePlugin

    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", no_load)
    assert inspect_image(save_image(tmp_path / "a.webp", "WEBP")).width == 300


def test_rle_bmp_completeness_comes_from_its_declared_size(tmp_path: Path) -> None:
    # A 4x2 8-bit RLE8 BMP: two rows of "4 pixels of colour 1", end-of-line, end-of-bitmap.
    palette = b"\x00\x00\x00\x00" + b"\xff\xff\xff\x00" + b"\x00" * 4 * 254
    pixels = b"\x04\x01\x00\x00" * 2 + b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, 4, 2, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    data = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels
    assert inspect_image(write(tmp_path / "rle.bmp", data)).size == len(data)
    for cut in (1, 2, 7):
        path = write(tmp_path / "cut.bmp", data[:-cut])
        assert "truncated BMP" in reason_of(lambda: inspect_image(path))  # noqa: B023 (called at once)


def webp_around(tail: bytes) -> bytes:
    """RIFF size consistent with the data, so fuzzing reaches libwebp instead of the truncation check."""
    body = b"WEBPVP8 " + tail
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    "wrap",
    [
        lambda t: b"\xff\xd8\xff" + t,
        lambda t: b"\x89PNG\r\n\x1a\n" + t,
        lambda t: b"BM" + t,
        webp_around,
        lambda t: t,
    ],
    ids=["jpeg", "png", "bmp", "webp", "raw"],
)
@FUZZ
@given(tail=st.binary(max_size=600))
def test_inspect_image_only_ever_raises_media_error(
    tmp_path: Path, wrap: Callable[[bytes], bytes], tail: bytes
) -> None:
    data = wrap(tail)
    try:
        info = inspect_image(write(tmp_path / "fuzz.jpg", data))
    except MediaError as err:
        assert err.reason and "\n" not in err.reason
    else:
        assert info.size == len(data)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=4))
def test_bit_flipped_real_images_only_ever_raise_media_error(tmp_path: Path, flips: list[tuple[int, int]]) -> None:
    for fmt in ("JPEG", "PNG", "WEBP", "BMP"):
        src = tmp_path / f"src.{fmt}"
        if not src.exists():
            save_image(src, fmt, (64, 48))
        data = bytearray(src.read_bytes())
        for pos, mask in flips:
            data[pos % len(data)] ^= mask
        with contextlib.suppress(MediaError):
            inspect_image(write(tmp_path / "flipped", bytes(data)))


# --------------------------------------------------------------------------------------- EXIF orientation

# How each EXIF Orientation was stored, as the inverse of what a viewer applies (Pillow's `ImageOps.exif_transpose`).
STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def save_turned(path: Path, upright: Image.Image, orientation: int, fmt: str, **kw: object) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(STORED_AS[orientation]).save(path, fmt, exif=exif.tobytes(), **kw)
    return path


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_every_exif_orientation_is_turned_back_to_the_picture_a_viewer_shows(tmp_path: Path, orientation: int) -> None:
    """Lossless PNG: the upright copy is pixel for pixel the picture before it was stored turned, and its Orientation
    is 1 (a service that applies the tag must not turn it a second time)."""
    upright = portrait((300, 200))
    path = save_turned(tmp_path / "turned.png", upright, orientation, "PNG")
    info = inspect_image(path)
    assert (info.orientation, info.width, info.height) == (orientation, 300, 200)
    with Image.open(io.BytesIO(media.upright_image(path, info.sha256))) as copy:
        assert copy.format == "PNG"
        assert copy.getexif().get(0x0112) == 1
        assert copy.convert("RGB").tobytes() == upright.tobytes()


@pytest.mark.parametrize(("fmt", "growth"), [("JPEG", 1.2), ("WEBP", 2.0)])
def test_a_lossy_upright_copy_is_about_as_large_and_as_sharp_as_the_photo(
    tmp_path: Path, fmt: str, growth: float
) -> None:
    """JPEG keeps its own quantisation tables and subsampling: no surprise over the 10 MiB limit, no visible loss.
    (A WEBP's quality cannot be read back: it is written at 90.)"""
    upright = portrait((640, 480))
    path = save_turned(tmp_path / "turned", upright, 6, fmt, quality=85)
    info = inspect_image(path)
    data = media.upright_image(path, info.sha256)
    assert len(data) < growth * info.size
    with Image.open(io.BytesIO(data)) as copy:
        assert copy.size == (640, 480) and copy.format == fmt
        diff = [abs(a - b) for a, b in zip(copy.convert("RGB").tobytes(), upright.tobytes(), strict=True)]
        assert sum(diff) / len(diff) < 3


def test_a_turned_photo_is_judged_and_named_by_its_upright_size(tmp_path: Path) -> None:
    """Stored 2100x1000 and turned by its tag, the photo is 1000x2100 to the person who chose it."""
    path = save_turned(tmp_path / "tall.jpg", portrait((1000, 2100)), 6, "JPEG")
    assert "is 1000x2100 px, aspect ratio 2.10" in reason_of(lambda: inspect_image(path))


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00garbage",
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff",  # 65535 entries promised, none there
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x63\x00\x00",  # 99
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x04\x00\x00\x00\x01\x00\x00\x00\x06",  # a LONG
    ],
)
def test_unreadable_exif_leaves_the_photo_as_it_is(tmp_path: Path, exif: bytes) -> None:
    """Broken EXIF is common (editors, old cameras): the photo is not refused for it, and is sent as stored. (PNG:
    Pillow itself refuses a JPEG with some of these, before the orientation is looked at.)"""
    path = save_image(tmp_path / "odd.png", "PNG", exif=exif)
    info = inspect_image(path)
    assert info.orientation == 1
    assert media.upright_image(path, info.sha256) == path.read_bytes()


def test_an_upright_copy_is_never_made_of_a_file_changed_since_its_check(tmp_path: Path) -> None:
    path = save_turned(tmp_path / "turned.jpg", portrait(), 6, "JPEG")
    info = inspect_image(path)
    save_turned(path, portrait((320, 300)), 6, "JPEG")
    assert "changed since it was checked" in reason_of(lambda: media.upright_image(path, info.sha256))


# ---------------------------------------------------------------------------------------------------- audio


def test_good_wav(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "voice.wav", 2.0, rate=16000, sampwidth=2)
    info = inspect_audio(path)
    assert isinstance(info, AudioInfo)
    assert (info.format, info.content_type, info.suffix) == ("wav", "audio/wav", ".wav")
    assert info.duration_s == pytest.approx(2.0)
    assert info.size == path.stat().st_size
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("id3", [False, True])
def test_good_mp3_even_when_misnamed(tmp_path: Path, id3: bool) -> None:
    path = write(tmp_path / "voice.wav", mp3_bytes(2.0, id3=id3))
    info = inspect_audio(path)
    assert (info.format, info.content_type, info.suffix) == ("mp3", "audio/mpeg", ".mp3")
    assert info.duration_s == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize(
    ("kwargs", "ok"),
    [
        ({"seconds": 0.5}, False),
        ({"seconds": 1.0}, False),  # "1s < duration": exactly 1 s is refused
        ({"seconds": 0, "frames": 8001}, True),  # one frame more is fine
        ({"seconds": 2.0}, True),
        ({"seconds": 0, "frames": 180 * 8000 - 1}, True),  # just under 3 min
        ({"seconds": 180.0}, False),  # "duration < 3min": exactly 180 s is refused, like exactly 1 s
        ({"seconds": 0, "frames": 180 * 8000 + 1}, False),
        ({"seconds": 181.0}, False),
    ],
)
def test_duration_limits(tmp_path: Path, kwargs: dict[str, float], ok: bool) -> None:
    path = write_wav(tmp_path / "a.wav", kwargs["seconds"], frames=int(kwargs.get("frames", 0)) or None)
    if ok:
        assert inspect_audio(path).duration_s > 1.0
    else:
        reason = reason_of(lambda: inspect_audio(path))
        assert "longer than 1 s" in reason or "shorter than 180 s" in reason


def test_max_seconds_is_configurable(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "long.wav", 181.0)
    assert inspect_audio(path, max_seconds=300.0).duration_s == pytest.approx(181.0)
    assert "shorter than 60 s" in reason_of(lambda: inspect_audio(write_wav(tmp_path / "b.wav", 61), max_seconds=60))
    with pytest.raises(ValueError):
        inspect_audio(path, max_seconds=1.0)


def test_audio_size_limit(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "big.wav", 2.0)
    with path.open("r+b") as fh:
        fh.truncate(16 * MIB)
    reason = reason_of(lambda: inspect_audio(path))
    assert reason.startswith("is 16.0 MiB; audio files must be under 15 MiB")
    with path.open("r+b") as fh:
        fh.truncate(15 * MIB)
    assert "must be under 15 MiB" in reason_of(lambda: inspect_audio(path))


def test_audio_just_under_size_limit_is_accepted(tmp_path: Path) -> None:
    # A 2 s MP3 followed by zero padding: MP3 decoders skip non-frame bytes.
    path = write(tmp_path / "pad.mp3", mp3_bytes(2.0))
    with path.open("r+b") as fh:
        fh.truncate(15 * MIB - 1)
    assert inspect_audio(path, max_seconds=1000).size == 15 * MIB - 1


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"this is not an mp3, just some notes about the voice track\n" * 20, "text"),
        (b"fLaC" + b"\x00" * 200, "FLAC"),
        (b"OggS" + b"\x00" * 200, "Ogg"),
        (b"\xff\xf1\x50\x80" + b"\x00" * 200, "AAC"),
        (b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 200, "M4A"),
        (b"RIFF\x00\x01\x00\x00AVI LIST" + b"\x00" * 200, "RIFF"),
        (bytes(range(256)), "unknown"),
    ],
)
def test_unsupported_audio_is_named(tmp_path: Path, data: bytes, named: str) -> None:
    reason = reason_of(lambda: inspect_audio(write(tmp_path / "voice.mp3", data)))
    assert reason.startswith("unsupported format ") and named in reason and reason.endswith("use WAV or MP3")


def test_id3_tag_followed_by_text_is_refused(tmp_path: Path) -> None:
    data = b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"lyrics and notes, but no audio frames at all\n" * 50
    assert "MP3 without valid audio frames" in reason_of(lambda: inspect_audio(write(tmp_path / "v.mp3", data)))


@pytest.mark.parametrize(
    ("mangle", "expected"),
    [
        (lambda d: d[:12] + b"garbage!" * 8, "broken WAV"),
        (lambda d: d[:-4000], "truncated"),
        (lambda d: d[:40] + b"\xff\xff\xff\xff" + d[44:], "placeholder"),
        (lambda d: d[:40] + b"\x00\x00\x00\x00" + d[44:], "placeholder"),
        (lambda d: d[:12] + d[36:], "before the 'fmt ' chunk"),
        (lambda d: d[:24] + b"\x00\x00\x00\x00" + d[28:], "0 Hz"),
        (lambda d: d[:36], "no 'data' chunk"),
        (lambda d: d[:12], "no 'fmt ' chunk"),
    ],
)
def test_broken_wav_headers(tmp_path: Path, mangle: Callable[[bytes], bytes], expected: str) -> None:
    good = write_wav(tmp_path / "good.wav", 2.0).read_bytes()
    assert good[36:40] == b"data"  # canonical 44-byte header layout from the wave module
    reason = reason_of(lambda: inspect_audio(write(tmp_path / "bad.wav", mangle(good))))
    assert expected in reason and "re-export" in reason


def test_missing_audio_and_directory(tmp_path: Path) -> None:
    assert "does not exist" in reason_of(lambda: inspect_audio(tmp_path / "none.wav"))
    assert "is a directory" in reason_of(lambda: inspect_audio(tmp_path))
    assert "empty" in reason_of(lambda: inspect_audio(write(tmp_path / "z.wav", b"")))


@pytest.mark.parametrize("magic", [b"RIFF\x00\x10\x00\x00WAVEfmt ", b"ID3\x04\x00\x00", b"\xff\xfb\x90\x00", b""])
@FUZZ
@given(tail=st.binary(max_size=600))
def test_inspect_audio_only_ever_raises_media_error(tmp_path: Path, magic: bytes, tail: bytes) -> None:
    path = write(tmp_path / "fuzz.wav", magic + tail)
    try:
        inspect_audio(path)
    except MediaError as err:
        assert err.reason


def test_demo_voice_asset() -> None:
    path = ASSETS / "voice.wav"
    info = inspect_audio(path)
    assert info.format == "wav"
    assert 3.0 <= info.duration_s <= 4.5
    assert info.size < 200 * 1024
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
    assert "CC0" in (ASSETS / "README.md").read_text()


# ------------------------------------------------------------------------------------------------------ mp4


def test_minimal_mp4_passes(tmp_path: Path) -> None:
    data = minimal_mp4()
    path = write(tmp_path / "out.mp4", data)
    verify_mp4(path)
    verify_mp4(path, expected_size=len(data))


def test_mp4_large_size_and_to_eof_boxes(tmp_path: Path) -> None:
    head = minimal_mp4()[: -(8 + 64)]  # without the mdat
    payload = b"\x01" * 40
    largesize = struct.pack(">I4sQ", 1, b"mdat", 16 + len(payload)) + payload
    verify_mp4(write(tmp_path / "large.mp4", head + largesize))
    to_eof = struct.pack(">I4s", 0, b"mdat") + payload
    verify_mp4(write(tmp_path / "eof.mp4", head + to_eof))


@pytest.mark.parametrize("movflags", ["", "faststart", "frag_keyframe+empty_moov"])
def test_real_encoder_output_passes_and_its_truncations_fail(tmp_path: Path, movflags: str) -> None:
    """Box layouts as FFmpeg writes them (moov last, moov first, fragmented), as the emulator produces them."""
    av = pytest.importorskip("av")
    path = tmp_path / "real.mp4"
    with av.open(str(path), "w", options={"movflags": movflags} if movflags else {}) as container:
        stream = container.add_stream("h264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 64), (i * 20, 80, 160)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    verify_mp4(path, expected_size=len(data))
    for length in (len(data) - 1, len(data) // 2, 40):
        with pytest.raises(MediaError):
            verify_mp4(write(tmp_path / "cut.mp4", data[:length]))


def test_every_truncation_of_an_mp4_fails(tmp_path: Path) -> None:
    data = minimal_mp4()
    path = tmp_path / "cut.mp4"
    for length in range(len(data)):
        path.write_bytes(data[:length])
        with pytest.raises(MediaError):
            verify_mp4(path)


def test_truncated_mp4_message(tmp_path: Path) -> None:
    data = minimal_mp4(mdat_payload=b"\x00" * 5000)
    reason = reason_of(lambda: verify_mp4(write(tmp_path / "cut.mp4", data[:-1000])))
    assert "truncated" in reason and "'mdat'" in reason and "1,000 bytes early" in reason
    assert "download it again" in reason


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # a second box whose type is not four printable characters (fixed bytes: random ones sometimes form a
        # plausible header and fail differently)
        (b"\x00\x00\x00\x18ftypisom" + bytes(12) + b"\x00\x00\x00\x20\x8f\x01\xfe\x7f" + bytes(24), "garbage box"),
        (b"\x00\x00\x00\x10moovxxxx" + minimal_mp4(), "does not start with an 'ftyp' box"),
        (b"<html><body>403 Forbidden</body></html>", "does not start with an 'ftyp' box"),
        (minimal_mp4()[:32] + b"\x00\x00\x00\x04moov" + minimal_mp4()[32:], "impossible size"),
        (minimal_mp4()[:-72] + b"\x00\x00\x00\x10free\x00\x00\x00\x00\x00\x00\x00\x00", "no 'mdat' box"),
        (box(b"ftyp", b"isom\x00\x00\x00\x00") + box(b"mdat", b"x"), "no 'moov' box"),
        (minimal_mp4() + b"\x00\x00", "stray bytes"),
    ],
)
def test_corrupt_mp4s_fail(tmp_path: Path, data: bytes, expected: str) -> None:
    assert expected in reason_of(lambda: verify_mp4(write(tmp_path / "bad.mp4", data)))


def test_mp4_size_mismatch_fails(tmp_path: Path) -> None:
    data = minimal_mp4()
    path = write(tmp_path / "out.mp4", data)
    reason = reason_of(lambda: verify_mp4(path, expected_size=len(data) + 1))
    assert "announced" in reason
    assert "does not exist" in reason_of(lambda: verify_mp4(tmp_path / "gone.mp4"))
    assert "empty" in reason_of(lambda: verify_mp4(write(tmp_path / "z.mp4", b"")))
    assert "regular file" in reason_of(lambda: verify_mp4(tmp_path))


def test_verify_mp4_reads_headers_only(tmp_path: Path) -> None:
    path = write(tmp_path / "big.mp4", minimal_mp4()[: -(8 + 64)])
    with path.open("ab") as fh:
        fh.write(struct.pack(">I4s", 8 + 200 * MIB, b"mdat"))
        fh.truncate(fh.tell() + 200 * MIB)  # sparse: instant to create, and must be instant to verify
    started = time.perf_counter()
    verify_mp4(path)
    assert time.perf_counter() - started < 0.5


@FUZZ
@given(data=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x00\x00\x00\x10ftypisom\x00\x00\x00\x00"]))
def test_verify_mp4_only_ever_raises_media_error(tmp_path: Path, data: bytes, prefix: bytes) -> None:
    try:
        verify_mp4(write(tmp_path / "fuzz.mp4", prefix + data))
    except MediaError as err:
        assert err.reason


# --------------------------------------------------------------------------------------------------- hashing


def test_image_hash_matches_a_separate_read(tmp_path: Path) -> None:
    path = save_image(tmp_path / "h.jpg", "JPEG")
    assert inspect_image(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_is_fast_enough_for_big_batches(tmp_path: Path) -> None:
    """Loose guard (shared CI machines are noisy): the 300 px PNG budget is ~2 ms, measured well under it."""
    path = save_image(tmp_path / "p.png", "PNG")
    inspect_image(path)
    runs = 200
    started = time.perf_counter()
    for _ in range(runs):
        inspect_image(path)
    assert (time.perf_counter() - started) / runs < 0.01


def test_concurrent_calls_from_worker_threads_agree(tmp_path: Path) -> None:
    """The engine calls these from a thread pool; results must not depend on interleaving."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [
        save_image(tmp_path / f"t.{fmt}", fmt, (160 + i, 120)) for i, fmt in enumerate(("JPEG", "PNG", "BMP", "WEBP"))
    ]
    paths.append(write(tmp_path / "cut.png", paths[1].read_bytes()[:-20]))
    expected = []
    for p in paths:
        try:
            expected.append(inspect_image(p).sha256)
        except MediaError as err:
            expected.append(err.reason)

    def run(p: Path) -> str:
        try:
            return inspect_image(p).sha256
        except MediaError as err:
            return err.reason

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, paths * 40))
    assert results == expected * 40


def test_buffer_type_is_independent_of_filename(tmp_path: Path) -> None:
    """A file named .gif that is really a JPEG is a JPEG (the extension never decides)."""
    buf = io.BytesIO()
    portrait().save(buf, "JPEG")
    assert inspect_image(write(tmp_path / "x.gif", buf.getvalue())).suffix == ".jpg"
