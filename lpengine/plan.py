"""Enumerate a batch's inputs into item specs, streaming, with safe and stable output names.

Manifests are read line by line so a 100k-row batch never sits in memory. A broken row becomes a `PlanProblem`
(one message naming the file, line and field) and the others go on.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fnmatch
import glob
import hashlib
import json
import os
import re
import sqlite3
import unicodedata
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lpengine.config import BatchConfig, VideoOverrides, VideoParams, is_url
from lpengine.models import ItemSpec
from lpengine.presets import item_recipe

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".heic", ".heif", ".tif", ".tiff"}
"""Files a folder scan picks up. Unsupported formats among them are listed (and rejected) rather than ignored,
so a user sees why their GIF made no video."""

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|\ud800-\udfff]+")  # surrogates: undecodable bytes of a file name
_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}
_MAX_NAME = 120
_MAX_NAME_BYTES = 180
"""File names are limited in bytes (255 on ext4, APFS, NTFS), and the name also carries `_png_2`-style suffixes,
`.mp4`, and the download's hidden `.<name>.mp4.<hex>.part` form: 180 bytes of UTF-8 leave room for all of them."""


@dataclass(frozen=True, slots=True)
class PlanProblem:
    """An input row that cannot become an item; reported as `rejected_locally`."""

    source: str
    image: str
    message: str


def safe_stem(name: str) -> str:
    """A file stem that cannot escape the output folder or collide with special names.

    Keeps letters of any script (Chinese names stay readable); replaces separators and control characters; strips
    leading dots (no hidden files, no `..`); caps the length.
    """
    stem = unicodedata.normalize("NFC", name)
    stem = _UNSAFE.sub("_", stem).strip().strip(".").strip()
    stem = re.sub(r"\s+", " ", stem)
    if not stem or set(stem) <= {"_", " ", "."}:
        stem = "item"
    if stem.lower() in _RESERVED:
        stem = f"{stem}_"
    stem = stem[:_MAX_NAME]
    while len(stem.encode()) > _MAX_NAME_BYTES:  # 60 Chinese characters, not 120 (3 bytes each)
        stem = stem[:-1]
    return stem.rstrip(" .")  # a cut can end on a space or a dot; the first character is neither


def _undecodable(text: str) -> bool:
    """True for text holding bytes that were not UTF-8 (Python keeps them as lone surrogates, which no log, report or
    database can store)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _printable(path: Path | str) -> str:
    """A path that can be shown and stored anywhere: bytes that are not UTF-8 are written as `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _output_stem(value: str) -> str:
    """A manifest's `output`: its last path component (never a folder), without a `.mp4` the user may have added.
    Other dots are part of the name ("Dr. Who" stays "Dr. Who")."""
    name = Path(value).name
    return name[:-4] if name.lower().endswith(".mp4") else name


def _temp_db(owner: object) -> tuple[sqlite3.Connection, weakref.finalize[Any, Any]]:
    """A private temporary SQLite file, deleted on close (`sqlite3.connect("")`).

    One transaction is left open on purpose: nothing here needs to survive, and a commit per key would write pages
    out every time. `check_same_thread=False`: the engine plans in chunks on worker threads, one chunk at a time.
    """
    db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=OFF")
    return db, weakref.finalize(owner, db.close)  # closed when the owner is dropped, without a ResourceWarning


class KeySet:
    """The keys a plan has seen, in a private temporary SQLite file rather than in memory.

    A plan must remember every output name (and every manifest row, to refuse duplicates) until the batch's last
    item: in Python sets that is ~0.35 KB per row, held for the whole run, so a manifest of a million rows would
    grow the process by ~350 MB as it streams. SQLite keeps ~2 MB of pages cached and the rest on disk.
    """

    def __init__(self) -> None:
        self._db, self._close = _temp_db(self)
        self._db.execute("CREATE TABLE seen (key BLOB PRIMARY KEY, first NOT NULL) WITHOUT ROWID")
        self._db.execute("BEGIN")

    def add(self, key: str | bytes, first: int | str = 0) -> bool:
        """True if `key` is new (and is now taken, with `first`); False if it was seen before."""
        return self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (key, first)).rowcount == 1

    def first(self, key: str | bytes) -> int | str | None:
        """The `first` value stored when `key` was added; None if it never was."""
        row = self._db.execute("SELECT first FROM seen WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        self._close()


class RealPaths:
    """Where a local path really leads (symlinks and `..` resolved), the key that makes one file one item however
    many paths reach it. Folders are resolved once each, so a 100k-row manifest costs one `lstat` per row."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def __call__(self, ref: str) -> str:
        if is_url(ref):
            return ref
        folder, name = os.path.split(os.path.abspath(ref))
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = self._folders[folder] = os.path.realpath(folder)
        path = os.path.join(real_folder, name)
        return os.path.realpath(path) if os.path.islink(path) else path


class Namer:
    """Assigns unique output names that never change because other inputs appear or disappear.

    Fresh inputs get the first free name in enumeration order: `a.jpg` → `a`, then `a.png` → `a_png`, then
    `a_png_2`. But an input an earlier run recorded (the state store keeps each item's input and name) keeps the
    name it was given, and the names of recorded inputs present in this plan are reserved before any name is handed
    out: a new `a.jpg` cannot take `a` from the `a.png` finished last week (which would re-pay `a.png` as a new item
    `a_png`). Recorded inputs absent from the plan hold no name, so a moved folder is named by order, as it was.

    Inputs are known by `key` (what the plan makes of a row: a file's real path, a manifest row's hash) and by
    `image` (its image's real path or URL). Records older than keys have only an image, which then stands for it.
    """

    def __init__(self) -> None:
        self._db, self._close = _temp_db(self)
        self._db.executescript(
            """
            CREATE TABLE taken (name TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE used (name TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE recorded (image TEXT NOT NULL, key TEXT, name TEXT NOT NULL);
            CREATE INDEX recorded_key ON recorded(key);
            CREATE INDEX recorded_image ON recorded(image);
            BEGIN;
            """
        )
        self.real = RealPaths()
        self.has_records = False

    def record(self, rows: Iterable[tuple[str, str | None, str]]) -> None:
        """Names earlier runs gave: (input as stored, key or None, output name) rows from the state store."""
        records = [(self.real(image), key, name) for image, key, name in rows if image and name]
        self._db.executemany("INSERT INTO recorded VALUES (?, ?, ?)", records)
        self.has_records = self.has_records or bool(records)

    def reserve(self, key: str, image: str) -> bool:
        """Hold the names recorded for an input of this plan (before any name is handed out); True if any."""
        rows = self._db.execute(
            "SELECT name FROM recorded WHERE key = ? OR (key IS NULL AND image = ?)", (key, image)
        ).fetchall()
        for (name,) in rows:
            self._db.execute("INSERT OR IGNORE INTO taken VALUES (?)", (name.casefold(),))
        return bool(rows)

    def _recorded(self, key: str | None, image: str | None) -> str | None:
        rows: list[tuple[str]] = []
        if key is not None:
            rows = self._db.execute("SELECT name FROM recorded WHERE key = ? ORDER BY name", (key,)).fetchall()
        if not rows and image is not None:
            rows = self._db.execute(
                "SELECT name FROM recorded WHERE key IS NULL AND image = ? ORDER BY name", (image,)
            ).fetchall()
        for (name,) in rows:
            if self._db.execute("INSERT OR IGNORE INTO used VALUES (?)", (name.casefold(),)).rowcount == 1:
                return name
        return None

    def assign(self, wanted: str, suffix: str = "", *, key: str | None = None, image: str | None = None) -> str:
        if self.has_records and (name := self._recorded(key, image)) is not None:
            return name
        base = safe_stem(wanted)
        candidates = [base]
        if suffix:
            candidates.append(safe_stem(f"{base}_{suffix.lstrip('.')}"))
        for name in candidates:
            if self._take(name):
                return name
        n = 2
        while not self._take(f"{candidates[-1]}_{n}"):
            n += 1
        return f"{candidates[-1]}_{n}"

    def _take(self, name: str) -> bool:
        folded = name.casefold()
        if self._db.execute("INSERT OR IGNORE INTO taken VALUES (?)", (folded,)).rowcount != 1:
            return False
        self._db.execute("INSERT OR IGNORE INTO used VALUES (?)", (folded,))
        return True

    def close(self) -> None:
        self._close()


def input_problems(config: BatchConfig) -> list[str]:
    """Inputs that cannot work at all, said once for the batch rather than once per item: a cron run must not
    "succeed" with zero items because of a typo, nor fail every item for want of one line in the config."""
    columns: list[str] | None = None  # a CSV manifest's header (JSONL rows name their own fields)
    if config.inputs.images is not None:
        pattern = config.inputs.images
        root = config.resolve(pattern)
        if not glob.has_magic(pattern) and not root.exists():
            return [f"inputs.images: {root} does not exist; check the path (a folder or a glob like photos/*.jpg)"]
    elif config.inputs.manifest is not None:
        manifest = config.resolve(config.inputs.manifest)
        if not manifest.is_file():
            return [f"inputs.manifest: {manifest} not found; check the path"]
        columns = _csv_header(manifest)
        if columns is not None and "image" not in columns:
            shown = ", ".join(columns) or "none"
            return [
                f"inputs.manifest: {manifest} has no `image` column (its first line names: {shown}); the first line "
                "must name the columns, e.g. image,audio,output"
            ]
    if config.audio is None and (config.inputs.images is not None or (columns is not None and "audio" not in columns)):
        return ["audio: not set; set `audio:` to a wav or mp3 for every item (or give the manifest an `audio` column)"]
    return []


def _csv_header(path: Path) -> list[str] | None:
    """The column names on a CSV manifest's first line; None for JSONL or an unreadable file (rows report those)."""
    if path.suffix.lower() in {".jsonl", ".ndjson", ".json"}:
        return None
    try:
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, csv.Error):
        return None
    return None if header is None else [name.strip() for name in header if name.strip()]


def empty_hint(config: BatchConfig) -> str | None:
    """Why a folder batch planned nothing, when the answer is near: its images sit in subfolders, which a folder
    input does not enter (a glob with `**` does)."""
    if config.inputs.images is None or glob.has_magic(config.inputs.images):
        return None
    root = config.resolve(config.inputs.images)
    for folder, _, names in os.walk(root):
        if folder != str(root) and any(Path(n).suffix.lower() in IMAGE_SUFFIXES for n in names):
            pattern = Path(config.inputs.images, "**", "*").as_posix()
            return f"no images directly in {root}, but its subfolders hold some: use `images: '{pattern}'` to take them"
    return f"no images in {root}: put .jpg, .png, .bmp or .webp files there"


@dataclass(slots=True)
class _Scan:
    """A folder or glob's listing, sorted by path, kept as strings until each item is planned.

    Folders reached through a symlink are never entered: a link back up the tree (`photos/x → .`) would make every
    photo reachable by endless paths, and one leaving the input folder would publish files nobody chose. Each such
    link is one problem line (`folder_links`), and a file reached through a link is planned by its real path.
    """

    base: str
    """The input folder, or the part of a glob before its first wildcard: links may not lead out of it."""
    real_base: str
    paths: list[str]
    links: set[str]
    """Listed paths that are symlinks (few): only these need resolving."""
    folder_links: dict[str, str]
    """Symlinked folders not entered, with the line that says why."""

    def real(self, path: str) -> str:
        if path in self.links:
            return os.path.realpath(path)
        return self.real_base + path[len(self.base) :]

    def inside(self, real: str) -> bool:
        return real == self.real_base or real.startswith(self.real_base.rstrip(os.sep) + os.sep)

    def shown(self, real: str) -> str:
        """The path as the user names it (under the input folder as written), for a file reached by a link."""
        return os.path.join(self.base, os.path.relpath(real, self.real_base))

    def folder_link(self, path: str) -> str:
        real = os.path.realpath(path)
        parent = os.path.realpath(os.path.dirname(path))
        if parent == real or parent.startswith(real.rstrip(os.sep) + os.sep):
            return f"is a symlink loop (it leads back to {_printable(real)}); not followed"
        if not self.inside(real):
            outside = f"is a symlink to a folder outside the input folder ({_printable(real)})"
            return f"{outside}; not followed: copy the files in"
        return f"is a symlink to a folder ({_printable(real)}); not followed, its images are planned by their own path"


def _entries(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:  # unreadable or vanished: as glob does, it matches nothing
        return []


def _leads_to_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop: ELOOP, which `is_dir` does not swallow (it does a missing target)
        return False


def _scan(config: BatchConfig, pattern: str) -> _Scan:
    """The matching files, sorted by path. A folder takes its image files (symlinks too, to say where they lead); a
    glob takes what it matches except folders, with `**` as in `glob.glob(recursive=True)`."""
    root = config.resolve(pattern)
    found: list[str] = []
    links: set[str] = set()
    folder_links: dict[str, str] = {}

    def visit(entry: os.DirEntry[str]) -> None:
        if entry.is_symlink():
            if _leads_to_folder(entry):
                folder_links[entry.path] = ""
            else:
                links.add(entry.path)
                found.append(entry.path)
        elif not entry.is_dir(follow_symlinks=False):
            found.append(entry.path)

    if root.is_dir():
        base = str(root)
        for entry in _entries(base):
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and not entry.is_symlink():
                found.append(entry.path)  # a folder named `x.jpg` too: it is reported, not silently skipped
            elif entry.is_symlink():
                visit(entry)
    else:
        parts = root.parts
        magic = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
        base = str(Path(*parts[:magic]))
        _walk(base, _collapse(parts[magic:]), visit, folder_links)
    scan = _Scan(base, os.path.realpath(base), sorted([*found, *folder_links]), links, folder_links)
    for path in folder_links:
        folder_links[path] = scan.folder_link(path)
    return scan


def _collapse(parts: tuple[str, ...]) -> list[str]:
    """`a/**/**/b` is `a/**/b`: consecutive `**` would list the same paths twice."""
    out: list[str] = []
    for part in parts:
        if not (part == "**" and out and out[-1] == "**"):
            out.append(part)
    return out


def _walk(
    folder: str,
    parts: list[str],
    visit: Callable[[os.DirEntry[str]], None],
    folder_links: dict[str, str],
) -> None:
    """Match `parts` below `folder` without ever entering a symlinked folder (those are noted in `folder_links`)."""
    part, rest = parts[0], parts[1:]
    recursive = part == "**"
    if recursive and rest:
        _walk(folder, rest, visit, folder_links)  # `**` matching no folder at all
    for entry in _entries(folder):
        if entry.name.startswith(".") and not part.startswith("."):
            continue  # as glob: hidden names only for a part that asks for them (`**` never does)
        if not recursive and not fnmatch.fnmatchcase(entry.name, part):
            continue
        if not rest:
            visit(entry)
        if not (recursive or rest):
            continue
        if entry.is_dir(follow_symlinks=False):
            _walk(entry.path, parts if recursive else rest, visit, folder_links)
        elif entry.is_symlink() and _leads_to_folder(entry):
            folder_links[entry.path] = ""


def iter_plan(config: BatchConfig, namer: Namer | None = None) -> Iterator[ItemSpec | PlanProblem]:
    """Every input of the batch, in a stable order, as a spec or a problem. `namer` carries the names earlier runs
    recorded (`Namer.record`); the plan closes it."""
    namer = namer or Namer()
    try:
        yield from _iter_inputs(config, namer)
    finally:  # exhausted, or closed early (a stopped run)
        namer.close()


def _iter_inputs(config: BatchConfig, namer: Namer) -> Iterator[ItemSpec | PlanProblem]:
    if config.inputs.images is None:
        assert config.inputs.manifest is not None
        yield from _iter_manifest(config, config.resolve(config.inputs.manifest), namer)
        return
    scan = _scan(config, config.inputs.images)
    owners, seen = KeySet(), KeySet()
    try:
        if namer.has_records:  # the names of recorded files present are reserved before any is handed out
            for path in scan.paths:
                real = scan.real(path)
                if path not in scan.folder_links and namer.reserve(real, real):
                    with contextlib.suppress(OSError):
                        if file := _file_id(real):
                            owners.add(file, real)  # a file with several paths stays with the recorded one
        for path in scan.paths:
            entry = _folder_entry(scan, path, config, namer, owners, seen)
            if entry is not None:
                yield entry
    finally:
        owners.close()
        seen.close()


def _file_id(path: str) -> str | None:
    """Device and inode: what makes hard links (and any other paths to one file) one file. None for a path that
    leads nowhere (its item says so when checked); raises OSError for a symlink loop."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise
        return None
    except ValueError:  # a NUL in the name
        return None
    return f"{st.st_dev}:{st.st_ino}"


def _folder_entry(
    scan: _Scan, path: str, config: BatchConfig, namer: Namer, owners: KeySet, seen: KeySet
) -> ItemSpec | PlanProblem | None:
    """One listed path as an item, a problem, or None when its file is already planned through another path."""
    shown = _printable(path)
    if _undecodable(path):
        return PlanProblem(shown, shown, "file name is not valid UTF-8 (an old or foreign encoding); rename it")
    if path in scan.folder_links:
        return PlanProblem(shown, shown, scan.folder_links[path])
    real = scan.real(path)
    if not scan.inside(real):
        return PlanProblem(shown, shown, "is a symlink pointing outside the input folder; copy the file in")
    try:
        file = _file_id(real)
    except OSError:  # the only error `_file_id` lets through
        return PlanProblem(shown, shown, "is a symlink loop (it leads back to itself); remove or fix the link")
    if file is not None:
        owner = owners.first(file)
        if (owner is not None and owner != real) or not seen.add(file):
            return None  # one file is one item, however many paths reach it
    image = scan.shown(real) if path in scan.links and file is not None else path  # a dangling link names itself
    return ItemSpec(
        image=str(Path(image).absolute()),
        output_name=namer.assign(Path(image).stem, Path(image).suffix, key=real, image=real),
        params=config.video,
        source=path,
        preset=config.preset_context.batch_preset,
        overrides=config.preset_context.batch_overrides,
        key=real,
    )


_MANIFEST_KEYS = {"image", "audio", "output", "preset", *VideoOverrides.model_fields}


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row) pairs; a row that cannot be parsed is returned as an error string."""
    not_utf8 = "not valid UTF-8 text; save the manifest as UTF-8"
    # surrogateescape: one badly encoded row is reported as such, instead of ending the whole plan on a decode error
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        if path.suffix.lower() in {".jsonl", ".ndjson", ".json"}:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                if _undecodable(line):
                    yield lineno, not_utf8
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, f"invalid JSON ({exc.msg})"
                    continue
                yield lineno, row if isinstance(row, dict) else "each line must be a JSON object"
        else:
            reader = csv.DictReader(fh)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:  # e.g. a field over csv.field_size_limit(): that row only
                    yield reader.line_num, f"unreadable CSV ({exc})"
                    continue
                if None in row:
                    yield reader.line_num, "more values than header columns"
                    continue
                if any(_undecodable(str(v)) for v in (*row.keys(), *row.values())):
                    yield reader.line_num, not_utf8
                    continue
                yield reader.line_num, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}


@dataclass(frozen=True, slots=True)
class _Row:
    source: str
    lineno: int
    image: str
    """As written in the manifest (its stem and suffix name the output)."""
    image_ref: str
    audio_ref: str | None
    params: VideoParams
    preset: str | None
    written: dict[str, Any]
    """The values written over the preset (`ItemSpec.overrides`)."""
    output: str
    real_image: str
    """The real path (symlinks and `..` resolved) or the URL: `dir/../dir/x.jpg` is `dir/x.jpg`."""
    same: bytes
    """What makes two rows the same video (image, audio, parameters, all resolved): a second one is a duplicate."""

    @property
    def key(self) -> str:
        """What names this row across runs: the same video under the same asked-for name."""
        return "m:" + hashlib.blake2b(self.same + self.output.encode(), digest_size=16).hexdigest()


def _iter_manifest(config: BatchConfig, path: Path, namer: Namer) -> Iterator[ItemSpec | PlanProblem]:
    if not path.is_file():
        yield PlanProblem(str(path), str(path), "manifest file not found; check inputs.manifest")
        return
    if namer.has_records:  # a first pass reserves the names of recorded rows present, before any is handed out
        for row in _manifest_rows(config, path, namer.real):
            if isinstance(row, _Row):
                namer.reserve(row.key, row.real_image)
    seen = KeySet()
    try:
        for row in _manifest_rows(config, path, namer.real):
            if isinstance(row, PlanProblem):
                yield row
            elif not seen.add(row.same, row.lineno):
                yield PlanProblem(
                    row.source, row.image, f"duplicate of line {seen.first(row.same)}; remove one of them"
                )
            else:
                wanted = _output_stem(row.output) if row.output else Path(row.image.split("?")[0]).stem
                yield ItemSpec(
                    image=row.image_ref,
                    output_name=namer.assign(wanted, Path(row.image).suffix, key=row.key, image=row.real_image),
                    params=row.params,
                    audio=row.audio_ref,
                    source=row.source,
                    preset=row.preset,
                    overrides=row.written,
                    key=row.key,
                )
    finally:
        seen.close()


def _manifest_rows(config: BatchConfig, path: Path, real: RealPaths) -> Iterator[_Row | PlanProblem]:
    for lineno, row in _rows(path):
        source = f"{path.name}:{lineno}"
        if isinstance(row, str):
            yield PlanProblem(source, "", f"{row}; fix this line")
            continue
        unknown = sorted(set(row) - _MANIFEST_KEYS)
        if unknown:
            yield PlanProblem(
                source,
                str(row.get("image", "")),
                f"unknown column(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_MANIFEST_KEYS))}",
            )
            continue
        image = str(row.get("image") or "").strip()
        if not image:
            yield PlanProblem(source, "", "missing `image` column or value; every row needs an image path or URL")
            continue
        try:
            overrides = VideoOverrides.model_validate(
                {k: v for k, v in row.items() if k in VideoOverrides.model_fields}
            )
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            yield PlanProblem(source, image, f"{problems}; fix the value in the manifest")
            continue
        try:
            preset = str(row["preset"]).strip() if row.get("preset") else None
            params, preset, written = item_recipe(config, preset, overrides.model_dump(exclude_none=True))
        except KeyError as exc:
            yield PlanProblem(source, image, f"preset: {exc.args[0]}; fix the value in the manifest")
            continue
        image_ref = image if is_url(image) else str(config.resolve(Path(path.parent, image)))
        audio = row.get("audio")
        audio_ref = None
        if audio:
            audio_ref = str(audio) if is_url(str(audio)) else str(config.resolve(Path(path.parent, str(audio))))
        real_image = real(image_ref)
        same = json.dumps([real_image, real(audio_ref) if audio_ref else "", written, preset], sort_keys=True)
        output = str(row.get("output") or "")
        # 16 bytes however long the URLs are (signed OSS URLs run to a kilobyte); a collision needs ~2^64 rows
        digest = hashlib.blake2b(same.encode(), digest_size=16).digest()  # json.dumps gives ASCII
        yield _Row(source, lineno, image, image_ref, audio_ref, params, preset, written, output, real_image, digest)
