"""Reports written into the output folder at the end of a run."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from lpengine.models import ItemResult, ItemState, RunReport, earlier_seconds, redo_fields, verdict_fields
from lpengine.reports.html_report import write_html_report

__all__ = ["CSV_COLUMNS", "result_from_state", "write_reports"]

CSV_COLUMNS = [
    "input",
    "output",
    "state",
    "reason",
    "detect_message",
    "task_id",
    "task_code",
    "video_duration",
    "submit_attempts",
    "cost_cny",
    "resumed",
    "preset",
    "params",
    "verdict",
    "flags",
    "score",
    "redo_count",
    "earlier_verdict",
    "t_check",
    "t_upload",
    "t_detect",
    "t_submit",
    "t_poll",
    "t_download",
]


def _row(result: ItemResult) -> dict[str, object]:
    data = result.to_dict()
    timings = data.pop("timings")
    row = {k: v for k, v in data.items() if k in CSV_COLUMNS}
    row["params"] = json.dumps(data["params"], sort_keys=True) if data["params"] is not None else None
    row["flags"] = " ".join(result.flags or [])
    row["earlier_verdict"] = result.earlier_verdict
    for stage in ("check", "upload", "detect", "submit", "poll", "download"):
        row[f"t_{stage}"] = timings.get(stage)
    return row


@contextmanager
def _replacing(path: Path, *, newline: str | None = None) -> Iterator[TextIO]:
    """A temporary file that replaces `path` only once it is completely written: no reader sees half a report.

    Named by process: workers sharing an output folder (docs/scaling.md) each write the batch's report at their end.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline=newline) as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(fh: TextIO, report: RunReport) -> None:
    """The bytes of `json.dumps({"summary": …, "items": […]}, ensure_ascii=False, indent=1)`, one row at a time.

    Each value is dumped alone and indented by its depth; every newline in a dump is layout (JSON escapes the ones
    inside strings), so prefixing them is exactly what the whole-document dump would have done.
    """
    summary = json.dumps(report.summary(), ensure_ascii=False, indent=1).replace("\n", "\n ")
    fh.write(f'{{\n "summary": {summary},\n "items": [')
    separator = "\n  "
    for result in report.items:
        fh.write(separator + json.dumps(result.to_dict(), ensure_ascii=False, indent=1).replace("\n", "\n  "))
        separator = ",\n  "
    fh.write("]\n}" if separator == "\n  " else "\n ]\n}")


def write_reports(report: RunReport, out_dir: Path, *, extra: dict[str, object] | None = None) -> None:
    """report.json, report.csv and report.html in the output folder, each written atomically.

    Each is written row by row while `report.items` is read, so memory does not depend on the number of items.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with _replacing(out_dir / "report.json") as fh:
        _write_json(fh, report)
    with _replacing(out_dir / "report.csv", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in report.items:
            writer.writerow(_row(result))
    write_html_report(report, out_dir, extra=extra)


def result_from_state(data: dict[str, object], detect_price: float, video_price: float) -> ItemResult:
    """An item's report row rebuilt from its state-store record (for `lpengine report`)."""
    state_value = data.get("state")
    state = ItemState(str(state_value)) if state_value else ItemState.CANCELLED
    reason = str(data.get("reason") or "")
    if not state_value:
        reason = f"in progress (last stage: {data.get('stage', 'plan')}); a re-run resumes it"
    duration = data.get("video_duration")
    video_s = float(duration) if isinstance(duration, int | float) else None
    redo = recorded if isinstance(recorded := data.get("redo"), dict) else None
    seconds = earlier_seconds(redo) + ((video_s or 0.0) if state is ItemState.SUCCEEDED else 0.0)
    cost = (detect_price if data.get("detect_paid") else 0.0) + seconds * video_price
    timings = data.get("timings")
    attempts = data.get("submit_attempts")
    return ItemResult(
        input=str(data.get("input") or ""),
        output=str(data["output_path"]) if data.get("output_path") else None,
        state=state,
        reason=reason,
        detect_message=str(data["detect_message"]) if data.get("detect_message") is not None else None,
        task_id=str(data["task_id"]) if data.get("task_id") else None,
        task_code=str(data["task_code"]) if data.get("task_code") else None,
        video_duration=video_s,
        submit_attempts=int(attempts) if isinstance(attempts, int) else 0,
        timings=dict(timings) if isinstance(timings, dict) else {},
        cost_cny=round(cost, 6),
        preset=str(data["preset"]) if data.get("preset") else None,
        params=dict(params) if isinstance(params := data.get("params"), dict) else None,
        **verdict_fields(data.get("analysis") if isinstance(data.get("analysis"), dict) else None),  # type: ignore[arg-type]
        **redo_fields(redo),
    )
