"""Sample portraits (and non-portraits) for the demo, the tests and the benchmarks, made offline from the sample
images that ship inside scikit-image.

Sources and licences, as stated in scikit-image's `skimage.data` docstrings:

- `astronaut`: NASA photograph of astronaut Eileen Collins, "No known copyright restrictions, released into the
  public domain." Every portrait here is derived from it.
- `coffee`: Rachel Michetti, "No copyright restrictions. CC0 by the photographer."
- `rocket`: SpaceX launch photo of DSCOVR, "released in the public domain" by SpaceX.
- `hubble_deep_field`: NASA Hubble eXtreme Deep Field, "may be freely used in the public domain".

The derived files are released under the same terms (public domain / CC0).

Each generated portrait is a different crop, scale, brightness and mirror of the astronaut's head and shoulders,
plus a 2×16 grid of 4 px cells in the bottom-left corner that encodes its index, so every file has its own
sha256 (the emulator and the engine deduplicate by content) while the face stays large and frontal enough for
OpenCV's Haar cascade. Non-faces are named `noface-*` so that the emulator's OpenCV-free `rule` detector rejects
them as well. Everything is deterministic: the same call writes the same bytes. Checked with the emulator's `haar`
detector (OpenCV 4.14): the first 10 000 portraits pass and the first 6 000 non-faces fail.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageEnhance, ImageOps

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ensure_demo_assets", "make_non_faces", "make_portraits"]

# The astronaut's face in the 512×512 original (x, y, width, height), as OpenCV's frontal-face cascade finds it.
_FACE = (137, 51, 77, 77)
_NON_FACE_SOURCES = ("coffee", "rocket", "hubble_deep_field")  # not chelsea: a cat can fool the cascade


def _sample(name: str) -> Image.Image:
    try:
        from skimage import data
    except ImportError as error:
        raise RuntimeError(
            "demo assets are made from scikit-image's sample images: pip install 'lpengine[emulator]'"
        ) from error
    loader: Callable[[], Any] = getattr(data, name)
    return Image.fromarray(loader()).convert("RGB")


def _stamp(image: Image.Image, index: int) -> Image.Image:
    """Encode `index` as black/white 4 px cells (2 rows × 16 columns) in the bottom-left corner."""
    stamped = image.copy()
    for bit in range(32):
        row, column = divmod(bit, 16)
        value = 255 if index >> bit & 1 else 0
        x, y = 4 * column, stamped.height - 8 + 4 * row
        stamped.paste((value, value, value), (x, y, x + 4, y + 4))
    return stamped


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        image.save(out, format="JPEG", quality=90)
    else:
        image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _write(path: Path, data: bytes) -> Path:
    """Write only when the content differs, via a temporary file, so reruns are cheap and never half-written."""
    if not (path.is_file() and path.read_bytes() == data):
        partial = path.with_name(path.name + ".part")
        partial.write_bytes(data)
        partial.replace(path)
    return path


def _portrait(source: Image.Image, index: int) -> Image.Image:
    rng = random.Random(f"portrait-{index}")
    fx, fy, fw, fh = _FACE
    side = rng.randint(280, 400)  # the face is 19–27 % of the frame: tighter crops lose the cascade
    margin = 40
    left = rng.randint(max(0, fx + fw + margin - side), min(fx - margin, source.width - side))
    top = rng.randint(max(0, fy + fh + margin - side), min(fy - margin, source.height - side))
    image = source.crop((left, top, left + side, top + side)).resize(
        (rng.randrange(256, 321, 2),) * 2, Image.Resampling.LANCZOS
    )
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return _stamp(image, index)


def _non_face(sources: list[Image.Image], index: int) -> Image.Image:
    rng = random.Random(f"noface-{index}")
    source = sources[index % len(sources)]
    width = rng.randint(source.width * 2 // 3, source.width)
    height = rng.randint(max(source.height * 2 // 3, (width + 1) // 2), source.height)
    left, top = rng.randint(0, source.width - width), rng.randint(0, source.height - height)
    image = source.crop((left, top, left + width, top + height))
    image.thumbnail((320, 320), Image.Resampling.LANCZOS)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return _stamp(image, index)


def make_portraits(dest: Path, n: int, *, faces: bool = True) -> list[Path]:
    """`n` distinct small portraits (256–320 px JPEG, ~20 KB) that pass the Haar detector, as
    `dest/portrait-0000.jpg`…; with `faces=False`, `n` distinct non-faces instead (see `make_non_faces`)."""
    if not faces:
        return make_non_faces(dest, n)
    dest.mkdir(parents=True, exist_ok=True)
    source = _sample("astronaut")
    return [_write(dest / f"portrait-{i:04d}.jpg", _encode(_portrait(source, i), "JPEG")) for i in range(n)]


def make_non_faces(dest: Path, n: int) -> list[Path]:
    """`n` distinct images with no human face (cup, rocket, galaxies), as `dest/noface-0000.jpg`…"""
    dest.mkdir(parents=True, exist_ok=True)
    sources = [_sample(name) for name in _NON_FACE_SOURCES]
    return [_write(dest / f"noface-{i:04d}.jpg", _encode(_non_face(sources, i), "JPEG")) for i in range(n)]


def ensure_demo_assets(dest: Path, *, count: int = 6) -> Path:
    """Fill `dest` with `count` portraits — `astronaut.png` (the original) and `count - 1` variants — plus
    `noface-coffee.jpg`, which every detector rejects. Idempotent; returns `dest`."""
    if count < 1:
        raise ValueError("count must be at least 1")
    dest.mkdir(parents=True, exist_ok=True)
    source = _sample("astronaut")
    _write(dest / "astronaut.png", _encode(source, "PNG"))
    for i in range(1, count):
        _write(dest / f"portrait-{i:02d}.jpg", _encode(_portrait(source, i), "JPEG"))
    coffee = _sample("coffee")
    coffee.thumbnail((320, 320), Image.Resampling.LANCZOS)
    _write(dest / "noface-coffee.jpg", _encode(coffee, "JPEG"))
    return dest
