"""What `--redo bad` changes in an item's record, and where the video it replaces goes.

A redo is the one deliberate way to pay twice for an item, so it is recorded, never implied: the item's record
keeps `redo = {"epoch", "count", "history"}`, one history entry per earlier video (when it was replaced, its
verdict and flags, its task, its length and where the file now is). The earlier video is not deleted: it is renamed
`NAME.prevN.mp4` beside the new one (docs/analysis.md).

The epoch is the redo request: every item it selects gets the same epoch, committed in one transaction with the
items' reset (`StateStore.start_redo`). From then on each selected item is simply unfinished, and the engine's
resume rules apply as to any other: the submit's write-ahead mark and the task-list reconciliation keep a crash
from paying for it twice, and its old task stays claimed, so reconciliation never mistakes it for the new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lpengine.models import Item

_CLEARED = (
    "task_id",
    "submit_inflight_wall",
    "submitted_wall",
    "cancelled_by_us",
    "task_code",
    "task_message",
    "video_url",
    "video_duration",
    "output_path",
    "output_size",
    "analysis",
    "timings",
)
"""What belonged to the replaced video. The face check (`detect_*`) stays: it judged the photo, which has not
changed, so the redo pays no detect (the verdict is cached by the photo's content)."""


def reset_for_redo(data: dict[str, Any], epoch: int, wall: float) -> dict[str, Any]:
    """A finished item's record made unfinished again for redo request `epoch`, its video moved into history."""
    redo: dict[str, Any] = data.get("redo") or {"count": 0, "history": []}
    count = int(redo["count"]) + 1
    analysis: dict[str, Any] = data.get("analysis") or {}
    output = Path(str(data["output_path"]))
    earlier = {
        "epoch": epoch,
        "at": wall,
        "verdict": analysis.get("verdict"),
        "flags": list(analysis.get("flags") or []),
        "score": analysis.get("score"),
        "task_id": data.get("task_id"),
        "video_duration": data.get("video_duration"),
        "output": str(output),
        "kept_as": str(output.with_name(f"{output.stem}.prev{count}{output.suffix}")),
    }
    fresh = {key: value for key, value in data.items() if key not in _CLEARED}
    fresh.update(
        state=None,
        stage="upload",
        reason="",
        transient=False,
        submit_attempts=0,  # `state.max_submit_attempts` bounds accidents per video, not the user's choice
        redo={"epoch": epoch, "count": count, "history": [*redo["history"], earlier]},
    )
    return fresh


def keep_previous_video(item: Item) -> None:
    """Rename the replaced video to its `kept_as` name, once, before the new one can take its place.

    Called whenever a redone item is resumed unfinished, so a crash between the redo's commit and the rename is
    repaired by the next run. The file at `output` can only be the old video while the item has no `output_path`:
    the download stage records that path before it writes anything there.
    """
    if item.redo is None or item.output_path is not None or not item.redo["history"]:
        return
    last = item.redo["history"][-1]
    if os.path.exists(last["output"]) and not os.path.exists(last["kept_as"]):
        os.replace(last["output"], last["kept_as"])
