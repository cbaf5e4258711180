"""Results and reports in constant memory: rows round-trip through the spool file, `RunReport.items` reads them back
from disk, and the reports are written row by row with the same content as before."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from lpengine.errors import BatchFailedError
from lpengine.models import ItemResult, ItemState, RunReport
from lpengine.reports import write_reports
from lpengine.reports.spool import KEEP_RUNS, ResultSpool, SpooledResults


def row(i: int, state: ItemState = ItemState.SUCCEEDED, **changes: object) -> ItemResult:
    fields: dict[str, object] = {
        "input": f"/photos/人像-{i}.jpg",
        "output": f"/out/p{i}.mp4" if state is ItemState.SUCCEEDED else None,
        "state": state,
        "reason": "" if state is ItemState.SUCCEEDED else f'row {i}: "quoted"\nand a second line',
        "detect_message": None,
        "task_id": f"task-{i}",
        "task_code": None,
        "video_duration": 3.95 + i / 7,
        "submit_attempts": 1,
        "timings": {"upload": 0.1 + i / 3, "poll": 12.0},
        "cost_cny": round(0.004 + 0.079 * (i % 3) / 7, 6),
        "resumed": i % 2 == 1,
    }
    fields.update(changes)
    return ItemResult(**fields)  # type: ignore[arg-type]


STATES = list(ItemState)
ROWS = tuple(row(i, STATES[i % len(STATES)]) for i in range(40))


def spooled(folder: Path, rows: tuple[ItemResult, ...]) -> ResultSpool:
    spool = ResultSpool.create(folder)
    for r in rows:
        spool.append(r)
    spool.close()
    return spool


def test_item_result_round_trips_through_json() -> None:
    """Every field comes back equal and typed (the state as the enum), including None, unicode, lone surrogates."""
    odd = row(1, ItemState.TASK_FAILED, input="/photos/caf\udce9.jpg", detect_message="眼睛", task_code="X.Y")
    for original in (*ROWS, odd, row(2, timings={})):
        back = ItemResult.from_dict(json.loads(json.dumps(original.to_dict())))
        assert back == original
        assert type(back.state) is ItemState


def test_run_report_items_are_read_from_the_spool_file_on_every_pass(tmp_path: Path) -> None:
    """Nothing is cached: two passes read the same rows, and an edit of the file shows in the next pass."""
    spool = spooled(tmp_path / "runs", ROWS)
    report = RunReport(items=spool.results(), wall_time_s=1.0, totals=spool.totals)
    assert isinstance(report.items, SpooledResults)
    assert len(report.items) == len(ROWS)
    assert list(report.items) == list(report.items) == list(ROWS)
    lines = spool.path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    first["reason"] = "edited on disk"
    spool.path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n", encoding="utf-8")
    assert next(iter(report.items)).reason == "edited on disk"


def test_spooled_results_index_and_slice_like_a_tuple(tmp_path: Path) -> None:
    items = spooled(tmp_path / "runs", ROWS).results()
    for index in (0, 5, 39, -1, -40):
        assert items[index] == ROWS[index]
    for bad in (40, -41):
        with pytest.raises(IndexError):
            items[bad]
    for cut in (slice(None, 5), slice(3, 9), slice(None), slice(-4, None), slice(2, 30, 7), slice(None, None, -3)):
        assert items[cut] == ROWS[cut]
    assert items[10:3] == ()
    assert ROWS[7] in items and items.index(ROWS[7]) == 7


def test_totals_counted_while_writing_match_the_rows(tmp_path: Path) -> None:
    """The aggregates of an engine run (counted as rows were spooled) equal those of the same rows in memory."""
    spool = spooled(tmp_path / "runs", ROWS)
    from_spool = RunReport(items=spool.results(), wall_time_s=2.5, totals=spool.totals, retries=3)
    in_memory = RunReport(items=ROWS, wall_time_s=2.5, retries=3)
    assert from_spool.summary() == in_memory.summary()
    assert from_spool.counts == in_memory.counts and sum(from_spool.counts.values()) == len(ROWS)
    assert from_spool.cost_cny == in_memory.cost_cny == round(sum(r.cost_cny for r in ROWS), 6)
    assert not from_spool.ok
    with pytest.raises(BatchFailedError) as failed:
        from_spool.raise_for_failures()
    assert failed.value.failed == [r for r in ROWS if r.state is not ItemState.SUCCEEDED]
    clean = RunReport(items=(), wall_time_s=0.0)
    assert clean.ok and clean.summary()["items"] == 0 and clean.counts == {}
    clean.raise_for_failures()


def test_a_closed_spool_drops_late_rows(tmp_path: Path) -> None:
    """Items finishing after a cancelled `run()` stopped waiting are not added to its report."""
    spool = spooled(tmp_path / "runs", ROWS[:3])
    spool.append(ROWS[3])
    assert spool.totals.items == 3 and len(spool.results()) == 3
    assert len(spool.path.read_text(encoding="utf-8").splitlines()) == 3


def test_only_the_newest_spools_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    old = [folder / f"20240101-0000{i:02d}-00000000.jsonl" for i in range(KEEP_RUNS + 3)]
    for path in old:
        path.write_text("")
    (folder / "notes.txt").write_text("not a spool")
    spool = spooled(folder, ROWS[:1])
    assert sorted(folder.glob("*.jsonl")) == [*old[-(KEEP_RUNS - 1) :], spool.path]
    assert (folder / "notes.txt").exists()


@pytest.mark.parametrize("count", [0, 1, 40])
def test_report_json_is_the_same_document_as_before(tmp_path: Path, count: int) -> None:
    """Streamed report.json: byte for byte what dumping the whole document at once wrote."""
    spool = spooled(tmp_path / "runs", ROWS[:count])
    report = RunReport(items=spool.results(), wall_time_s=9.87654, totals=spool.totals, api_requests={"detect": 4})
    write_reports(report, tmp_path / "out")
    payload = {"summary": report.summary(), "items": [r.to_dict() for r in ROWS[:count]]}
    text = (tmp_path / "out" / "report.json").read_text(encoding="utf-8")
    assert text == json.dumps(payload, ensure_ascii=False, indent=1)
    assert json.loads(text) == payload
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.csv", "report.html", "report.json"]


def test_writing_the_reports_takes_the_same_memory_for_any_number_of_items(tmp_path: Path) -> None:
    """Peak Python allocations while writing all three reports: 500 rows and 10,000 rows cost about the same.

    Holding the rows (~0.6 KB each) or a whole report (~1 KB a row) would add megabytes at 10,000."""

    def peak_while_writing(count: int) -> int:
        spool = spooled(tmp_path / f"runs-{count}", tuple(row(i, STATES[i % len(STATES)]) for i in range(count)))
        report = RunReport(items=spool.results(), wall_time_s=1.0, totals=spool.totals)
        tracemalloc.start()
        try:
            write_reports(report, tmp_path / f"out-{count}")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak_while_writing(500), peak_while_writing(10_000)
    assert large < small + 1_000_000, (small, large)
