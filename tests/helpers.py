"""Builders shared by the integration tests: one batch YAML shape, so every test runs the same real pipeline."""

from __future__ import annotations

from pathlib import Path

import anyio

from lpengine import BatchConfig, Engine, ProgressEvent

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


async def cancel_after_first_submit(config: BatchConfig, api_key: str, *, timeout_s: float = 30) -> None:
    """Run the batch and cancel the caller's task as soon as one item has a task id (an interrupted batch)."""
    submitted = anyio.Event()

    def watch(event: ProgressEvent) -> None:
        if event.task_id:
            submitted.set()

    with anyio.fail_after(timeout_s):
        async with anyio.create_task_group() as tg:

            async def batch_run() -> None:
                async with Engine(config, api_key=api_key, on_event=watch) as engine:
                    await engine.run()

            tg.start_soon(batch_run)
            await submitted.wait()
            tg.cancel_scope.cancel()
