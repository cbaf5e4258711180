"""The engine end to end over real HTTP against the emulator: a mixed batch lands every item in the right state."""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import os
import shutil
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from PIL import Image

from lpengine import Engine, ItemState, load_config
from lpengine.emulator import EmulatorSettings, FaultRule, FaultSettings, run_emulator
from lpengine.media import verify_mp4
from lpengine.reports.spool import SpooledResults
from tests.helpers import cancel_after_first_submit, write_batch

pytestmark = pytest.mark.anyio

KEY = "sk-test-engine-0123456789"
SPEEDUP = 200.0


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """42 portraits, 4 non-faces, 4 locally invalid files — 50 inputs."""
    from lpengine.demo_assets import make_non_faces, make_portraits

    root = tmp_path_factory.mktemp("dataset")
    faces = make_portraits(root / "faces", 42)
    non_faces = make_non_faces(root / "nonfaces", 4)
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image")
    Image.new("RGB", (4097, 100)).save(bad / "too_wide.png")
    Image.new("RGB", (64, 64)).save(bad / "anim.gif")
    return {"faces": faces, "non_faces": non_faces, "bad": sorted(bad.iterdir())}


def make_batch(tmp_path: Path, dataset: dict[str, list[Path]], base_url: str, **extra: str) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for group in dataset.values():
        for path in group:
            shutil.copy(path, photos / f"{path.parent.name}_{path.name}")
    return write_batch(tmp_path, base_url, SPEEDUP, **extra)


@pytest.fixture
async def emulator() -> AsyncIterator[object]:
    async with run_emulator(EmulatorSettings(api_keys=[KEY], speedup=SPEEDUP, seed=3, video="stub")) as emu:
        yield emu


def storage_yaml(backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The `storage:` block for a backend; S3 runs against the session's moto server on 127.0.0.1."""
    if backend != "s3":
        return f"\n  backend: {backend}"
    from tests.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, unique_bucket_name

    server = request.getfixturevalue("s3_server")
    bucket = server.create_bucket(unique_bucket_name())
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET_ACCESS_KEY)
    # moto on an IP address cannot do virtual-hosted buckets; OSS needs `virtual` (docs/storage.md)
    return (
        f"\n  backend: s3\n  endpoint_url: {server.endpoint_url}\n  region: us-east-1\n  bucket: {bucket}"
        "\n  addressing_style: path\n  cleanup: never"
    )


@pytest.mark.parametrize("backend", ["fileserver", "s3", "dashscope_temp"])
async def test_mixed_batch_every_item_in_the_right_state(
    tmp_path: Path,
    dataset: dict[str, list[Path]],
    emulator: object,
    backend: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """50 items: good, invalid, no face, failing tasks (permanent and retryable), one expired URL — with each of
    the three storage backends."""
    faces = dataset["faces"]
    permanent, retry_once, expired = faces[:2], faces[2:4], faces[4]
    emulator.set_faults(  # type: ignore[attr-defined]
        FaultSettings(
            rules=[
                *(FaultRule(match=sha(p), action="fail_task", code="InvalidImage.NoHumanFace") for p in permanent),
                *(FaultRule(match=sha(p), action="fail_task", code="InternalError.Algo", times=1) for p in retry_once),
                FaultRule(match=sha(expired), action="expire_result"),
            ]
        )
    )
    batch_file = make_batch(tmp_path, dataset, emulator.base_url, storage=storage_yaml(backend, request, monkeypatch))  # type: ignore[attr-defined]
    config = load_config(batch_file)
    events = []
    async with Engine(config, api_key=KEY, on_event=events.append) as engine:
        report = await engine.run()

    counts = Counter(r.state for r in report.items)
    assert counts == {
        ItemState.SUCCEEDED: 39,
        ItemState.REJECTED_LOCALLY: 4,
        ItemState.DETECT_FAILED: 4,
        ItemState.TASK_FAILED: 2,
        ItemState.DOWNLOAD_FAILED: 1,
    }
    by_input = {Path(r.input).name: r for r in report.items}
    assert "InvalidImage.NoHumanFace" in by_input[f"faces_{permanent[0].name}"].reason
    assert "expired" in by_input[f"faces_{expired.name}"].reason
    assert by_input[f"faces_{retry_once[0].name}"].state is ItemState.SUCCEEDED
    assert by_input[f"faces_{retry_once[0].name}"].submit_attempts == 2
    assert "10 MB" in by_input["bad_zero.jpg"].reason or "empty" in by_input["bad_zero.jpg"].reason.lower()
    assert all(r.reason for r in report.items if r.state is not ItemState.SUCCEEDED)

    out = tmp_path / "out"
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 39
    for video in videos:
        verify_mp4(video)
    assert not list(out.glob("*.part")) and not list(out.glob(".*.part"))

    stats = emulator.stats()  # type: ignore[attr-defined]
    assert sum(stats.throttled.values()) == 0
    assert all(n == 1 for n in stats.detect_per_image.values())
    assert len(stats.detect_per_image) == 46
    submitted = dict(stats.submissions_per_image)
    assert sum(submitted.values()) == 42 + 2  # each passed image once, the two retryable failures twice
    assert all(submitted[sha(p)] == 2 for p in retry_once)

    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 50
    assert sum(1 for r in rows if r["state"] == "succeeded") == 39
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["counts"]["succeeded"] == 39
    assert report.cost_cny == pytest.approx(46 * 0.004 + 39 * 3.95 * 0.02, rel=0.02)
    assert any(e.state is ItemState.SUCCEEDED for e in events)
    logs = list(out.glob("lpengine-*.jsonl"))
    assert logs and KEY not in logs[0].read_text()
    assert all("item" in json.loads(line) for line in logs[0].read_text().splitlines() if "item.finished" in line)


async def test_rerun_pays_nothing_for_finished_work(
    tmp_path: Path, dataset: dict[str, list[Path]], emulator: object
) -> None:
    """A second run of the same batch skips verified outputs and reuses detect verdicts: zero paid calls."""
    small = {"faces": dataset["faces"][:5], "non_faces": dataset["non_faces"][:1], "bad": []}
    config = load_config(make_batch(tmp_path, small, emulator.base_url))  # type: ignore[attr-defined]
    async with Engine(config, api_key=KEY) as engine:
        first = await engine.run()
    assert Counter(r.state for r in first.items) == {ItemState.SUCCEEDED: 5, ItemState.DETECT_FAILED: 1}
    before = emulator.stats()  # type: ignore[attr-defined]
    async with Engine(config, api_key=KEY) as engine:
        second = await engine.run()
    after = emulator.stats()  # type: ignore[attr-defined]
    assert Counter(r.state for r in second.items) == {ItemState.SUCCEEDED: 5, ItemState.DETECT_FAILED: 1}
    assert all(r.resumed for r in second.items)
    assert after.requests.get("detect", 0) == before.requests.get("detect", 0)
    assert after.requests.get("submit", 0) == before.requests.get("submit", 0)
    assert after.result_downloads == before.result_downloads


async def test_rerun_of_a_finished_batch_commits_nothing_unless_an_input_moved(
    tmp_path: Path, dataset: dict[str, list[Path]], emulator: object
) -> None:
    """Finished items are not saved again on a re-run (cron over a large finished batch would commit once per
    item for nothing), but an image found at a new path is: the state keeps saying where each input is."""
    small = {"faces": dataset["faces"][:3], "non_faces": dataset["non_faces"][:1], "bad": []}
    batch = make_batch(tmp_path, small, emulator.base_url)  # type: ignore[attr-defined]
    config = load_config(batch)

    def rows() -> dict[str, tuple[float, str]]:
        with sqlite3.connect(config.state_path) as db:
            query = "SELECT item_id, updated_at, json_extract(data, '$.input') FROM items"
            return {item_id: (updated, where) for item_id, updated, where in db.execute(query)}

    async with Engine(config, api_key=KEY) as engine:
        await engine.run()
    first = rows()
    assert len(first) == 4
    async with Engine(config, api_key=KEY) as engine:
        second = await engine.run()
    assert all(r.resumed for r in second.items)
    assert rows() == first

    (tmp_path / "photos").rename(tmp_path / "moved")
    batch.write_text(batch.read_text().replace("images: photos", "images: moved"))
    config = load_config(batch)
    async with Engine(config, api_key=KEY) as engine:
        third = await engine.run()
    assert Counter(r.state for r in third.items) == Counter(r.state for r in second.items)
    moved = rows()
    assert moved.keys() == first.keys()
    assert all(Path(where).parent == tmp_path / "moved" for _, where in moved.values())
    assert all(moved[i][0] > first[i][0] for i in first)


async def test_rerun_reads_only_the_images_changed_since_they_were_checked(
    tmp_path: Path, dataset: dict[str, list[Path]], emulator: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished item whose image still has the stat stamp recorded with its digest is not read again; a touched
    image is read once more (same content: still finished, nothing paid); an edited one is a new item."""
    upload_stage = importlib.import_module("lpengine.stages.upload")  # `lpengine.stages.upload` is the stage function

    small = {"faces": dataset["faces"][:3], "non_faces": [], "bad": []}
    config = load_config(make_batch(tmp_path, small, emulator.base_url))  # type: ignore[attr-defined]
    read: list[str] = []
    inspect = upload_stage.inspect_image
    monkeypatch.setattr(upload_stage, "inspect_image", lambda path: read.append(path.name) or inspect(path))

    async def run() -> Counter[ItemState]:
        read.clear()
        async with Engine(config, api_key=KEY) as engine:
            return Counter(r.state for r in (await engine.run()).items)

    assert await run() == {ItemState.SUCCEEDED: 3}
    assert len(read) == 3
    paid = emulator.stats().requests.get("detect", 0)  # type: ignore[attr-defined]
    assert await run() == {ItemState.SUCCEEDED: 3}
    assert read == []

    photos = sorted((tmp_path / "photos").iterdir())
    os.utime(photos[0])  # a new mtime and ctime, same bytes
    assert await run() == {ItemState.SUCCEEDED: 3}
    assert read == [photos[0].name]
    assert await run() == {ItemState.SUCCEEDED: 3}
    assert read == []  # the fresh stamp was recorded
    assert emulator.stats().requests.get("detect", 0) == paid  # type: ignore[attr-defined]

    shutil.copyfile(dataset["faces"][5], photos[1])  # edited in place: new content
    assert await run() == {ItemState.SUCCEEDED: 3}
    assert read == [photos[1].name]
    assert emulator.stats().requests.get("detect", 0) == paid + 1  # type: ignore[attr-defined]


async def test_process_one_item_from_a_service(
    tmp_path: Path, dataset: dict[str, list[Path]], emulator: object
) -> None:
    """`engine.process()` feeds one item and returns its result while the engine stays open."""
    config = load_config(make_batch(tmp_path, {"faces": [], "non_faces": [], "bad": []}, emulator.base_url))  # type: ignore[attr-defined]
    async with Engine(config, api_key=KEY) as engine:
        first = await engine.process(dataset["faces"][0])
        second = await engine.process(dataset["non_faces"][0], output_name="cat")
    assert first.state is ItemState.SUCCEEDED and first.output
    assert await anyio.Path(first.output).exists()
    assert second.state is ItemState.DETECT_FAILED and second.detect_message


async def test_lost_submit_answer_is_reconciled_not_resubmitted(
    tmp_path: Path, dataset: dict[str, list[Path]], emulator: object
) -> None:
    """The service accepts a task but the answer is lost: the engine finds it in the task list, pays once."""
    emulator.set_faults(FaultSettings(rules=[FaultRule(match="", action="lose_submit_response", times=2)]))  # type: ignore[attr-defined]
    small = {"faces": dataset["faces"][:6], "non_faces": [], "bad": []}
    config = load_config(make_batch(tmp_path, small, emulator.base_url))  # type: ignore[attr-defined]
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    assert all(r.state is ItemState.SUCCEEDED for r in report.items)
    assert all(r.submit_attempts == 1 for r in report.items)
    stats = emulator.stats()  # type: ignore[attr-defined]
    assert stats.faults.get("lose_submit_response", 0) == 2
    assert len(stats.submissions_per_image) == 6 and set(stats.submissions_per_image.values()) == {1}
    log = next((tmp_path / "out").glob("lpengine-*.jsonl")).read_text()
    assert log.count('"submit.reconciled"') == 2 and '"adopted": null' not in log


async def test_items_flow_one_by_one(tmp_path: Path, dataset: dict[str, list[Path]], emulator: object) -> None:
    """Backpressure, not batches: the first video is on disk before the last image has even been uploaded."""
    small = {"faces": dataset["faces"][:30], "non_faces": [], "bad": []}
    config = load_config(make_batch(tmp_path, small, emulator.base_url))  # type: ignore[attr-defined]
    order: list[tuple[str, str, str | None]] = []
    async with Engine(config, api_key=KEY, on_event=lambda e: order.append((e.item, e.stage, e.state))) as engine:
        report = await engine.run()
    assert report.ok
    first_success = next(i for i, (_, _, state) in enumerate(order) if state is ItemState.SUCCEEDED)
    last_upload_done = max(i for i, (_, stage, state) in enumerate(order) if stage == "upload" and state is None)
    assert first_success < last_upload_done


async def test_cancelling_the_caller_stops_cleanly_and_resumes(
    tmp_path: Path, dataset: dict[str, list[Path]], emulator: object
) -> None:
    """Cancel the task awaiting `run()` mid-batch: no hang, state kept; the next run finishes without paying twice."""
    small = {"faces": dataset["faces"][:12], "non_faces": [], "bad": []}
    config = load_config(make_batch(tmp_path, small, emulator.base_url))  # type: ignore[attr-defined]
    await cancel_after_first_submit(config, KEY)
    async with Engine(config, api_key=KEY) as engine:
        report = await engine.run()
    assert report.ok and len(report.items) == 12
    assert any(r.resumed for r in report.items)
    stats = emulator.stats()  # type: ignore[attr-defined]
    assert set(stats.submissions_per_image.values()) == {1}


async def test_run_keeps_results_in_its_spool_file_not_in_memory(
    tmp_path: Path, dataset: dict[str, list[Path]], emulator: object
) -> None:
    """`report.items` is read from the run's spool beside the state store (an edit there shows through), each run
    gets its own, and report.json holds the same document as the whole-report dump did."""
    small = {"faces": dataset["faces"][:3], "non_faces": dataset["non_faces"][:1], "bad": dataset["bad"][:1]}
    config = load_config(make_batch(tmp_path, small, emulator.base_url))  # type: ignore[attr-defined]
    async with Engine(config, api_key=KEY) as engine:
        first = await engine.run()
        second = await engine.run()
    assert isinstance(first.items, SpooledResults) and isinstance(second.items, SpooledResults)
    spools = sorted((tmp_path / "out" / ".lpengine" / "state.runs").glob("*.jsonl"))
    assert sorted([first.items.path, second.items.path]) == spools and len(spools) == 2
    rows = list(second.items)
    assert rows == list(second.items) and len(rows) == len(second.items) == 5
    assert Counter(r.state for r in rows) == {
        ItemState.SUCCEEDED: 3,
        ItemState.DETECT_FAILED: 1,
        ItemState.REJECTED_LOCALLY: 1,
    }
    assert second.summary() == replace(second, items=tuple(rows), totals=None).summary()
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written == json.loads(json.dumps({"summary": second.summary(), "items": [r.to_dict() for r in rows]}))

    lines = first.items.path.read_text().splitlines()
    edited = {**json.loads(lines[0]), "reason": "edited on disk"}
    first.items.path.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    assert next(iter(first.items)).reason == "edited on disk"
