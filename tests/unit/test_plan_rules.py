"""The plan's money rules, stated by the tests' names and proved over generated trees of files, links and manifests:
one file is one item however many paths reach it, and an input's output name never changes because other inputs
appear or disappear."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lpengine.config import load_config
from lpengine.models import ItemSpec
from lpengine.plan import Namer, PlanProblem, iter_plan
from tests.conftest import write


def plan(folder: Path, inputs: str, records: Iterable[tuple[str, str | None, str]] = ()) -> list[object]:
    cfg = load_config(write(folder / "b.yaml", f"inputs:\n{inputs}\naudio: v.wav\n"))
    namer = Namer()
    namer.record(records)
    return list(iter_plan(cfg, namer))


def specs(entries: list[object]) -> list[ItemSpec]:
    return [e for e in entries if isinstance(e, ItemSpec)]


def problems(entries: list[object]) -> list[PlanProblem]:
    return [e for e in entries if isinstance(e, PlanProblem)]


def records(entries: list[object]) -> list[tuple[str, str | None, str]]:
    """What the state store keeps of a plan's items once they ran: input, key, output name."""
    return [(s.image, s.key, s.output_name) for s in specs(entries)]


def file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_one_file_is_one_item_however_many_paths_reach_it(tmp_path: Path) -> None:
    """A recursive glob over `x → .` and `y → ..` (each made ~40 paid items per photo, or planned forever), a file
    link and a hard link: each file is planned once, and each looping or escaping link is one line."""
    photos = tmp_path / "photos"
    write(photos / "a.jpg", "a")
    write(photos / "sub" / "b.jpg", "b")
    write(tmp_path / "outside" / "c.jpg", "c")
    (photos / "x").symlink_to(".")
    (photos / "sub" / "y").symlink_to("..")
    (photos / "up").symlink_to("..")
    (photos / "sub" / "alias.jpg").symlink_to("../a.jpg")
    os.link(photos / "sub" / "b.jpg", photos / "hard.jpg")
    entries = plan(tmp_path, "  images: 'photos/**/*.jpg'")
    planned = specs(entries)
    assert len({file_id(s.image) for s in planned}) == len(planned) == 2
    assert [Path(s.image).name for s in planned] == ["a.jpg", "hard.jpg"]  # the first path in order, for b.jpg
    lines = {Path(p.source).name: p.message for p in problems(entries)}
    assert set(lines) == {"x", "y", "up"}
    assert "symlink loop" in lines["x"] and "symlink loop" in lines["y"] and "symlink loop" in lines["up"]


def test_links_leaving_the_input_folder_or_looping_are_refused_with_one_line_each(tmp_path: Path) -> None:
    """A folder link out of the tree, a file link out of it, and a file link to itself: one named line each, no
    traceback (`Path.resolve` raised `RuntimeError: Symlink loop`)."""
    photos = tmp_path / "photos"
    write(photos / "a.jpg", "a")
    write(tmp_path / "elsewhere" / "c.jpg", "c")
    (photos / "away").symlink_to(tmp_path / "elsewhere")
    (photos / "out.jpg").symlink_to(tmp_path / "elsewhere" / "c.jpg")
    (photos / "self.jpg").symlink_to("self.jpg")
    for inputs in ("  images: photos", "  images: 'photos/**/*.jpg'"):
        entries = plan(tmp_path, inputs)
        lines = {Path(p.source).name: p.message for p in problems(entries)}
        assert [Path(s.image).name for s in specs(entries)] == ["a.jpg"]
        assert "outside the input folder" in lines["out.jpg"] and "symlink loop" in lines["self.jpg"]
        if "**" in inputs:
            assert "outside the input folder" in lines["away"]


def test_a_manifest_row_through_dotdot_is_a_duplicate_of_the_same_file(tmp_path: Path) -> None:
    """`dir/../dir/x.jpg`, `./dir/x.jpg` and a link to it name one file: one item, the others duplicates."""
    write(tmp_path / "dir" / "x.jpg", "x")
    (tmp_path / "link.jpg").symlink_to("dir/x.jpg")
    write(tmp_path / "m.csv", "image\ndir/x.jpg\ndir/../dir/x.jpg\n./dir/x.jpg\nlink.jpg\n")
    entries = plan(tmp_path, "  manifest: m.csv")
    assert len(specs(entries)) == 1
    assert [p.message for p in problems(entries)] == ["duplicate of line 2; remove one of them"] * 3


def test_an_items_output_name_never_changes_when_other_files_appear(tmp_path: Path) -> None:
    """`a.png` finished as `a`; adding `a.jpg` (which sorts first) leaves `a.png` its name: `a.jpg` becomes `a_jpg`.
    Before, names were handed out in sorted order on every run, so `a.png` became a new, paid item `a_png`."""
    photos = tmp_path / "photos"
    write(photos / "a.png", "png")
    first = plan(tmp_path, "  images: photos")
    assert [s.output_name for s in specs(first)] == ["a"]
    write(photos / "a.jpg", "jpg")
    second = plan(tmp_path, "  images: photos", records(first))
    assert {Path(s.image).name: s.output_name for s in specs(second)} == {"a.jpg": "a_jpg", "a.png": "a"}


def test_an_items_output_name_never_changes_when_other_files_disappear(tmp_path: Path) -> None:
    """`a.jpg` → `a`, `a.png` → `a_png`; deleting `a.jpg` leaves `a.png` as `a_png` (it was not re-paid as `a`)."""
    photos = tmp_path / "photos"
    write(photos / "a.png", "png")
    write(photos / "a.jpg", "jpg")
    first = plan(tmp_path, "  images: photos")
    (photos / "a.jpg").unlink()
    second = plan(tmp_path, "  images: photos", records(first))
    assert [s.output_name for s in specs(second)] == ["a_png"]


def test_names_recorded_before_keys_existed_stay_on_upgrade(tmp_path: Path) -> None:
    """A batch run by an older version recorded only each item's input and name: those names hold."""
    photos = tmp_path / "photos"
    write(photos / "a.png", "png")
    write(photos / "a.jpg", "jpg")
    legacy = [(str(photos / "a.png"), None, "a")]  # the old version saw a.png alone
    entries = plan(tmp_path, "  images: photos", legacy)
    assert {Path(s.image).name: s.output_name for s in specs(entries)} == {"a.jpg": "a_jpg", "a.png": "a"}
    manifest_legacy = [(str(photos / "a.png"), None, "first"), (str(photos / "a.png"), None, "second")]
    write(tmp_path / "m.csv", "image,template_id\nphotos/a.png,normal\nphotos/a.png,calm\n")
    rows = plan(tmp_path, "  manifest: m.csv", manifest_legacy)
    assert [s.output_name for s in specs(rows)] == ["first", "second"]


def test_a_manifest_rows_name_stays_when_rows_are_added_before_it(tmp_path: Path) -> None:
    """Rows are named by what they ask for, not by their place: a row inserted above keeps off the names recorded."""
    write(tmp_path / "m.csv", "image,template_id\nx/a.jpg,normal\n")
    first = plan(tmp_path, "  manifest: m.csv")
    write(tmp_path / "m.csv", "image,template_id\ny/a.jpg,calm\nx/a.jpg,normal\n")
    second = plan(tmp_path, "  manifest: m.csv", records(first))
    assert [s.output_name for s in specs(second)] == ["a_jpg", "a"]


def test_a_moved_folder_keeps_its_names_by_order(tmp_path: Path) -> None:
    """Recorded inputs that are not in the plan hold no name: the same files elsewhere are named as the first run
    named them (and so are not paid again under new names)."""
    write(tmp_path / "old" / "a.jpg", "jpg")
    write(tmp_path / "old" / "a.png", "png")
    first = plan(tmp_path, "  images: old")
    shutil.move(tmp_path / "old", tmp_path / "new")
    second = plan(tmp_path, "  images: new", records(first))
    assert [s.output_name for s in specs(second)] == [s.output_name for s in specs(first)] == ["a", "a_png"]


# -- properties --------------------------------------------------------------------------------------------------

NAMES = ["a", "b", "A", "c d"]
SUFFIXES = [".jpg", ".png", ".JPG"]
FOLDERS = ["", "s", "s/t", "u"]
file_st = st.tuples(st.sampled_from(FOLDERS), st.sampled_from(NAMES), st.sampled_from(SUFFIXES))
# a link: where it sits, its name, and where it points (a folder up or down the tree, a file, itself, outside)
link_st = st.tuples(
    st.sampled_from(FOLDERS), st.sampled_from(["l", "m.jpg"]), st.sampled_from([".", "..", "../..", "s", "a.jpg", "l"])
)


def build(root: Path, files: Iterable[tuple[str, str, str]], links: Iterable[tuple[str, str, str]]) -> None:
    photos = root / "photos"
    photos.mkdir()
    write(root / "outside" / "o.jpg", "outside")
    for folder, name, suffix in files:
        path = photos / folder / f"{name}{suffix}"
        if not path.exists():
            write(path, f"{folder}/{name}{suffix}")
    for folder, name, target in links:
        (photos / folder).mkdir(parents=True, exist_ok=True)
        link = photos / folder / name
        if not os.path.lexists(link) and not (link.exists()):
            link.symlink_to(target)


def matched_regular_files(photos: Path, pattern: str) -> set[tuple[int, int]]:
    """The files (not links) a pattern matches on their real path, found by a walk that never follows a link."""
    found = set()
    for folder, _, names in os.walk(photos):
        for name in names:
            path = Path(folder, name)
            depth = len(path.relative_to(photos).parts)
            if path.is_symlink():
                continue
            if (
                (pattern.endswith("photos") and depth == 1 and path.suffix.lower() in {".jpg", ".png"})
                or (pattern.endswith("**/*.jpg'") and name.endswith(".jpg"))
                or pattern.endswith("**/*'")
                or (pattern.endswith("*/*'") and depth == 2)
            ):
                found.add(file_id(str(path)))
    return found


PATTERNS = ["  images: photos", "  images: 'photos/**/*.jpg'", "  images: 'photos/**/*'", "  images: 'photos/*/*'"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(file_st, min_size=1, max_size=8),
    st.lists(link_st, max_size=5),
    st.sampled_from(PATTERNS),
)
def test_property_every_distinct_file_is_planned_at_most_once(
    files: list[tuple[str, str, str]], links: list[tuple[str, str, str]], pattern: str
) -> None:
    """Property: whatever links a tree holds (loops, links out, links between its folders, links to links), the
    plan ends, names each distinct file at most once, never one outside the input folder, and every regular file the
    pattern matches on its real path is planned."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, files, links)
        entries = plan(root, pattern)
        planned = specs(entries)
        ids = [file_id(s.image) for s in planned if os.path.exists(s.image)]  # a dangling link is refused unpaid
        assert len(set(ids)) == len(ids)
        real_root = os.path.realpath(root / "photos")
        assert all(os.path.realpath(s.image).startswith(real_root + os.sep) for s in planned)
        assert matched_regular_files(root / "photos", pattern) <= set(ids)
        assert len({n.output_name.casefold() for n in planned}) == len(planned)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(file_st, min_size=1, max_size=8, unique=True),
    st.lists(file_st, max_size=4, unique=True),
    st.lists(st.integers(min_value=0, max_value=7), max_size=3),
    st.sampled_from(PATTERNS[:3]),
)
def test_property_names_are_stable_across_added_and_removed_files(
    files: list[tuple[str, str, str]], added: list[tuple[str, str, str]], removed: list[int], pattern: str
) -> None:
    """Property: after a run, adding and removing files never changes the name of a file that stayed, and names
    stay unique."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, files, [])
        first = plan(root, pattern)
        before = {s.key: s.output_name for s in specs(first)}
        for index in removed:
            folder, name, suffix = files[index % len(files)]
            (root / "photos" / folder / f"{name}{suffix}").unlink(missing_ok=True)
        for folder, name, suffix in added:
            write(root / "photos" / folder / f"{name}{suffix}", "new")
        second = specs(plan(root, pattern, records(first)))
        for spec in second:
            if spec.key in before:
                assert spec.output_name == before[spec.key], spec
        assert len({s.output_name.casefold() for s in second}) == len(second)


row_st = st.tuples(
    st.sampled_from(["x.jpg", "d/x.jpg", "d/../d/x.jpg", "./d/x.jpg", "d/y.png", "l.jpg", "e/x.jpg"]),
    st.sampled_from(["", "normal", "calm"]),
    st.sampled_from(["", "alice"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(row_st, min_size=1, max_size=8), st.lists(row_st, max_size=4))
def test_property_manifest_rows_of_one_file_plan_once_and_keep_their_names(
    rows: list[tuple[str, str, str]], inserted: list[tuple[str, str, str]]
) -> None:
    """Property: rows that reach one file with the same settings are one item however the path is written, and rows
    inserted at the top of the manifest later change no other row's name."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("x.jpg", "d/x.jpg", "d/y.png", "e/x.jpg"):
            write(root / name, name)
        (root / "l.jpg").symlink_to("d/x.jpg")

        def manifest(lines: list[tuple[str, str, str]]) -> list[object]:
            body = "".join(f"{image},{template},{output}\n" for image, template, output in lines)
            write(root / "m.csv", "image,template_id,output\n" + body)
            return plan(root, "  manifest: m.csv")

        first = manifest(rows)
        planned = specs(first)
        same = [(os.path.realpath(s.image), tuple(sorted((s.overrides or {}).items())), s.preset) for s in planned]
        assert len(set(same)) == len(same)
        before = {s.key: s.output_name for s in planned}
        cfg_records = records(first)
        body = "".join(f"{i},{t},{o}\n" for i, t, o in [*inserted, *rows])
        write(root / "m.csv", "image,template_id,output\n" + body)
        second = specs(plan(root, "  manifest: m.csv", cfg_records))
        for spec in second:
            if spec.key in before:
                assert spec.output_name == before[spec.key]
