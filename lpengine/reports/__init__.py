"""Reports written into the output folder at the end of a run."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from lpengine.models import ItemResult, RunReport
from lpengine.reports.html_report import write_html_report

__all__ = ["CSV_COLUMNS", "write_reports"]

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
    for stage in ("check", "upload", "detect", "submit", "poll", "download"):
        row[f"t_{stage}"] = timings.get(stage)
    return row


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(report: RunReport, out_dir: Path, *, extra: dict[str, object] | None = None) -> None:
    """report.json, report.csv and report.html in the output folder, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"summary": report.summary(), "items": [r.to_dict() for r in report.items]}
    _atomic_write(out_dir / "report.json", json.dumps(payload, ensure_ascii=False, indent=1))
    tmp = out_dir / ".report.csv.tmp"
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in report.items:
            writer.writerow(_row(result))
    os.replace(tmp, out_dir / "report.csv")
    write_html_report(report, out_dir, extra=extra)
