"""Builders shared by the integration tests: one batch YAML shape, so every test runs the same real pipeline."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOICE = ROOT / "lpengine" / "assets" / "voice.wav"


def write_batch(
    folder: Path, base_url: str, speedup: float, *, storage: str = "", audio: Path | str = VOICE, **sections: str
) -> Path:
    """`folder/batch.yaml` reading `folder/photos` (and `audio`, the demo voice by default), against an emulator
    at `base_url` (fast retries, window 4).

    `storage` is the body of the `storage:` block (indented lines); `sections` adds top-level `key: value` lines.
    """
    body = f"""
inputs:
  images: photos
audio: {audio}
api:
  base_url: {base_url}
  speedup: {speedup}
  retry:
    initial_wait_s: 0.01
    max_wait_s: 0.05
concurrency:
  submit_window: 4
output:
  dir: out
"""
    if storage:
        body += f"storage:{storage}\n"
    for key, value in sections.items():
        body += f"{key}: {value}\n"
    path = folder / "batch.yaml"
    path.write_text(body)
    return path
