"""Planning: safe, unique, stable output names; manifests streamed with one message per bad row."""

from __future__ import annotations

import pathlib
import tracemalloc
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from lpengine.config import load_config
from lpengine.models import ItemSpec
from lpengine.plan import Namer, PlanProblem, iter_plan, safe_stem
from tests.conftest import write


@given(st.text(max_size=300))
def test_safe_stem_never_escapes_the_output_folder(name: str) -> None:
    """Property: whatever the input, the stem is a single, non-hidden, bounded path component."""
    stem = safe_stem(name)
    assert stem
    assert "/" not in stem and "\\" not in stem and "\x00" not in stem
    assert not stem.startswith(".")
    assert stem not in (".", "..")
    assert len(stem) <= 120
    root = Path("/out")
    assert (root / f"{stem}.mp4").resolve().parent == root


@given(st.lists(st.tuples(st.text(min_size=1, max_size=20), st.sampled_from(["", ".jpg", ".png"])), max_size=40))
def test_namer_assigns_unique_names(entries: list[tuple[str, str]]) -> None:
    """Property: no two inputs ever share an output name (case-insensitively)."""
    namer = Namer()
    names = [namer.assign(stem, suffix).casefold() for stem, suffix in entries]
    assert len(names) == len(set(names))


def test_same_stem_different_extension_do_not_collide() -> None:
    """`a.jpg` and `a.png` become `a` and `a_png`."""
    namer = Namer()
    assert namer.assign("a", ".jpg") == "a"
    assert namer.assign("a", ".png") == "a_png"
    assert namer.assign("a", ".png") == "a_png_2"
    assert safe_stem("../../etc/passwd") == "_.._etc_passwd"  # one harmless component
    assert safe_stem("照片 一.jpg") == "照片 一.jpg"
    assert safe_stem("CON") == "CON_"


def test_folder_plan_lists_images_and_refuses_escaping_symlinks(tmp_path: Path) -> None:
    """Folder scans are sorted; a symlink out of the folder is a named problem, not an upload."""
    photos = tmp_path / "photos"
    for name in ("b.jpg", "a.png", "a.jpg", "notes.txt"):
        write(photos / name, "x")
    secret = write(tmp_path / "secret.jpg", "x")
    (photos / "link.jpg").symlink_to(secret)
    cfg = load_config(write(tmp_path / "b.yaml", "inputs:\n  images: photos\naudio: v.wav\n"))
    plan = list(iter_plan(cfg))
    specs = [p for p in plan if isinstance(p, ItemSpec)]
    problems = [p for p in plan if isinstance(p, PlanProblem)]
    assert [s.output_name for s in specs] == ["a", "a_png", "b"]
    assert len(problems) == 1 and "symlink pointing outside" in problems[0].message


def test_folder_and_glob_scans_pick_and_order_files_by_path(tmp_path: Path) -> None:
    """A folder takes image suffixes in any case (`..jpg` has one, the hidden `.jpg` has none); a glob takes what
    it matches except folders; both in path order."""
    photos = tmp_path / "photos"
    for name in ("b.jpg", "..jpg", ".jpg", "X.JPG", "notes.txt", "sub/c.jpg"):
        write(photos / name, "x")
    (photos / "dir.jpg").mkdir()

    def sources(images: str) -> list[str]:
        cfg = load_config(write(tmp_path / "b.yaml", f"inputs:\n  images: '{images}'\naudio: v.wav\n"))
        return [Path(entry.source).relative_to(photos).as_posix() for entry in iter_plan(cfg)]

    assert sources("photos") == ["..jpg", "X.JPG", "b.jpg", "dir.jpg"]
    assert sources("photos/**/*.jpg") == ["b.jpg", "sub/c.jpg"]


def test_manifest_rows_each_get_one_message(tmp_path: Path) -> None:
    """Bad rows are reported with file:line and the fix; good rows carry their overrides."""
    manifest = write(
        tmp_path / "m.csv",
        "image,output,template_id,video_fps\n"
        "a.jpg,alice,calm,25\n"
        ",nobody,,\n"
        "b.jpg,bob,wild,\n"
        "a.jpg,alice,calm,25\n"
        "https://example.com/c.png,,,\n",
    )
    cfg = load_config(write(tmp_path / "b.yaml", f"inputs:\n  manifest: {manifest.name}\naudio: v.wav\n"))
    plan = list(iter_plan(cfg))
    assert isinstance(plan[0], ItemSpec) and plan[0].output_name == "alice"
    assert plan[0].params.template_id == "calm" and plan[0].params.video_fps == 25
    assert isinstance(plan[1], PlanProblem) and "m.csv:3" in plan[1].source and "missing `image`" in plan[1].message
    assert isinstance(plan[2], PlanProblem) and "template_id" in plan[2].message
    assert isinstance(plan[3], PlanProblem) and "duplicate of line 2" in plan[3].message
    assert isinstance(plan[4], ItemSpec) and plan[4].image == "https://example.com/c.png"
    assert plan[4].output_name == "c"


def test_streaming_a_manifest_holds_no_memory_per_row(tmp_path: Path) -> None:
    """The plan remembers every output name and row key until the last item (uniqueness, duplicate rows), but on
    disk: across 18 000 URL rows, nothing the plan keeps grows with the rows read (in Python sets it held ~0.35 KB
    a row, 6 MB here, for the whole batch). A duplicate far back is still found."""
    rows = [f"https://example.com/photos/img-{i:06d}.png?sig={i:040x}" for i in range(20_000)]
    write(tmp_path / "m.csv", "image\n" + "\n".join([*rows, rows[3]]) + "\n")
    cfg = load_config(write(tmp_path / "b.yaml", "inputs:\n  manifest: m.csv\naudio: v.wav\n"))
    # pathlib interns every name it parses; the interpreter's table of interned names grows once to fit them and
    # then stays (it is not per row, and not the plan's), so it is left out of the count
    not_pathlib = [tracemalloc.Filter(False, pathlib.__file__)]
    plan = iter_plan(cfg)
    tracemalloc.start()
    try:
        first = [next(plan) for _ in range(1_000)]
        before = tracemalloc.take_snapshot().filter_traces(not_pathlib)
        for _ in range(18_000):
            next(plan)
        after = tracemalloc.take_snapshot().filter_traces(not_pathlib)
    finally:
        tracemalloc.stop()
    rest = list(plan)
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert all(isinstance(p, ItemSpec) for p in first) and len(rest) == 1_001
    assert grown < 200_000, grown  # 18 000 rows: in Python sets, ~6 MB
    assert isinstance(rest[-1], PlanProblem) and "duplicate of line 5" in rest[-1].message
    assert isinstance(rest[-2], ItemSpec) and rest[-2].output_name == "img-019999"


def test_jsonl_manifest_and_unknown_columns(tmp_path: Path) -> None:
    """JSONL works; an unknown column names the allowed ones; broken JSON names the line."""
    write(tmp_path / "m.jsonl", '{"image": "a.jpg", "eye_move_freq": 0.2}\n{"imgae": "b.jpg"}\n{oops\n')
    cfg = load_config(write(tmp_path / "b.yaml", "inputs:\n  manifest: m.jsonl\naudio: v.wav\n"))
    plan = list(iter_plan(cfg))
    assert isinstance(plan[0], ItemSpec) and plan[0].params.eye_move_freq == 0.2
    assert isinstance(plan[1], PlanProblem) and "unknown column(s) imgae" in plan[1].message
    assert isinstance(plan[2], PlanProblem) and "invalid JSON" in plan[2].message
