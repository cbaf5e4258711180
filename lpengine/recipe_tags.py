"""Every video carries its recipe: the preset and parameters it was made with, in the MP4's own metadata.

A video passed around a team (or found a year later) then says how to make it again: `lpengine presets save NAME
--from-video FILE` reads it back. The tag is the standard `comment` (`©cmt`), which ffprobe, players and file
managers show, holding `lpengine-recipe {json}`.

Writing it is a remux with PyAV (FFmpeg's MP4 muxer): packets are copied, nothing is re-encoded, so the picture
and sound are bit-identical and the cost is a few milliseconds per video. It runs in a worker thread (FFmpeg
releases the GIL), on the downloaded `.part` file before its atomic rename, and the result is checked with the
same MP4 box walk as every download; if anything fails, the untagged video is kept: a paid video is never lost
over a tag.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lpengine.media import MediaError, verify_mp4

__all__ = ["PREFIX", "read_recipe", "write_recipe"]

PREFIX = "lpengine-recipe "


def write_recipe(path: Path, recipe: dict[str, Any]) -> int:
    """Rewrite `path` with `recipe` in its `comment` tag; returns its new size (the old one if tagging failed)."""
    import av  # here, not at import: `import lpengine` stays light (tests/unit/test_public_api.py)

    tagged = path.with_name(f"{path.name}.tag")
    try:
        with av.open(str(path)) as source, av.open(str(tagged), "w", format="mp4") as target:
            target.metadata["comment"] = PREFIX + json.dumps(recipe, sort_keys=True, ensure_ascii=False)
            streams = {s.index: target.add_stream_from_template(s) for s in source.streams if s.type in _COPIED}
            for packet in source.demux(*(s for s in source.streams if s.index in streams)):
                if packet.dts is None:  # the demuxer's end-of-stream marker, not data
                    continue
                packet.stream = streams[packet.stream.index]
                target.mux(packet)
        verify_mp4(tagged)
        os.replace(tagged, path)
    except (av.FFmpegError, MediaError, OSError, ValueError):
        tagged.unlink(missing_ok=True)
    return path.stat().st_size


_COPIED = ("video", "audio")


def read_recipe(path: Path) -> dict[str, Any] | None:
    """The recipe in a video's tags; None if it has none. Raises `MediaError` if the file is not a readable MP4."""
    import av

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
