"""A run's results on disk: one JSON line per finished item, so a 100k-item run holds none of them in memory.

`ResultSpool` appends each `ItemResult` as it finishes and adds it to the run's `ResultTotals`; `SpooledResults` is
the read-only sequence that `RunReport.items` then reads back, from the file, every time it is iterated.

The files live beside the state store, in `<state file>.runs/` (by default `<output>/.lpengine/state.runs/`), named
by the time the run started. A new spool first deletes all but the newest `KEEP_RUNS - 1` there: the folder stays
small under cron, and the `RunReport.items` of the last `KEEP_RUNS` runs stay readable.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, overload

import orjson

from lpengine.models import ItemResult, ResultTotals

__all__ = ["KEEP_RUNS", "ResultSpool", "SpooledResults", "spool_dir"]

KEEP_RUNS = 10


def spool_dir(state_path: Path) -> Path:
    """Named after the state file, so two batches sharing a folder for their state files never prune each other."""
    return state_path.with_suffix(".runs")


class SpooledResults(Sequence[ItemResult]):
    """The rows of a spool file as a read-only sequence, read from disk on each pass (nothing is cached).

    `len()` is free; iterating reads the file once; slicing reads only up to the slice's end (report.html's
    thumbnails take the first rows); an integer index reads up to that row, so `items[i]` in a loop is quadratic:
    iterate instead.
    """

    __slots__ = ("_length", "path")

    def __init__(self, path: Path, length: int) -> None:
        self.path = path
        self._length = length

    def __repr__(self) -> str:
        return f"SpooledResults({str(self.path)!r}, {self._length} items)"

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[ItemResult]:
        with self.path.open(encoding="utf-8") as fh:
            for line in islice(fh, self._length):
                yield ItemResult.from_dict(_loads(line))

    @overload
    def __getitem__(self, index: int) -> ItemResult: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[ItemResult, ...]: ...

    def __getitem__(self, index: int | slice) -> ItemResult | tuple[ItemResult, ...]:
        if isinstance(index, slice):
            wanted = range(self._length)[index]
            if not wanted:
                return ()
            first, last = min(wanted), max(wanted)
            window = tuple(islice(self, first, last + 1))
            return tuple(window[i - first] for i in wanted)
        position = range(self._length)[index]  # negative indices and IndexError, as for a tuple
        return next(islice(self, position, None))


class ResultSpool:
    """Appends a run's results to its spool file and keeps their totals. Used from the event loop: `append` only
    fills the file's buffer (the operating system gets one write per 64 KiB), so no thread hop per item."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.totals = ResultTotals()
        self._fh = path.open("x", encoding="utf-8", buffering=1 << 16)

    @classmethod
    def create(cls, folder: Path) -> ResultSpool:
        """A new spool in `folder`, after deleting all but the newest `KEEP_RUNS - 1` there (blocking I/O)."""
        folder.mkdir(parents=True, exist_ok=True)
        spools = sorted(folder.glob("*.jsonl"))  # names start with the time: oldest first
        for old in spools[: max(0, len(spools) - (KEEP_RUNS - 1))]:
            with contextlib.suppress(OSError):  # e.g. still open in another process on Windows: tried next run
                old.unlink(missing_ok=True)
        return cls(folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}.jsonl")

    def append(self, result: ItemResult) -> None:
        """Write one row. After `close()` rows are dropped: they are items that a cancelled `run()` left in flight,
        finishing after its caller stopped waiting, and no report will read them."""
        if self._fh.closed:
            return
        self._fh.write(_dumps(result.to_dict()))
        self.totals.add(result)

    def close(self) -> None:
        self._fh.close()

    def results(self) -> SpooledResults:
        """The rows written so far, read back from the file (call after `close()`, which flushes them)."""
        return SpooledResults(self.path, self.totals.items)


def _dumps(row: dict[str, Any]) -> str:
    try:
        return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE).decode()
    except orjson.JSONEncodeError:
        # A file name that is not valid UTF-8 (kept as lone surrogates): ASCII JSON escapes them and round-trips.
        return json.dumps(row) + "\n"


def _loads(line: str) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:  # the ASCII rows above
        return json.loads(line)
