"""`lpengine analyze` as users run it: the exact JSON shape, exit codes 0/1/2, one line per bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")

from lpengine.emulator.media import inspect_image, make_thumbnail
from lpengine.emulator.talking import Look, render

ROOT = Path(__file__).resolve().parents[2]
VOICE = ROOT / "lpengine" / "assets" / "voice.wav"


def lpengine(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prelude}import sys; from lpengine.cli import main; sys.argv = ['lpengine', *sys.argv[1:]]; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=False, env=os.environ
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    thumb = make_thumbnail(inspect_image((ROOT / "lpengine/assets/portraits/astronaut.png").read_bytes()))
    made = {}
    for name, look in (("good", Look()), ("lagging", Look(defect="lip_lag"))):
        made[name] = folder / f"{name}.mp4"
        made[name].write_bytes(render(thumb, VOICE.read_bytes(), 25, look))
    return made


def test_json_shape_and_exit_1_when_any_video_is_not_ok(videos: dict[str, Path]) -> None:
    proc = lpengine(
        "analyze", str(videos["good"]), str(videos["lagging"]), "--audio", str(VOICE), "--fps", "25", "--json"
    )
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert list(out) == ["videos"]
    assert [list(v) for v in out["videos"]] == [["path", "verdict", "flags", "metrics"]] * 2
    good, lagging = out["videos"]
    assert (good["path"], good["verdict"], good["flags"]) == (str(videos["good"]), "ok", [])
    assert (lagging["verdict"], lagging["flags"]) == ("bad", ["lip_sync_offset"])
    assert lagging["metrics"]["lip_sync_lag_ms"] == pytest.approx(400, abs=80)
    assert good["metrics"]["expected_fps"] == 25 and good["metrics"]["score"] == 100


def test_all_ok_exits_0(videos: dict[str, Path]) -> None:
    proc = lpengine("analyze", str(videos["good"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["ok", "100"]


def test_bad_inputs_one_line_each_exit_2_and_the_rest_still_judged(tmp_path: Path, videos: dict[str, Path]) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    missing = tmp_path / "missing.mp4"
    folder = tmp_path / "folder"
    folder.mkdir()
    proc = lpengine("analyze", str(empty), str(text), str(missing), str(folder), str(videos["good"]), "--json")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4, proc.stderr
    for path, words in ((empty, "empty"), (text, "not a video"), (missing, "no such file"), (folder, "report.json")):
        assert any(line.startswith(f"error: {path}: ") and words in line for line in lines), (path, lines)
    assert "Traceback" not in proc.stderr
    assert [v["verdict"] for v in json.loads(proc.stdout)["videos"]] == ["ok"]


def test_bad_voice_track_is_a_usage_error(videos: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "voice.wav"
    text.write_text("hello")
    proc = lpengine("analyze", str(videos["good"]), "--audio", str(text))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: --audio {text}: ") and len(proc.stderr.strip().splitlines()) == 1


def test_without_the_extra_it_says_how_to_install(videos: dict[str, Path]) -> None:
    proc = lpengine("analyze", str(videos["good"]), prelude="import sys; sys.modules['av'] = None; ")
    assert proc.returncode == 2
    assert "analysis" in proc.stderr and "setup.sh analysis" in proc.stderr and "Traceback" not in proc.stderr
