"""Sweeps: every (limited) photo of a batch made with every combination of a few parameter values, side by side.

`lpengine run CONFIG --sweep video.mouth_move_strength=0.6,1.0,1.4 --sweep video.template_id=calm,active` plans
photos × combinations, prints what it will cost before anything is sent, runs them as one batch in
`<output.dir>/sweep/` (its own state store, so the batch's own reports stay its own), and writes `sweep.html`: rows
are photos, columns are combinations, each cell the video and, when the result analysis has judged it, its verdict.

Each video is named `<photo>__<combination>` (e.g. `anna__mouth1.4_calm`): unique within the sweep, the same on
every re-run, so a re-run (or a later sweep sharing combinations) finds the finished videos and pays nothing.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from pydantic import ValidationError

from lpengine.config import BatchConfig, VideoParams
from lpengine.errors import ConfigError
from lpengine.models import ItemSpec
from lpengine.plan import PlanProblem, iter_plan
from lpengine.presets import PARAMETERS, recipe_text

__all__ = ["Sweep", "parse_sweeps", "sweep_config", "write_sweep_page"]

SWEEP_DIR = "sweep"
_SHORT = {
    "eye_move_freq": "eye",
    "video_fps": "fps",
    "mouth_move_strength": "mouth",
    "paste_back": "paste",
    "head_move_strength": "head",
}


@dataclass(frozen=True, slots=True)
class Sweep:
    """The axes of a sweep: parameter → the values to try, in the order given."""

    axes: tuple[tuple[str, tuple[Any, ...]], ...]

    @property
    def combinations(self) -> list[dict[str, Any]]:
        keys = [k for k, _ in self.axes]
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in self.axes))]

    def label(self, values: Mapping[str, Any]) -> str:
        """A combination's name in file names and columns: `mouth1.4_calm` (template ids stand alone)."""
        parts = []
        for key, _ in self.axes:
            value = values[key]
            text = str(value).lower() if isinstance(value, bool) else str(value)
            parts.append(text if key == "template_id" else f"{_SHORT[key]}{text}")
        return "_".join(parts)

    def plan(self, config: BatchConfig, photos: int | None) -> Iterator[ItemSpec | PlanProblem]:
        """The batch's first `photos` items, each once per combination (plan problems pass through once)."""
        count = 0
        for entry in iter_plan(config):
            if isinstance(entry, PlanProblem):
                yield entry
                continue
            if photos is not None and count >= photos:
                break
            count += 1
            for combo in self.combinations:
                yield replace(
                    entry,
                    output_name=f"{entry.output_name}__{self.label(combo)}",
                    params=entry.params.model_copy(update=combo),
                    overrides={**(entry.overrides or {}), **combo},
                )


def parse_sweeps(options: Sequence[str]) -> Sweep:
    """`video.KEY=V1,V2,…` options, each value checked as `video:` would check it; raises `ConfigError`."""
    problems: list[str] = []
    axes: list[tuple[str, tuple[Any, ...]]] = []
    for option in options:
        name, sep, listed = option.partition("=")
        key = name.strip().removeprefix("video.")
        if not sep or not listed.strip():
            problems.append(f"--sweep {option!r}: write video.KEY=VALUE1,VALUE2 (e.g. video.template_id=calm,active)")
            continue
        if key not in PARAMETERS:
            allowed = ", ".join(f"video.{k}" for k in PARAMETERS)
            problems.append(f"--sweep {name}: not a video parameter; allowed: {allowed}")
            continue
        if key in (k for k, _ in axes):
            problems.append(f"--sweep {name}: given twice; list all its values in one --sweep")
            continue
        values: list[Any] = []
        for text in listed.split(","):
            try:
                value = getattr(VideoParams.model_validate({key: yaml.safe_load(text.strip())}), key)
            except (ValidationError, yaml.YAMLError) as exc:
                reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not a value"
                problems.append(f"--sweep {name}: {text.strip()!r}: {reason}")
                continue
            if value not in values:
                values.append(value)
        axes.append((key, tuple(values)))
    if problems:
        raise ConfigError(problems)
    return Sweep(tuple(axes))


def sweep_config(config: BatchConfig) -> BatchConfig:
    """The batch's config with its outputs and state in `<output.dir>/sweep/`."""
    out = config.output_dir / SWEEP_DIR
    return config.model_copy(
        update={
            "output": config.output.model_copy(update={"dir": out}),
            "state": config.state.model_copy(update={"path": out / ".lpengine" / "state.db"}),
        }
    )


def save_command(sweep_dir: Path, label: str) -> str:
    return f"lpengine presets save NAME --from-sweep {sweep_dir} --pick {label}"


def write_sweep_page(config: BatchConfig, sweep: Sweep) -> Path | None:
    """`sweep.html` from the sweep's report.json (rows: photos; columns: combinations), and `sweep.json`, which
    `lpengine presets save NAME --from-sweep DIR --pick LABEL` reads. None if the run wrote no report."""
    out = config.output_dir
    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    labels = [sweep.label(c) for c in sweep.combinations]
    keys = [k for k, _ in sweep.axes]
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    photos: list[str] = []
    for row in report["items"]:
        params = row.get("params")
        if not params or row["input"] in ("",):
            continue
        label = sweep.label({k: params[k] for k in keys})
        if label not in labels:
            continue
        if row["input"] not in photos:
            photos.append(row["input"])
        cells[(row["input"], label)] = row
    photos.sort(key=lambda p: (Path(p).name.casefold(), p))  # the report is in finishing order; rows are not
    context = config.preset_context
    picks = {
        label: {
            "extends": context.batch_preset,
            "values": {**context.batch_overrides, **combo},
            "params": config.video.model_copy(update=combo).model_dump(),
        }
        for label, combo in zip(labels, sweep.combinations, strict=True)
    }
    (out / "sweep.json").write_text(json.dumps({"axes": dict(sweep.axes), "picks": picks}, indent=1), "utf-8")
    path = out / "sweep.html"
    tmp = out / ".sweep.html.tmp"
    tmp.write_text(_page(out, sweep, labels, photos, cells, picks), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _page(
    out: Path,
    sweep: Sweep,
    labels: list[str],
    photos: list[str],
    cells: dict[tuple[str, str], dict[str, Any]],
    picks: dict[str, dict[str, Any]],
) -> str:
    axes = " × ".join(f"{k} = {', '.join(map(str, v))}" for k, v in sweep.axes)
    head = "".join(
        f'<th><div class="label">{escape(label)}</div>'
        f'<div class="muted">{escape(recipe_text(picks[label]["extends"], picks[label]["values"]))}</div></th>'
        for label in labels
    )
    body = []
    for photo in photos:
        row = "".join(f"<td>{_cell(out, cells.get((photo, label)))}</td>" for label in labels)
        body.append(f'<tr><th class="photo">{escape(Path(photo).name)}</th>{row}</tr>')
    commands = "\n".join(escape(save_command(out, label)) for label in labels)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lpengine sweep</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#0f172a}}
table{{border-collapse:collapse}} th,td{{border:1px solid #cbd5e1;padding:6px;vertical-align:top}}
thead th{{background:#f1f5f9;font-weight:600;text-align:left;max-width:260px}}
th.photo{{text-align:left;max-width:140px;word-break:break-all}}
video{{width:240px;display:block;background:#000}} .label{{font-family:monospace}}
.muted{{color:#64748b;font-size:12px;font-weight:400}} .badge{{display:inline-block;padding:1px 6px;border-radius:8px;
color:#fff;font-size:12px;background:var(--c)}} pre{{background:#f1f5f9;padding:12px;overflow:auto}}
</style></head><body>
<h1>Sweep: {len(photos)} photo(s) × {len(labels)} combination(s)</h1>
<p class="muted">{escape(axes)}. Rows are photos, columns are combinations; play the videos side by side.</p>
<table><thead><tr><th>photo</th>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>Keep one</h2>
<p>Save the column you like as a preset (replace NAME), then use it with <code>video: {{preset: NAME}}</code>:</p>
<pre>{commands}</pre>
</body></html>
"""


_VERDICT_COLOURS = {"ok": "#15803d", "warn": "#ca8a04", "bad": "#dc2626"}


def _cell(out: Path, row: dict[str, Any] | None) -> str:
    if row is None:
        return '<span class="muted">not in this run</span>'
    parts = []
    if row.get("state") == "succeeded" and row.get("output"):
        src = quote(os.path.relpath(row["output"], out))
        parts.append(f'<video src="{src}" controls muted loop playsinline preload="metadata"></video>')
    else:
        parts.append(f'<span class="badge" style="--c:#dc2626">{escape(str(row.get("state")))}</span>')
        parts.append(f'<div class="muted">{escape(str(row.get("reason") or ""))[:200]}</div>')
    verdict = row.get("verdict")  # written by the result analysis (`lpengine analyze`) when it has run
    if verdict:
        colour = _VERDICT_COLOURS.get(str(verdict), "#64748b")
        flags = ", ".join(map(str, row.get("flags") or []))
        parts.append(
            f'<div><span class="badge" style="--c:{colour}">{escape(str(verdict))}</span> {escape(flags)}</div>'
        )
    return "".join(parts)
