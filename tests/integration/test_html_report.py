"""report.html from a batch with every terminal state: structure, escaping, offline assets, and a real browser."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from lpengine.models import ItemResult, ItemState, RunReport
from lpengine.reports.html_report import THUMBNAIL_ROWS, suggest_fix, write_html_report

STUB_MP4 = Path(__file__).resolve().parents[2] / "lpengine" / "assets" / "emulator-stub.mp4"
XSS = "<script>alert(1)</script>.jpg"
ROWS = re.compile(r'<tr data-state="([a-z_]+)"')


def portrait(path: Path, hue: int, mode: str = "RGB") -> Path:
    """A small picture with a face-like shape, so thumbnails are visibly distinct in the screenshot."""
    image = Image.new(mode, (240, 320), (hue, 180, 255 - hue) if mode == "RGB" else (hue, 180, 255 - hue, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 70, 180, 220), fill=(240, 205, 170))
    draw.ellipse((92, 120, 108, 136), fill=(40, 40, 40))
    draw.ellipse((132, 120, 148, 136), fill=(40, 40, 40))
    draw.arc((95, 150, 145, 190), 20, 160, fill=(150, 40, 40), width=4)
    image.save(path)
    return path


def result(
    input_: str,
    state: ItemState,
    reason: str = "",
    *,
    output: str | None = None,
    task_id: str | None = None,
    task_code: str | None = None,
    duration: float | None = None,
    attempts: int = 0,
    cost: float = 0.0,
    timings: dict[str, float] | None = None,
) -> ItemResult:
    return ItemResult(
        input=input_,
        output=output,
        state=state,
        reason=reason,
        detect_message=None,
        task_id=task_id,
        task_code=task_code,
        video_duration=duration,
        submit_attempts=attempts,
        timings=timings or {},
        cost_cny=cost,
    )


def build_report(tmp_path: Path) -> tuple[RunReport, Path]:
    """20 items, every terminal state, real images and real (stub) MP4s in the output folder."""
    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    items: list[ItemResult] = []
    for i in range(5):
        image = portrait(src / f"speaker-{i}.jpg", 40 * i)
        video = out / f"speaker-{i}.mp4"
        shutil.copyfile(STUB_MP4, video)
        timings = {"upload": 0.21, "detect": 1.4, "submit": 0.3, "poll": 95.0 + i, "download": 0.8}
        items.append(
            result(
                str(image),
                ItemState.SUCCEEDED,
                output=str(video),
                task_id=f"task-{i:04d}",
                duration=12.5,
                attempts=1,
                cost=0.254,
                timings=timings,
            )
        )
    rgba = portrait(src / "transparent.png", 200, mode="RGBA")
    broken = src / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    items += [
        result(XSS, ItemState.REJECTED_LOCALLY, f"{XSS}: is not a valid JPEG — re-export or re-download it"),
        result(str(broken), ItemState.REJECTED_LOCALLY, f"{broken}: is a truncated JPEG — re-export it"),
        result(str(rgba), ItemState.UPLOAD_FAILED, "S3 AccessDenied: check the bucket policy", timings={"upload": 2}),
        result(str(portrait(src / "side.jpg", 90)), ItemState.DETECT_FAILED, "The face is too small.", cost=0.004),
        result(
            str(portrait(src / "nobody.jpg", 120)),
            ItemState.TASK_FAILED,
            "InvalidImage.NoHumanFace: No human face detected.",
            task_id="task-nf",
            task_code="InvalidImage.NoHumanFace",
            attempts=1,
            cost=0.004,
        ),
        result(
            str(portrait(src / "flaky.jpg", 160)),
            ItemState.TASK_FAILED,
            "InternalError.Algo: Algorithm error.",
            task_id="task-ie",
            task_code="InternalError.Algo",
            attempts=1,
        ),
        result(
            str(portrait(src / "moderated.jpg", 30)),
            ItemState.TASK_FAILED,
            "DataInspectionFailed: Input or output data may contain inappropriate content.",
            task_code="DataInspectionFailed",
        ),
        result(
            "https://example.com/remote/portrait.jpg",
            ItemState.SUBMIT_FAILED,
            "the service refused the task: InvalidParameter.UnsupportedFileFormat: Input files format not supported.",
            attempts=1,
        ),
        result(
            str(portrait(src / "late.jpg", 70)),
            ItemState.DOWNLOAD_FAILED,
            "result URL expired (valid 24 h after the task ends); a re-run submits the item again",
            task_id="task-exp",
            duration=9.0,
            attempts=1,
        ),
        result(
            str(portrait(src / "slow.jpg", 110)),
            ItemState.TIMED_OUT,
            "task not finished within limits.task_timeout_s (last seen RUNNING)",
            task_id="task-slow",
            attempts=1,
        ),
        result(
            str(portrait(src / "stopped.jpg", 150)),
            ItemState.CANCELLED,
            "the run stopped before this item finished; a re-run resumes it",
        ),
    ]
    for i in range(20 - len(items)):
        items.append(result(str(portrait(src / f"queued-{i}.jpg", 10 + 25 * i)), ItemState.CANCELLED, "not started"))
    report = RunReport(items=tuple(items), wall_time_s=754.2, api_requests={"detect": 14, "submit": 9}, retries=3)
    return report, out


@pytest.fixture
def written(tmp_path: Path) -> tuple[RunReport, Path]:
    report, out = build_report(tmp_path)
    path = write_html_report(report, out, title="Spring campaign", extra={"service busy": "81 %"})
    assert path == out / "report.html"
    return report, path


def test_structure_escaping_and_offline_assets(written: tuple[RunReport, Path]) -> None:
    report, path = written
    html = path.read_text(encoding="utf-8")
    assert len(ROWS.findall(html)) == len(report.items) == 20
    assert set(ROWS.findall(html)) == {s.value for s in ItemState}
    assert not list(path.parent.glob(".report.html*.tmp"))
    # escaping: the hostile file name shows as text, never as markup
    assert XSS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in html
    assert html.count("<script>") == 1
    # self-contained: nothing fetched from the network
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html)
    assert "url(" not in html and "@import" not in html
    # videos play from a path relative to the output folder, so the folder can move
    assert '<video controls preload="metadata" src="speaker-0.mp4">' in html
    # thumbnails for readable local images only: not the hostile name, the broken file or the URL
    assert html.count('src="data:image/jpeg;base64,') == 17
    assert "Spring campaign" in html and "service busy" in html and "81 %" in html
    assert "1.278 CNY" in html  # 5 videos × 0.254 + 2 paid detects × 0.004
    assert "12 min 34 s" in html


@pytest.mark.parametrize(
    ("state", "reason", "code", "expected"),
    [
        (ItemState.REJECTED_LOCALLY, "x.jpg: is empty", None, "fix or replace the file"),
        (ItemState.DETECT_FAILED, "The face is too small.", None, "frontal, well-lit face"),
        (ItemState.TASK_FAILED, "InternalError.Timeout: …", "InternalError.Timeout", "re-run: the batch retries it"),
        (ItemState.TASK_FAILED, "InvalidImage.NoHumanFace: No human face detected.", None, "clear, frontal"),
        (ItemState.TASK_FAILED, "DataInspectionFailed: …", "DataInspectionFailed", "content moderation"),
        (ItemState.SUBMIT_FAILED, "the service refused the task: InvalidFile.AudioLengthError: x", None, "1–180 s"),
        (ItemState.DOWNLOAD_FAILED, "result URL expired (valid 24 h)", None, "submitted again"),
        (ItemState.CANCELLED, "the run stopped", None, "re-run to resume"),
        (ItemState.CANCELLED, "batch stopped: Arrearage: overdue", None, "account or key"),
        (ItemState.UPLOAD_FAILED, "S3 AccessDenied", None, "storage settings"),
        (ItemState.TIMED_OUT, "task not finished", None, "task_timeout_s"),
        (ItemState.TASK_FAILED, "task failed with retryable InternalError.Algo; max_submit_attempts", None, "raise"),
    ],
)
def test_suggested_fix(state: ItemState, reason: str, code: str | None, expected: str) -> None:
    assert expected in suggest_fix(result("x.jpg", state, reason, task_code=code))


def test_video_links_are_relative_to_the_page_wherever_the_video_is(tmp_path: Path) -> None:
    """A video in (a subfolder of) the output folder, one beside it, and one whose folder only shares a prefix
    with the output folder's name: each link leads from report.html to the file, with its characters quoted."""
    out = tmp_path / "out"
    places = [out / "sub" / "clip one.mp4", tmp_path / "other" / "clip#2.mp4", tmp_path / "out-old" / "clip3.mp4"]
    for video in places:
        video.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STUB_MP4, video)
    items = tuple(result(f"{i}.jpg", ItemState.SUCCEEDED, output=str(v)) for i, v in enumerate(places))
    html = write_html_report(RunReport(items=items, wall_time_s=1.0), out).read_text(encoding="utf-8")
    links = re.findall(r'<video controls preload="metadata" src="([^"]+)">', html)
    assert links == ["sub/clip%20one.mp4", "../other/clip%232.mp4", "../out-old/clip3.mp4"]


def test_large_batch_bounds_thumbnails(tmp_path: Path) -> None:
    image = portrait(tmp_path / "one.jpg", 100)
    items = tuple(result(str(image), ItemState.TASK_FAILED, f"InternalError.Algo: row {i}") for i in range(10_000))
    html = write_html_report(RunReport(items=items, wall_time_s=1.0), tmp_path / "out").read_text(encoding="utf-8")
    assert len(ROWS.findall(html)) == 10_000
    assert html.count('src="data:image/jpeg;base64,') == THUMBNAIL_ROWS


def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return found


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


def test_renders_in_headless_chromium(written: tuple[RunReport, Path], tmp_path: Path) -> None:
    binary = _chromium()
    _, path = written
    dumped = _run_chromium(binary, tmp_path / "profile", "--dump-dom", path.as_uri())
    assert len(ROWS.findall(dumped.stdout)) == 20
    assert 'data-ready="true"' in dumped.stdout  # the script ran to its last line
    console = [line for line in dumped.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []

    # the filter the buttons drive, reached through the URL hash (same code path as a click)
    filtered = _run_chromium(binary, tmp_path / "profile", "--dump-dom", path.as_uri() + "#task_failed")
    assert re.search(r'<table id="items" data-filter="task_failed">', filtered.stdout)
    assert re.search(r'data-filter="task_failed" aria-pressed="true"', filtered.stdout)

    shot = tmp_path / "shot.png"
    _run_chromium(binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", path.as_uri())
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)


def _judged(tmp_path: Path) -> tuple[RunReport, Path]:
    """The 20-item report with verdicts on its five videos, and a frame strip for one of them."""
    report, out = build_report(tmp_path)
    verdicts = [
        ("ok", [], 100),
        ("bad", ["frozen", "lip_sync_offset"], 20),
        ("warn", ["audio_missing"], 85),
        ("analysis_failed", [], None),
    ]
    items = list(report.items)
    for index, (verdict, flags, score) in enumerate(verdicts):
        metrics = {"error": "TimeoutError: analysis took longer than 300 s"} if score is None else {"fps": 25.0}
        items[index] = dataclasses.replace(items[index], verdict=verdict, flags=flags, score=score, metrics=metrics)
    frames = out / ".lpengine" / "frames"
    frames.mkdir(parents=True)
    Image.new("RGB", (288, 96), (200, 60, 60)).save(frames / "speaker-1.jpg")
    judged = RunReport(items=tuple(items), wall_time_s=report.wall_time_s)
    write_html_report(judged, out)
    return judged, out / "report.html"


def test_verdicts_strip_and_needs_review_filter(tmp_path: Path) -> None:
    report, path = _judged(tmp_path)
    html = path.read_text(encoding="utf-8")
    assert report.needs_review == (3, ["speaker-1.mp4", "speaker-2.mp4", "speaker-3.mp4"])
    assert len(re.findall(r"<tr [^>]*data-review", html)) == 3
    assert re.search(r'data-filter="review"[^>]*>needs review 3<', html)
    assert '#items[data-filter="review"] tbody tr:not([data-review]){display:none}' in html
    assert html.count('class="badge verdict"') == 4
    assert "<code>frozen</code> <code>lip_sync_offset</code>" in html
    assert html.count('class="strip" src=".lpengine/frames/speaker-1.jpg"') == 1
    assert "analysis took longer than 300 s" in html

    binary = _chromium()
    dumped = _run_chromium(binary, tmp_path / "profile", "--dump-dom", path.as_uri() + "#review")
    assert 'data-ready="true"' in dumped.stdout
    assert re.search(r'<table id="items" data-filter="review">', dumped.stdout)
    assert re.search(r'data-filter="review" aria-pressed="true"', dumped.stdout)
    assert [line for line in dumped.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line] == []
    shot = tmp_path / "review.png"
    _run_chromium(
        binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,900", path.as_uri() + "#review"
    )
    with Image.open(shot) as image:
        assert image.size == (1280, 900)
