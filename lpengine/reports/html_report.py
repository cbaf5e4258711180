"""report.html: the run's outcome for a person who was not watching, one self-contained page.

No network assets (no CDN, no web fonts), so the page works offline, from a zip, or from a mail attachment. Videos
are referenced by paths relative to the output folder, so that folder can be moved as a whole.

Large batches: the page is written row by row to a temporary file (memory stays flat at 100k rows), and only the
first `THUMBNAIL_ROWS` rows get an embedded thumbnail. Beyond that, the decoding time and a page of hundreds of
megabytes would cost more than the pictures are worth; the rest show a placeholder. Videos of those later rows are
declared `preload="none"`, so a browser does not open thousands of files when the page loads.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from html import escape
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

from PIL import Image, ImageOps

from lpengine.models import ItemResult, ItemState, RunReport
from lpengine.presets import recipe_text
from lpengine.progress import failure_code

__all__ = ["THUMBNAIL_PX", "THUMBNAIL_ROWS", "suggest_fix", "write_html_report"]

THUMBNAIL_ROWS = 500
THUMBNAIL_PX = 160

_VERDICT_COLOURS = {"ok": "#15803d", "warn": "#b45309", "bad": "#b91c1c", "analysis_failed": "#64748b"}

_COLOURS: dict[ItemState, str] = {
    ItemState.SUCCEEDED: "#15803d",
    ItemState.REJECTED_LOCALLY: "#b45309",
    ItemState.UPLOAD_FAILED: "#b91c1c",
    ItemState.DETECT_FAILED: "#a21caf",
    ItemState.SUBMIT_FAILED: "#c2410c",
    ItemState.TASK_FAILED: "#dc2626",
    ItemState.DOWNLOAD_FAILED: "#be123c",
    ItemState.TIMED_OUT: "#ca8a04",
    ItemState.CANCELLED: "#64748b",
}

_RETRIED = "re-run: the batch retries it"
_CODE_FIXES: tuple[tuple[str, str], ...] = (
    ("InternalError", _RETRIED),
    ("SystemError", _RETRIED),
    ("ModelServiceFailed", _RETRIED),
    ("ModelServingError", _RETRIED),
    ("ModelUnavailable", _RETRIED),
    ("RequestTimeOut", _RETRIED),
    ("InvalidImage.NoHumanFace", "use a photo with one clear, frontal, unobstructed face"),
    ("InvalidImage.ImageSize", "resize the image: each side ≤ 4096 px, aspect ratio ≤ 2:1"),
    ("InvalidFile.AudioLengthError", "trim or extend the audio to 1–180 s"),
    ("InvalidParameter.UnsupportedFileFormat", "convert: image to JPEG/PNG/BMP/WebP, audio to WAV/MP3"),
    ("InvalidParameter.InputDownloadFailed", "the service could not download the input: check the URL, then re-run"),
    (
        "InvalidParameter.DataInspection",
        "the service could not fetch the input in time: store inputs in mainland China (OSS Beijing), then re-run",
    ),
    ("DataInspectionFailed", "content moderation refused the input or the result: use another image or audio"),
    ("InvalidURL", "the input URL is missing or malformed: check the storage settings"),
    ("Arrearage", "the account is overdue: top it up in the Alibaba Cloud console, then re-run"),
)
_STATE_FIXES: dict[ItemState, str] = {
    ItemState.REJECTED_LOCALLY: "fix or replace the file (see reason)",
    ItemState.UPLOAD_FAILED: "check the storage settings (bucket, credentials, network), then re-run",
    ItemState.DETECT_FAILED: "use a clear, frontal, well-lit face",
    ItemState.SUBMIT_FAILED: "check the reason; fix the input or parameters, then re-run",
    ItemState.TASK_FAILED: "check the reason and the service's error code, then re-run",
    ItemState.DOWNLOAD_FAILED: "re-run: the download is tried again (check disk space and network)",
    ItemState.TIMED_OUT: "the service queue was long: re-run later, or raise limits.task_timeout_s",
    ItemState.CANCELLED: "re-run to resume",
}


def suggest_fix(result: ItemResult) -> str:
    """What the user should do next: the code decides where there is one, the terminal state otherwise."""
    state, reason = result.state, result.reason
    if state is ItemState.SUCCEEDED:
        return ""
    if "max_submit_attempts" in reason:
        return "submitted the allowed number of times already: raise state.max_submit_attempts to pay for another try"
    if "did not answer" in reason or "no answer after retries" in reason:
        return "re-run: the service did not answer in time"
    if state is ItemState.DOWNLOAD_FAILED and "expired" in reason:
        return "re-run: the item is submitted again"
    if state is ItemState.CANCELLED and reason.startswith("batch stopped"):
        return "fix the account or key problem named in the reason, then re-run"
    if state in (ItemState.TASK_FAILED, ItemState.SUBMIT_FAILED, ItemState.DETECT_FAILED):
        code = result.task_code or failure_code(reason)
        if code:
            for prefix, fix in _CODE_FIXES:
                if code == prefix or code.startswith(prefix + "."):
                    return fix
    return _STATE_FIXES[state]


def write_html_report(
    report: RunReport, out_dir: Path, *, title: str = "lpengine report", extra: dict[str, object] | None = None
) -> Path:
    """Write `out_dir/report.html` atomically and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    tmp = out_dir / f".report.html.{os.getpid()}.tmp"  # by process: workers may share the folder
    base = os.path.abspath(out_dir)
    thumbnails = _thumbnails(r.input for r in report.items[:THUMBNAIL_ROWS])
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            _write_page(fh, report, title, extra or {}, thumbnails, base)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- thumbnails ---------------------------------------------------------------------------------------------------


def _thumbnails(inputs: Iterable[str]) -> list[str | None]:
    """Decoding is the slow part of the report and Pillow releases the GIL while decoding, hence threads."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_thumbnail, inputs))


def _thumbnail(source: str) -> str | None:
    if "://" in source or not os.path.isfile(source):
        return None
    try:
        with Image.open(source) as image:
            image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))  # JPEG: decode at a fraction of full size
            small = ImageOps.exif_transpose(image)  # phone photos are stored sideways with an orientation tag
            small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buf = io.BytesIO()
            small.convert("RGB").save(buf, "JPEG", quality=75)
    except Exception:  # a preview is decoration: whatever breaks it, the row shows a placeholder instead
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -- page ---------------------------------------------------------------------------------------------------------


def _write_page(
    fh: TextIO, report: RunReport, title: str, extra: dict[str, object], thumbnails: list[str | None], base: str
) -> None:
    counts = report.counts
    fh.write(
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>\n{_css()}</style>\n</head>\n<body>\n"
    )
    fh.write(_header(report, title, extra, counts))
    fh.write(_filters(report, counts))
    fh.write(
        '<table id="items" data-filter="all">\n<thead><tr><th class="num">#</th><th>Input</th><th>State</th>'
        "<th>Video</th><th>Verdict</th><th>Details</th><th>Reason and suggested fix</th></tr></thead>\n<tbody>\n"
    )
    for index, result in enumerate(report.items):
        thumbnail = thumbnails[index] if index < len(thumbnails) else None
        fh.write(_row(index, result, thumbnail, base))
    fh.write("</tbody>\n</table>\n")
    if len(report.items) > THUMBNAIL_ROWS:
        fh.write(
            f'<p class="note">Thumbnails are embedded for the first {THUMBNAIL_ROWS} rows only, to keep the page '
            "small and quick to write.</p>\n"
        )
    fh.write(f"<script>\n{_SCRIPT}</script>\n</body>\n</html>\n")


def _header(report: RunReport, title: str, extra: dict[str, object], counts: dict[str, int]) -> str:
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    cards = [
        ("Items", f"{len(report.items):,}"),
        ("Cost, batch total", f"{report.cost_cny:,.3f} CNY"),
        ("Cost, this run", f"{report.cost_this_run_cny:,.3f} CNY"),
        ("Wall time", _duration(report.wall_time_s)),
        *((str(k), str(v)) for k, v in extra.items()),
    ]
    total = len(report.items) or 1
    bar = "".join(
        f'<span style="width:{100 * counts[s.value] / total:.3f}%;background:{_COLOURS[s]}" '
        f'title="{escape(s.value)}: {counts[s.value]}"></span>'
        for s in ItemState
        if s.value in counts
    )
    chips = "".join(
        f'<span class="badge" style="--c:{_COLOURS[s]}">{escape(s.value)} <b>{counts[s.value]:,}</b></span>'
        for s in ItemState
        if s.value in counts
    )
    api = ", ".join(f"{escape(k)} {v:,}" for k, v in sorted(report.api_requests.items())) or "none"
    dry = '<span class="badge" style="--c:#0369a1">dry run</span>' if report.dry_run else ""
    return (
        f'<header>\n<h1>{escape(title)} {dry}</h1>\n<p class="meta">generated {escape(generated)}</p>\n'
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div></div>'
            for k, v in cards
        )
        + f'</div>\n<div class="bar">{bar}</div>\n<div class="chips">{chips}</div>\n'
        f'<p class="meta">API requests: {api} · throttled {report.throttled:,} · retries {report.retries:,}</p>\n'
        "</header>\n"
    )


def _filters(report: RunReport, counts: dict[str, int]) -> str:
    failed = len(report.items) - counts.get(ItemState.SUCCEEDED.value, 0)
    buttons = [("all", f"All {len(report.items):,}", "#334155"), ("failed", f"Not succeeded {failed:,}", "#475569")]
    buttons += [(s.value, f"{s.value} {counts[s.value]:,}", _COLOURS[s]) for s in ItemState if s.value in counts]
    review, _ = report.needs_review
    if review:
        buttons.append(("review", f"needs review {review:,}", _VERDICT_COLOURS["bad"]))
    return (
        '<nav class="filters" aria-label="filter rows by state">'
        + "".join(
            f'<button type="button" data-filter="{escape(key)}" aria-pressed="{"true" if key == "all" else "false"}"'
            f' style="--c:{colour}">{escape(label)}</button>'
            for key, label, colour in buttons
        )
        + "</nav>\n"
    )


def _row(index: int, result: ItemResult, thumbnail: str | None, base: str) -> str:
    state = result.state
    name = result.input.rstrip("/").rsplit("/", 1)[-1] or result.input
    if thumbnail is not None:
        thumb = f'<img class="thumb" src="{thumbnail}" alt="">'
    else:
        label = "URL" if "://" in result.input else ("—" if index >= THUMBNAIL_ROWS else "no preview")
        thumb = f'<span class="thumb ph">{label}</span>'
    return (
        f'<tr data-state="{state.value}"{" data-review" if result.needs_review else ""}>'
        f'<td class="num">{index + 1}</td>'
        f'<td><div class="input">{thumb}<div><div class="name">{escape(name)}</div>'
        f'<div class="path">{_breakable(result.input)}</div></div></div></td>'
        f'<td><span class="badge" style="--c:{_COLOURS[state]}">{state.value}</span>'
        f"{'<div class=path>resumed</div>' if result.resumed else ''}</td>"
        f"<td>{_video(index, result, base)}</td>"
        f"<td>{_verdict(result, base)}</td>"
        f"<td>{_details(result)}</td>"
        f"<td>{_reason(result)}</td></tr>\n"
    )


def _video(index: int, result: ItemResult, base: str) -> str:
    if result.state is not ItemState.SUCCEEDED or not result.output:
        return '<span class="muted">—</span>'
    if not os.path.isfile(result.output):
        return f'<span class="muted">not found: {escape(result.output)}</span>'
    preload = "metadata" if index < THUMBNAIL_ROWS else "none"
    src = escape(_href(result.output, base))
    return (
        f'<video controls preload="{preload}" src="{src}"></video>'
        f'<div class="path"><a href="{src}">{escape(os.path.basename(result.output))}</a></div>'
    )


def _href(path: str, base: str) -> str:
    """A link to a file from the report, relative to the output folder where it can be."""
    absolute = os.path.abspath(path)
    if absolute.startswith(base + os.sep):  # the usual case, a video in the output folder: no relpath walk
        return quote(absolute[len(base) + 1 :].replace(os.sep, "/"))
    try:
        return quote(Path(os.path.relpath(absolute, base)).as_posix())
    except ValueError:  # another drive on Windows: no relative path exists
        return Path(absolute).as_uri()


def _redone(result: ItemResult, base: str) -> str:
    """ "redone N×", the verdict of the video the last redo replaced, and a link to that video while it is kept."""
    if not result.redo_history:
        return ""
    kept = str(result.redo_history[-1].get("kept_as") or "")
    link = f' · <a href="{escape(_href(kept, base))}">earlier video</a>' if kept and os.path.isfile(kept) else ""
    return f'<div class="path">redone {result.redo_count}× · was {escape(result.earlier_verdict)}{link}</div>'


def _verdict(result: ItemResult, base: str) -> str:
    """The judgement of the video (docs/analysis.md) and a strip of three of its frames, when it was judged."""
    if result.verdict is None:
        return '<span class="muted">—</span>' + _redone(result, base)
    colour = _VERDICT_COLOURS.get(result.verdict, "#64748b")
    parts = [f'<span class="badge verdict" style="--c:{colour}">{escape(result.verdict)}</span>']
    if result.score is not None:
        parts.append(f'<span class="score">{result.score}</span>')
    if result.flags:
        parts.append('<div class="flags">' + " ".join(f"<code>{escape(f)}</code>" for f in result.flags) + "</div>")
    error = (result.metrics or {}).get("error")
    if error:
        parts.append(f'<div class="path">{escape(str(error))}</div>')
    if result.output:
        strip = os.path.join(base, ".lpengine", "frames", Path(result.output).stem + ".jpg")
        if os.path.isfile(strip):
            src = escape(quote(f".lpengine/frames/{Path(result.output).stem}.jpg"))
            parts.append(f'<img class="strip" src="{src}" alt="three frames of the video" loading="lazy">')
    parts.append(_redone(result, base))
    return "".join(parts)


def _details(result: ItemResult) -> str:
    rows: list[tuple[str, str]] = []
    if result.task_id:
        rows.append(("task", result.task_id))
    if result.video_duration is not None:
        rows.append(("video", f"{result.video_duration:.1f}\u00a0s"))
    if result.submit_attempts:
        rows.append(("submits", str(result.submit_attempts)))
    if result.cost_cny:
        rows.append(("cost", f"{result.cost_cny:.3f}\u00a0CNY"))
    if result.params:
        rows.append(("recipe", recipe_text(result.preset, result.params)))
    cells = [f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows]
    if result.timings:
        spans = (f'<span class="t">{escape(k)} {_duration(v)}</span>' for k, v in result.timings.items())
        cells.append(f"<dt>timings</dt><dd>{' '.join(spans)}</dd>")
    if not cells:
        return '<span class="muted">—</span>'
    return '<dl class="kv">' + "".join(cells) + "</dl>"


def _reason(result: ItemResult) -> str:
    if result.state is ItemState.SUCCEEDED:
        return '<span class="muted">—</span>'
    parts = [f'<div class="reason">{escape(result.reason or result.state.value)}</div>']
    if result.detect_message and result.detect_message not in result.reason:
        parts.append(f'<div class="path">detect: {escape(result.detect_message)}</div>')
    parts.append(f'<div class="fix">→ {escape(suggest_fix(result))}</div>')
    return "".join(parts)


def _breakable(path: str) -> str:
    """Long paths in a narrow column wrap after a slash rather than in the middle of a folder name."""
    return escape(path).replace("/", "/<wbr>")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _css() -> str:
    """Filtering is pure CSS keyed on the table's data-filter, so a click costs no JavaScript loop over 10k rows."""
    rules: Iterator[str] = (
        f'#items[data-filter="{s.value}"] tbody tr:not([data-state="{s.value}"]){{display:none}}\n' for s in ItemState
    )
    return (
        _CSS
        + "".join(rules)
        + '#items[data-filter="failed"] tbody tr[data-state="succeeded"]{display:none}\n'
        + '#items[data-filter="review"] tbody tr:not([data-review]){display:none}\n'
    )


_CSS = """\
:root{--bg:#f8fafc;--fg:#0f172a;--muted:#64748b;--card:#fff;--line:#e2e8f0;--head:#f1f5f9;--hover:#f8fafc}
@media (prefers-color-scheme:dark){:root{--bg:#0b1120;--fg:#e2e8f0;--muted:#94a3b8;--card:#111827;--line:#1f2937;
--head:#172033;--hover:#151e30}}
*{box-sizing:border-box}
body{margin:0;padding:24px 32px 48px;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
h1{margin:0 0 2px;font-size:22px;font-weight:650;display:flex;gap:10px;align-items:center}
.meta{color:var(--muted);margin:4px 0 12px;font-size:12.5px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 16px;min-width:150px}
.card .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}
.bar{display:flex;height:10px;border-radius:5px;overflow:hidden;background:var(--line);margin:14px 0 10px;
max-width:900px}
.bar span{display:block;height:100%}
.chips{display:flex;flex-wrap:wrap;gap:6px}
.badge{display:inline-block;padding:2px 9px;border-radius:999px;font-size:12px;font-weight:600;white-space:nowrap;
color:var(--c);background:color-mix(in srgb,var(--c) 13%,transparent);
border:1px solid color-mix(in srgb,var(--c) 35%,transparent)}
.badge b{font-variant-numeric:tabular-nums}
.filters{display:flex;flex-wrap:wrap;gap:6px;margin:22px 0 12px}
.filters button{font:inherit;font-size:12.5px;padding:5px 12px;border-radius:999px;cursor:pointer;color:var(--c);
background:var(--card);border:1px solid color-mix(in srgb,var(--c) 40%,transparent)}
.filters button:hover{background:color-mix(in srgb,var(--c) 10%,var(--card))}
.filters button[aria-pressed="true"]{background:var(--c);color:#fff;border-color:var(--c)}
table{width:100%;border-collapse:separate;border-spacing:0;background:var(--card);border:1px solid var(--line);
border-radius:10px}
thead th{position:sticky;top:0;z-index:1;background:var(--head);text-align:left;font-size:12px;font-weight:600;
color:var(--muted);text-transform:uppercase;letter-spacing:.04em;padding:9px 12px;border-bottom:1px solid var(--line)}
thead th:first-child{border-top-left-radius:10px}thead th:last-child{border-top-right-radius:10px}
td{padding:10px 12px;border-bottom:1px solid var(--line);vertical-align:top}
tbody tr:last-child td{border-bottom:0}
tbody tr:hover td{background:var(--hover)}
.num{width:1%;text-align:right;color:var(--muted);font-variant-numeric:tabular-nums}
.input{display:flex;gap:12px;align-items:flex-start;min-width:220px}
.thumb{width:80px;height:80px;object-fit:cover;border-radius:8px;flex:none;background:var(--line)}
.ph{display:flex;align-items:center;justify-content:center;color:var(--muted);font-size:11px}
.name{font-weight:600;overflow-wrap:anywhere}
.path{color:var(--muted);font-size:12px;overflow-wrap:anywhere;margin-top:2px}
.path a{color:inherit}
video{display:block;width:180px;max-height:180px;border-radius:8px;background:#000}
.kv{display:grid;grid-template-columns:auto 1fr;gap:2px 10px;margin:0;font-size:12.5px}
.kv dt{color:var(--muted)}.kv dd{margin:0;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.kv .t{white-space:nowrap;display:inline-block;margin-right:6px}
.reason{max-width:420px;overflow-wrap:anywhere}
.fix{margin-top:6px;font-size:12.5px;font-weight:600;color:#0369a1}
.muted{color:var(--muted)}
.note{color:var(--muted);font-size:12.5px}
.score{margin-left:6px;font-weight:600;font-variant-numeric:tabular-nums}
.flags{margin-top:4px;font-size:12px}.flags code{white-space:nowrap}
.strip{display:block;margin-top:6px;height:54px;border-radius:6px}
"""

_SCRIPT = """\
(function () {
  var table = document.getElementById("items");
  var buttons = Array.prototype.slice.call(document.querySelectorAll(".filters button"));
  function show(key) {
    var known = buttons.some(function (b) { return b.getAttribute("data-filter") === key; });
    if (!known) { return; }
    table.setAttribute("data-filter", key);
    buttons.forEach(function (b) {
      b.setAttribute("aria-pressed", b.getAttribute("data-filter") === key ? "true" : "false");
    });
  }
  buttons.forEach(function (b) {
    b.addEventListener("click", function () { show(b.getAttribute("data-filter")); });
  });
  show(decodeURIComponent(location.hash.slice(1)));  // report.html#failed opens the failures only
  document.documentElement.setAttribute("data-ready", "true");
})();
"""
