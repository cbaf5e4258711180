"""Every video carries its recipe: the preset and parameters it was made with, in the MP4's own metadata.

A video passed around a team (or found a year later) then says how to make it again: `lpengine presets save NAME
--from-video FILE` reads it back. The tag is the standard `comment` (iTunes-style `©cmt` in `moov/udta/meta/ilst`,
where FFmpeg's muxer writes it), which ffprobe, players and file managers show, holding `lpengine-recipe {json}`.

Writing it happens once per video inside the client, so it must cost next to nothing beside the download (the
client's CPU per item is held to 2× a bare aiohttp client's, docs/benchmarks.md). Two ways, by the file's layout:

- `moov` is the file's last box (FFmpeg's default layout, and the emulator's): the tag is spliced into `moov` where
  it lies, through the download's own file handle. Nothing after `moov` exists to move, so no media byte and no
  chunk offset changes: the picture and sound are untouched by construction. Tens of microseconds.
- any other layout (fast-start `moov` ahead of the media, fragmented files): mutagen moves the media and rewrites
  the chunk offsets, on a copy in a worker thread; the copy replaces the file only once it passes the same box
  walk as every download.

Either runs on the verified `.part` file before its atomic rename, and if anything fails the untagged video is
kept: a paid video is never lost over a tag.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO

from lpengine.media import MediaError, verify_mp4

__all__ = ["PREFIX", "read_recipe", "tag_in_place", "write_recipe"]

PREFIX = "lpengine-recipe "

_COMMENT = b"\xa9cmt"
# The `hdlr` FFmpeg's muxer writes ahead of an `ilst` ("mdir"/"appl": iTunes-style metadata).
_MDIR_HDLR = struct.pack(">I4sII4s4sII", 33, b"hdlr", 0, 0, b"mdir", b"appl", 0, 0) + b"\0"


def _text(recipe: dict[str, Any]) -> str:
    return PREFIX + json.dumps(recipe, sort_keys=True, ensure_ascii=False)


def tag_in_place(fh: BinaryIO, boxes: list[tuple[bytes, int, int]], recipe: dict[str, Any]) -> int | None:
    """Splice the tag into `moov` when it is the file's last top-level box (`boxes`, as `check_mp4_boxes` walked
    them); returns the file's new size, or None for any other layout (then `write_recipe` does it)."""
    kind, offset, size = boxes[-1]
    if kind != b"moov":
        return None
    fh.seek(offset)
    old = fh.read(size)
    new = _with_comment(old, _text(recipe).encode())
    if new is None:
        return None
    try:
        fh.seek(offset)
        fh.write(new)
        fh.truncate()  # a shorter comment than before leaves no stray bytes behind
        fh.flush()
    except OSError:  # a full disk: put the old `moov` back (it needs no more room than it had)
        fh.seek(offset)
        fh.write(old)
        fh.truncate()
        fh.flush()
        return None
    return offset + len(new)


def _with_comment(moov: bytes, text: bytes) -> bytes | None:
    """`moov` with `text` as its only `©cmt` item, other metadata kept; None if its boxes do not parse."""
    try:
        return _spliced(moov, _box(_COMMENT, _box(b"data", struct.pack(">II", 1, 0) + text)))  # UTF-8, locale 0
    except _Unreadable:
        return None


class _Unreadable(Exception):
    """Boxes that do not tile their container (or a size field too small for the tag): left to mutagen."""


def _spliced(moov: bytes, item: bytes) -> bytes:
    moov_box = _header(moov, 0, len(moov))
    ancestors = [moov_box]  # boxes that contain the change: each grows by the same number of bytes
    udta = _child(moov, moov_box, b"udta")
    if udta is None:
        return _splice(moov, ancestors, moov_box[2], moov_box[2], _box(b"udta", _meta(item)))
    ancestors.append(udta)
    meta = _child(moov, udta, b"meta")
    if meta is None:
        return _splice(moov, ancestors, udta[0] + udta[2], udta[0] + udta[2], _meta(item))
    ancestors.append(meta)
    ilst = _child(moov, meta, b"ilst")
    if ilst is None:
        return _splice(moov, ancestors, meta[0] + meta[2], meta[0] + meta[2], _box(b"ilst", item))
    ancestors.append(ilst)
    kept = b"".join(moov[start : start + size] for start, _, size, kind in _children(moov, ilst) if kind != _COMMENT)
    return _splice(moov, ancestors, ilst[0] + ilst[1], ilst[0] + ilst[2], kept + item)


def _meta(item: bytes) -> bytes:
    return _box(b"meta", b"\0\0\0\0" + _MDIR_HDLR + _box(b"ilst", item))


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


_Box = tuple[int, int, int]
"""(offset, header length, size) of a box inside a buffer."""


def _header(buf: bytes, offset: int, end: int) -> _Box:
    """The box at `offset` of a container ending at `end`."""
    if offset + 8 > end:
        raise _Unreadable
    (size,) = struct.unpack_from(">I", buf, offset)
    header = 8
    if size == 1:
        if offset + 16 > end:
            raise _Unreadable
        (size,) = struct.unpack_from(">Q", buf, offset + 8)
        header = 16
    elif size == 0:  # to the end of its container
        size = end - offset
    if size < header or offset + size > end:
        raise _Unreadable
    return offset, header, size


def _children(buf: bytes, parent: _Box) -> list[tuple[int, int, int, bytes]]:
    """(offset, header length, size, type) of each child box, which must tile the parent exactly."""
    start, header, size = parent
    offset = start + header
    if buf[start + 4 : start + 8] == b"meta" and buf[offset + 4 : offset + 8] != b"hdlr":
        offset += 4  # ISO `meta` is a full box (version and flags); QuickTime's starts with its `hdlr` at once
    end = start + size
    found = []
    while offset < end:
        box = _header(buf, offset, end)
        found.append((*box, buf[offset + 4 : offset + 8]))
        offset += box[2]
    return found


def _child(buf: bytes, parent: _Box, kind: bytes) -> _Box | None:
    return next(((o, h, s) for o, h, s, k in _children(buf, parent) if k == kind), None)


def _splice(buf: bytes, ancestors: list[_Box], start: int, end: int, data: bytes) -> bytes:
    """`buf` with `buf[start:end]` replaced by `data` and every ancestor's size adjusted to match."""
    delta = len(data) - (end - start)
    out = bytearray(buf[:start] + data + buf[end:])
    for offset, header, size in ancestors:
        if header == 16:
            struct.pack_into(">Q", out, offset + 8, size + delta)
        elif size + delta < 2**32:
            struct.pack_into(">I", out, offset, size + delta)
        else:
            raise _Unreadable  # a 32-bit box grown past 4 GiB: mutagen rewrites the layout
    return bytes(out)


def write_recipe(path: Path, recipe: dict[str, Any]) -> int:
    """Blocking: tag `path` whatever its layout (through mutagen, on a copy); returns its new size (the old one if
    tagging failed, the video then kept untagged)."""
    from mutagen import MutagenError
    from mutagen.mp4 import MP4

    tagged = path.with_name(f"{path.name}.tag")
    try:
        shutil.copyfile(path, tagged)
        video: Any = MP4(tagged)  # type: ignore[no-untyped-call]
        if video.tags is None:  # no `ilst` yet
            video.add_tags()
        video.tags[_COMMENT.decode("latin-1")] = [_text(recipe)]
        video.save()
        verify_mp4(tagged)
        os.replace(tagged, path)
    except (MutagenError, MediaError, OSError, ValueError):
        tagged.unlink(missing_ok=True)
    return path.stat().st_size


def read_recipe(path: Path) -> dict[str, Any] | None:
    """The recipe in a video's tags; None if it has none. Raises `MediaError` if the file is not a readable MP4."""
    import av  # here, not at import: `import lpengine` stays light (tests/unit/test_public_api.py)

    try:
        with av.open(str(path)) as container:
            comment = container.metadata.get("comment", "")
    except (av.FFmpegError, OSError) as exc:
        raise MediaError(path, f"cannot be read as a video ({exc.__class__.__name__})") from None
    if not comment.startswith(PREFIX):
        return None
    try:
        recipe = json.loads(comment[len(PREFIX) :])
    except json.JSONDecodeError:
        return None
    return recipe if isinstance(recipe, dict) else None
