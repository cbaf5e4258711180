"""Soak: thousands of items through the real engine against the emulator with ~10 % seeded faults on every endpoint.

    .venv/bin/python scripts/soak.py                       # 2,000 items, seed 2026
    .venv/bin/python scripts/soak.py --items 200 --seed 7  # a quick one
    .venv/bin/python -m pytest -m soak                     # the same 2,000-item run as a test

Faults (FaultSettings, seeded, so a given seed injects the same faults into the same request sequence): on every
endpoint (detect, submit, task, list, cancel, policy, upload, download) 5 % of requests answer an error (429
Throttling / RateQuota / BurstRate, 500 InternalError, 503 ModelUnavailable) and 2 % lose their connection; on top,
1 % of submits lose their answer after the task is queued, 3 % of tasks end FAILED (InternalError.Algo / .Timeout,
worth a resubmit, or DataInspectionFailed, final), 1 % turn UNKNOWN, and 3 % of downloads arrive truncated or
corrupt. The run prints what was injected (from the emulator's statistics), the client's retries, the final states,
and anything lost, which must be nothing:

- every item in exactly one terminal state (none cancelled, none missing);
- every succeeded item's MP4 on disk and verified, no other MP4, no `.part` left;
- no task paid twice: every task the service ran is claimed by exactly one item (except a lost answer's task that
  the service purged, UNKNOWN, before the task list could show it: it is counted apart), a second task for an image
  only after its previous one FAILED or went UNKNOWN, and detect called once per image.

Exit code 0 when nothing is lost, 1 otherwise. The figures go to docs/reliability.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import anyio
import stamina
from PIL import Image

from lpengine import Engine, ItemState, load_config
from lpengine.emulator import EmulatorSettings, FaultSettings, run_emulator
from lpengine.media import MediaError, verify_mp4
from lpengine.stages.poll import retryable_task_code

ROOT = Path(__file__).resolve().parents[1]
VOICE = ROOT / "lpengine" / "assets" / "voice.wav"
KEY = "sk-soak-0123456789"
ENDPOINTS = ("detect", "submit", "task", "list", "cancel", "policy", "upload", "download")


def faults(seed: int) -> FaultSettings:
    return FaultSettings(
        seed=seed,
        error_rate=dict.fromkeys(ENDPOINTS, 0.05),
        error_codes=["Throttling", "Throttling.RateQuota", "Throttling.BurstRate", "InternalError", "ModelUnavailable"],
        drop_rate=dict.fromkeys(ENDPOINTS, 0.02),
        lose_submit_response_rate=0.01,
        task_failure_rate=0.03,
        task_failure_codes=["InternalError.Algo", "InternalError.Timeout", "DataInspectionFailed"],
        unknown_task_rate=0.01,
        truncate_download_rate=0.015,
        corrupt_download_rate=0.015,
    )


def make_images(folder: Path, n: int, seed: int) -> list[Path]:
    """`n` distinct small portraits-to-be: random noise, so each has its own sha256 and passes the `rule` detector."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        buf = io.BytesIO()
        Image.frombytes("L", (48, 64), rng.randbytes(48 * 64)).convert("RGB").save(buf, "PNG")
        path = folder / f"face-{i:05d}.png"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def write_config(root: Path, base_url: str, speedup: float) -> Path:
    path = root / "soak.yaml"
    path.write_text(
        f"""
inputs:
  images: photos
audio: {VOICE}
api:
  base_url: {base_url}
  speedup: {speedup}
  retry:
    attempts: 6
    initial_wait_s: 0.005
    max_wait_s: 0.05
concurrency:
  submit_window: 8
  buffer: 16
output:
  dir: out
"""
    )
    return path


async def soak(
    items: int = 2000, seed: int = 2026, speedup: float = 1000.0, workdir: Path | None = None
) -> dict[str, Any]:
    """Run the soak; returns the summary (its `lost` list must be empty)."""
    with tempfile.TemporaryDirectory(prefix="lpengine-soak-") as tmp:
        root = workdir or Path(tmp)
        images = make_images(root / "photos", items, seed)
        sha_of = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
        settings = EmulatorSettings(
            api_keys=[KEY], speedup=speedup, seed=seed, video="stub", detector="rule", faults=faults(seed)
        )
        async with run_emulator(settings) as emu:
            config = load_config(write_config(root, emu.base_url, speedup))
            started = time.perf_counter()
            async with Engine(config, api_key=KEY) as engine:
                report = await engine.run()
            wall = time.perf_counter() - started
            stats = emu.stats()
        out = config.output_dir
        with sqlite3.connect(config.state_path) as db:
            claims = Counter(str(row[0]) for row in db.execute("SELECT task_id FROM task_claims"))

        lost: list[str] = []
        states = Counter(r.state.value for r in report.items)
        by_name = {Path(r.input).name: r for r in report.items}
        if len(report.items) != items or set(by_name) != set(sha_of):
            lost.append(f"{items} items planned, {len(by_name)} reported")
        for r in report.items:
            if r.state is ItemState.CANCELLED:
                lost.append(f"{r.input}: cancelled ({r.reason})")
            elif r.state is not ItemState.SUCCEEDED and not r.reason:
                lost.append(f"{r.input}: {r.state.value} without a reason")

        succeeded = {Path(r.output).name for r in report.items if r.state is ItemState.SUCCEEDED and r.output}
        on_disk = {p.name for p in out.glob("*.mp4")}
        if succeeded != on_disk or len(succeeded) != states.get("succeeded", 0):
            lost.append(f"{len(succeeded)} succeeded but {len(on_disk)} MP4 files on disk")
        for name in sorted(on_disk):
            try:
                verify_mp4(out / name)
            except MediaError as exc:
                lost.append(f"{name}: corrupt video kept: {exc.reason}")
        lost.extend(f"partial download left: {p.name}" for p in out.rglob("*.part"))

        runs_by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for run in stats.runs:
            runs_by_image[run.image_sha256 or ""].append((run.task_id, run.status))
        duplicates = vanished = 0
        for image_sha, runs in runs_by_image.items():
            for task_id, status in runs:
                if claims.get(task_id) == 1:
                    continue
                if status == "UNKNOWN":
                    # a lost answer's task that the service purged before the task list was read: nothing to adopt,
                    # so sending again was the only way to get the video (the service forgot the first one)
                    vanished += 1
                else:
                    lost.append(f"task {task_id} ({status}, image {image_sha[:12]}) ran but no item claimed it")
            duplicates += len(runs) - 1
            for _, status in runs[:-1]:  # a task before the image's last one must have failed or vanished
                if status not in ("FAILED", "UNKNOWN"):
                    lost.append(f"image {image_sha[:12]} submitted again after a {status} task")
        unfinished = sum(n for status, n in stats.tasks_by_status.items() if status in ("PENDING", "RUNNING"))
        if unfinished:
            lost.append(f"{unfinished} task(s) still queued at the service when the batch ended")
        twice = [sha for sha, n in stats.detect_per_image.items() if n > 1]
        lost.extend(f"detect paid {stats.detect_per_image[sha]} times for image {sha[:12]}" for sha in twice)
        over = [r.input for r in report.items if r.submit_attempts > config.state.max_submit_attempts]
        lost.extend(f"{name}: submitted more than state.max_submit_attempts times" for name in over)
        final_task_codes = Counter(
            r.task_code or "" for r in report.items if r.state is ItemState.TASK_FAILED and r.task_code
        )
        retryable_left = sum(n for code, n in final_task_codes.items() if retryable_task_code(code))

        total_requests = sum(stats.requests.values())
        injected = sum(stats.faults.values())
        summary: dict[str, Any] = {
            "items": items,
            "seed": seed,
            "speedup": speedup,
            "wall_time_s": round(wall, 1),
            "items_per_s": round(items / wall, 1),
            "final_states": dict(sorted(states.items(), key=lambda kv: -kv[1])),
            "requests": dict(stats.requests),
            "faults_injected": dict(stats.faults),
            "faults_total": injected,
            "fault_ratio": round(injected / max(total_requests, 1), 4),
            "throttled_429": dict(stats.throttled),
            "client_retries": report.retries,
            "client_throttled": report.throttled,
            "tasks_created": sum(stats.submissions_per_image.values()),
            "resubmits_after_failed_or_unknown": duplicates,
            "lost_answer_tasks_purged_before_reconciling": vanished,
            "task_failed_codes": dict(final_task_codes),
            "task_failed_retryable_out_of_attempts": retryable_left,
            "runner_busy_s": round(stats.runner_busy_s, 1),
            "runner_idle_s": round(stats.runner_idle_s, 1),
            "videos_verified": len(on_disk),
            "lost": lost,
        }
        return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--speedup", type=float, default=1000.0, help="emulated seconds per real second")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    # Quiet: the JSON summary is the output. Per-item warnings are in the batch's JSONL log (with --keep); errors,
    # which would mean a bug, still print.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    stamina.instrumentation.set_on_retry_hooks([])
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    summary = anyio.run(soak, args.items, args.seed, args.speedup, args.keep)
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    print("nothing lost" if not summary["lost"] else f"LOST: {len(summary['lost'])} problem(s)", file=sys.stderr)
    return 0 if not summary["lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
