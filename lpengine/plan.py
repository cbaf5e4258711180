"""Enumerate a batch's inputs into item specs, streaming, with safe and stable output names.

Manifests are read line by line so a 100k-row batch never sits in memory. A broken row becomes a `PlanProblem`
(one message naming the file, line and field) and the others go on.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import sqlite3
import unicodedata
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lpengine.config import BatchConfig, VideoOverrides
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


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://", "oss://"))


class KeySet:
    """The keys a plan has seen, in a private temporary SQLite file rather than in memory.

    A plan must remember every output name (and every manifest row, to refuse duplicates) until the batch's last
    item: in Python sets that is ~0.35 KB per row, held for the whole run, so a manifest of a million rows would
    grow the process by ~350 MB as it streams. SQLite keeps ~2 MB of pages cached and the rest in a file it deletes
    on close (`sqlite3.connect("")`). One transaction is left open on purpose: nothing here needs to survive, and
    a commit per key would write pages out every time. `check_same_thread=False`: the engine plans in chunks on
    worker threads, one chunk at a time.
    """

    def __init__(self) -> None:
        self._db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("CREATE TABLE seen (key BLOB PRIMARY KEY, first INTEGER NOT NULL) WITHOUT ROWID")
        self._db.execute("BEGIN")
        # closed when dropped too (the engine's namer lives as long as the engine object), without a ResourceWarning
        self._close = weakref.finalize(self, self._db.close)

    def add(self, key: str | bytes, first: int = 0) -> bool:
        """True if `key` is new (and is now taken, with `first`); False if it was seen before."""
        return self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (key, first)).rowcount == 1

    def first(self, key: str | bytes) -> int:
        """The `first` value stored when `key` was added."""
        return int(self._db.execute("SELECT first FROM seen WHERE key = ?", (key,)).fetchone()[0])

    def close(self) -> None:
        self._close()


class Namer:
    """Assigns unique output names in enumeration order: `a.jpg` → `a`, then `a.png` → `a_png`, then `a_png_2`."""

    def __init__(self) -> None:
        self._taken = KeySet()

    def assign(self, wanted: str, suffix: str = "") -> str:
        base = safe_stem(wanted)
        candidates = [base]
        if suffix:
            candidates.append(safe_stem(f"{base}_{suffix.lstrip('.')}"))
        for name in candidates:
            if self._taken.add(name.casefold()):
                return name
        n = 2
        while not self._taken.add(f"{candidates[-1]}_{n}".casefold()):
            n += 1
        return f"{candidates[-1]}_{n}"

    def close(self) -> None:
        self._taken.close()


def input_problems(config: BatchConfig) -> list[str]:
    """Inputs that cannot exist at all: a cron run must not "succeed" with zero items because of a typo."""
    if config.inputs.images is not None:
        pattern = config.inputs.images
        root = config.resolve(pattern)
        if not glob.has_magic(pattern) and not root.exists():
            return [f"inputs.images: {root} does not exist; check the path (a folder or a glob like photos/*.jpg)"]
    elif config.inputs.manifest is not None and not config.resolve(config.inputs.manifest).is_file():
        return [f"inputs.manifest: {config.resolve(config.inputs.manifest)} not found; check the path"]
    return []


def _scan(config: BatchConfig, pattern: str) -> Iterator[Path]:
    """The matching files, sorted by path.

    The whole listing must be read before the first item (to sort it), and the plan's generator holds it until the
    last item: it is kept as strings, one `Path` made per item as it is planned. A folder keeps only the names (its
    paths share one prefix, so they sort as the names do): at 100k files, a few MB instead of ~40 MB of `Path`s.
    """
    root = config.resolve(pattern)
    if root.is_dir():
        with os.scandir(root) as entries:
            names = sorted(e.name for e in entries if Path(e.name).suffix.lower() in IMAGE_SUFFIXES or e.is_symlink())
        return (root / name for name in names)
    paths = sorted(str(Path(p)) for p in glob.glob(str(root), recursive=True) if not os.path.isdir(p))
    return (Path(p) for p in paths)


def iter_plan(config: BatchConfig) -> Iterator[ItemSpec | PlanProblem]:
    """Every input of the batch, in a stable order, as a spec or a problem."""
    namer = Namer()
    try:
        yield from _iter_inputs(config, namer)
    finally:  # exhausted, or closed early (a stopped run)
        namer.close()


def _iter_inputs(config: BatchConfig, namer: Namer) -> Iterator[ItemSpec | PlanProblem]:
    if config.inputs.images is not None:
        root = config.resolve(config.inputs.images)
        folder = root if root.is_dir() else None
        for path in _scan(config, config.inputs.images):
            if _undecodable(str(path)):
                shown = _printable(path)
                yield PlanProblem(shown, shown, "file name is not valid UTF-8 (an old or foreign encoding); rename it")
                continue
            if folder is not None and path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(folder.resolve()):
                    yield PlanProblem(
                        str(path),
                        str(path),
                        "is a symlink pointing outside the input folder; copy the file in",
                    )
                    continue
            yield ItemSpec(
                image=str(path.absolute()),
                output_name=namer.assign(path.stem, path.suffix),
                params=config.video,
                source=str(path),
                preset=config.preset_context.batch_preset,
                overrides=config.preset_context.batch_overrides,
            )
        return
    assert config.inputs.manifest is not None
    yield from _iter_manifest(config, config.resolve(config.inputs.manifest), namer)


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


def _iter_manifest(config: BatchConfig, path: Path, namer: Namer) -> Iterator[ItemSpec | PlanProblem]:
    if not path.is_file():
        yield PlanProblem(str(path), str(path), "manifest file not found; check inputs.manifest")
        return
    seen = KeySet()
    try:
        yield from _manifest_specs(config, path, namer, seen)
    finally:
        seen.close()


def _manifest_specs(config: BatchConfig, path: Path, namer: Namer, seen: KeySet) -> Iterator[ItemSpec | PlanProblem]:
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
        image_ref = image if _is_url(image) else str(config.resolve(Path(path.parent, image)))
        audio = row.get("audio")
        audio_ref = None
        if audio:
            audio_ref = str(audio) if _is_url(str(audio)) else str(config.resolve(Path(path.parent, str(audio))))
        row_key = json.dumps([image_ref, audio_ref or "", written, preset], sort_keys=True)
        # 16 bytes however long the URLs are (signed OSS URLs run to a kilobyte); a collision needs ~2^64 rows
        key = hashlib.blake2b(row_key.encode(), digest_size=16).digest()  # json.dumps gives ASCII
        if not seen.add(key, lineno):
            yield PlanProblem(source, image, f"duplicate of line {seen.first(key)}; remove one of them")
            continue
        wanted = _output_stem(str(row["output"])) if row.get("output") else Path(image.split("?")[0]).stem
        yield ItemSpec(
            image=image_ref,
            output_name=namer.assign(wanted, Path(image).suffix),
            params=params,
            audio=audio_ref,
            source=source,
            preset=preset,
            overrides=written,
        )
