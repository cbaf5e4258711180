"""Hostile states of the disk end in one `error:` line naming the path and what to do, exit 2, never a traceback:
a symlink loop among the images, a read-only output folder, a read-only finished batch, a damaged state file."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lpengine.demo_assets import make_portraits

ROOT = Path(__file__).resolve().parents[2]
VOICE = ROOT / "lpengine" / "assets" / "voice.wav"


def lpengine(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "lpengine", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "DASHSCOPE_API_KEY": ""},
    )


def emulated_batch(root: Path, photos: int = 1) -> Path:
    """A batch on the in-process emulator (no key, no network)."""
    make_portraits(root / "photos", photos)
    config = root / "batch.yaml"
    config.write_text(
        f"inputs:\n  images: photos\naudio: {VOICE}\napi:\n  emulator: {{}}\n  speedup: 200\n"
        "storage:\n  backend: fileserver\noutput:\n  dir: out\n"
    )
    return config


@contextmanager
def read_only(folder: Path) -> Iterator[tuple[str, ...]]:
    """Make `folder` read-only for the commands run with the yielded prefix. Permission bits do not stop root, so as
    root the folder is bind-mounted read-only in a private mount namespace of the command (`unshare -m`)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if not p.is_symlink()}
        for path, mode in modes.items():
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield ()
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a folder read-only")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
    prefix = ("unshare", "-m", "sh", "-c", script, "sh", str(folder))
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {probe.stderr.decode().strip()}")
    yield prefix


def one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_symlink_loop_among_the_images_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """`Path.resolve()` raised `RuntimeError: Symlink loop` and ended the run (and `--dry-run`) with a traceback;
    now each looping link is one refused item naming it."""
    config = emulated_batch(tmp_path)
    photos = tmp_path / "photos"
    (photos / "loop.jpg").symlink_to("loop.jpg")
    (photos / "here").symlink_to(".")
    for args in (("run", str(config), "--dry-run"), ("run", str(config))):
        proc = lpengine(*args)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert "loop.jpg: is a symlink loop" in proc.stdout + proc.stderr


def test_a_read_only_output_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    config = emulated_batch(tmp_path)
    (tmp_path / "out").mkdir()
    with read_only(tmp_path / "out") as prefix:
        proc = lpengine("run", str(config), prefix=prefix)
    one_error_line(proc, f"output.dir: cannot write in {tmp_path / 'out'}", "writable")


def test_status_and_report_of_a_read_only_finished_batch_are_one_line_exit_2(tmp_path: Path) -> None:
    config = emulated_batch(tmp_path)
    assert lpengine("run", str(config)).returncode == 0
    with read_only(tmp_path / "out") as prefix:
        status = lpengine("status", str(config), prefix=prefix)
        report = lpengine("report", str(config), prefix=prefix)
    for proc in (status, report):
        line = one_error_line(proc, str(tmp_path / "out"))
        assert "permissions" in line


def test_a_damaged_state_file_is_one_line_exit_2(tmp_path: Path) -> None:
    config = emulated_batch(tmp_path)
    state = tmp_path / "out" / ".lpengine" / "state.db"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"this is not a database, whatever it once was" * 100)
    for command in ("run", "status", "report"):
        one_error_line(lpengine(command, str(config)), f"state.path: {state} is damaged", "backup")
