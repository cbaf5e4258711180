"""The recipe tag on every MP4 layout FFmpeg writes: read back by FFmpeg, the media untouched, a second tag replacing
the first, and the in-place splice (the download's cheap way) taken exactly when `moov` is the last box."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from PIL import Image

from lpengine.media import check_mp4_boxes, verify_mp4
from lpengine.recipe_tags import read_recipe, tag_in_place, write_recipe

av = pytest.importorskip("av")

RECIPE = {"preset": "calm", "params": {"mouth_move_strength": 1.2, "note": "ünïcode"}}


def encode(path: Path, movflags: str) -> Path:
    """A small H.264 + AAC MP4 as FFmpeg's muxer lays it out with these `movflags`."""
    with av.open(str(path), "w", options={"movflags": movflags} if movflags else {}) as container:
        video = container.add_stream("h264", rate=24)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = container.add_stream("aac", rate=8000)
        for i in range(12):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 64), (i * 20, 80, 160)))
            container.mux(video.encode(frame))
        container.mux(video.encode())
        samples = av.AudioFrame(format="fltp", layout="mono", samples=4000)
        samples.sample_rate = 8000
        for plane in samples.planes:
            plane.update(bytes(plane.buffer_size))
        container.mux(audio.encode(samples))
        container.mux(audio.encode())
    return path


def without_udta(path: Path) -> Path:
    """FFmpeg's moov-last file minus its `udta` (its last child), as muxers that write no metadata leave it."""
    data = path.read_bytes()
    moov = data.rindex(b"moov") - 4
    udta = data.rindex(b"udta") - 4
    assert udta > moov and udta + struct.unpack_from(">I", data, udta)[0] == len(data)
    trimmed = bytearray(data[:udta])
    struct.pack_into(">I", trimmed, moov, udta - moov)
    path.write_bytes(bytes(trimmed))
    return path


def packets(path: Path) -> list[tuple[int, int | None, bytes]]:
    with av.open(str(path)) as container:
        return [(p.stream.index, p.pts, bytes(p)) for p in container.demux() if p.dts is not None]


def tag(path: Path, recipe: dict[str, object]) -> bool:
    """What the download does: the in-place splice through its handle, else mutagen. True if it was in place."""
    with path.open("r+b") as fh:
        size = tag_in_place(fh, check_mp4_boxes(fh, path.stat().st_size, path), recipe)
    if size is None:
        write_recipe(path, recipe)
    assert path.stat().st_size == size or size is None
    return size is not None


@pytest.mark.parametrize(
    ("layout", "in_place"),
    [("moov last", True), ("moov last, no udta", True), ("faststart", False), ("fragmented", False)],
)
def test_the_tag_reads_back_and_leaves_the_media_alone(tmp_path: Path, layout: str, in_place: bool) -> None:
    movflags = {"faststart": "faststart", "fragmented": "frag_keyframe+empty_moov"}.get(layout, "")
    path = encode(tmp_path / "video.mp4", movflags)
    if layout.endswith("no udta"):
        without_udta(path)
    before = packets(path)
    assert read_recipe(path) is None

    assert tag(path, RECIPE) is in_place
    verify_mp4(path)
    assert read_recipe(path) == RECIPE
    assert packets(path) == before  # the same bytes at the same times: moved, never re-encoded

    second = {"preset": "other", "params": {}}
    assert tag(path, second) is in_place
    assert read_recipe(path) == second  # replaced, not a second comment beside the first
    assert packets(path) == before
    with av.open(str(path)) as container:
        assert container.metadata.get("encoder", "").startswith("Lavf") or layout.endswith("no udta")


@pytest.mark.parametrize("moov_last", [True, False])
def test_a_failed_tag_keeps_the_video_untagged(tmp_path: Path, moov_last: bool) -> None:
    """A `moov` whose child claims more bytes than `moov` holds (the top-level walk passes it; neither the splice
    nor mutagen can place a tag): the file is left exactly as it was (a paid video is never lost over a tag)."""
    path = tmp_path / "odd.mp4"
    ftyp, moov, mdat = b"\0\0\0\x10ftypisom\0\0\0\0", b"\0\0\0\x10moov\0\0\0\xffudta", b"\0\0\0\x10mdat" + b"\1" * 8
    data = ftyp + (mdat + moov if moov_last else moov + mdat)
    path.write_bytes(data)
    assert tag(path, RECIPE) is False
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["odd.mp4"]
