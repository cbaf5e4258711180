"""One contract for every state-store backend: SQLite and a real PostgreSQL answer these the same way."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from lpengine.state.base import StateStore, StoredUpload
from lpengine.state.postgres import PostgresStateStore
from lpengine.state.sqlite import SqliteStateStore
from tests.pg import unique_batch

pytestmark = pytest.mark.anyio

Opener = Callable[[], AbstractAsyncContextManager[StateStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the same store each time it is called (so a test can close it and look again)."""
    if request.param == "sqlite":
        return lambda: SqliteStateStore(tmp_path / "state.db")
    url, batch = request.getfixturevalue("pg_url"), unique_batch()
    return lambda: PostgresStateStore(url, batch)


async def test_an_item_is_saved_updated_and_read_back_after_reopening(opener: Opener) -> None:
    async with opener() as store:
        assert await store.get("i1") is None
        await store.put("i1", "alice", "sha-a", {"stage": "detect", "state": None, "reason": "日本語 \u0000 ok"})
        await store.put("i1", "alice", "sha-a", {"stage": "poll", "state": None, "task_id": "t-1", "n": 2})
    async with opener() as store:
        row = await store.get("i1")
    assert row is not None
    assert (row.item_id, row.output_name, row.stage, row.state, row.task_id) == ("i1", "alice", "poll", None, "t-1")
    assert row.data == {"stage": "poll", "state": None, "task_id": "t-1", "n": 2}


async def test_items_stream_in_output_name_order_across_pages(opener: Opener) -> None:
    names = [f"n{i:04d}" for i in range(1001)]  # more than two pages of 500
    async with opener() as store:
        with store.together():
            for name in reversed(names):
                await store.put(f"id-{name}", name, None, {"stage": "plan"})
        seen = [row.output_name async for row in store.items()]
    assert seen == names


async def test_a_detect_mark_a_verdict_and_forgetting_it(opener: Opener) -> None:
    async with opener() as store:
        assert await store.detect_verdict("img") is None
        await store.put_detect("img", None, "")  # the write-ahead mark before the paid call
        assert await store.detect_verdict("img") == (None, "")
        await store.put_detect("img", False, "no face")
        assert await store.detect_verdict("img") == (False, "no face")
        await store.put_detect("other", True, "ok")
        await store.forget_detect("img")
        assert await store.detect_verdict("img") is None
        assert await store.detect_verdict("other") == (True, "ok")


async def test_an_upload_keeps_the_key_this_batch_created_when_found_again(opener: Opener) -> None:
    async with opener() as store:
        assert await store.upload("sha", "liveportrait", "s3") is None
        await store.put_upload("sha", "liveportrait", "s3", StoredUpload("https://a/1", True, 100.0, "key-1"))
        await store.put_upload("sha", "liveportrait", "s3", StoredUpload("https://a/2", False, 200.0, None))
        assert await store.upload("sha", "liveportrait", "s3") == StoredUpload("https://a/2", False, 200.0, "key-1")
        await store.put_upload("sha2", "liveportrait", "s3", StoredUpload("https://a/3", False, 1.0, "key-2"))
        assert sorted(await store.created_keys()) == ["key-1", "key-2"]
        await store.forget_created_keys(["key-1"])
        assert await store.created_keys() == ["key-2"]
        assert await store.upload("sha", "liveportrait", "s3") is None


async def test_a_task_belongs_to_the_first_item_that_claims_it(opener: Opener) -> None:
    async with opener() as store:
        assert await store.claim_task("t-1", "i1", 10.0)
        assert await store.claim_task("t-1", "i1", 11.0)  # sent again (a retry after an outage): still ours
        assert not await store.claim_task("t-1", "i2", 12.0)
        assert await store.claim_task("t-2", "i2", 20.0)
        assert await store.claim_times() == {"t-1": 10.0, "t-2": 20.0}
        assert await store.claimed_since("i1", 10.0) == "t-1"
        assert await store.claimed_since("i1", 10.5) is None
        assert await store.claimed_since("i3", 0.0) is None


async def test_lost_submits_are_the_items_with_a_mark_and_no_task(opener: Opener) -> None:
    async with opener() as store:
        await store.put("lost", "a", None, {"stage": "submit", "submit_inflight_wall": 5.5})
        await store.put("done", "b", None, {"stage": "poll", "task_id": "t", "submit_inflight_wall": 6.0})
        await store.put("cleared", "c", None, {"stage": "submit", "submit_inflight_wall": None})
        await store.put("fresh", "d", None, {"stage": "submit"})
        assert await store.inflight_submits() == [("lost", 5.5)]


async def test_a_digest_answers_only_for_the_stamp_it_was_recorded_with(opener: Opener) -> None:
    async with opener() as store:
        await store.put_digest("/in/a.jpg", (10, 1, 2, 3), "sha-one")
        assert await store.digest("/in/a.jpg", (10, 1, 2, 3)) == "sha-one"
        for changed in [(11, 1, 2, 3), (10, 9, 2, 3), (10, 1, 9, 3), (10, 1, 2, 9)]:  # size, mtime, ctime, inode
            assert await store.digest("/in/a.jpg", changed) is None
        assert await store.digest("/in/b.jpg", (10, 1, 2, 3)) is None
        await store.put_digest("/in/a.jpg", (12, 4, 5, 3), "sha-two")  # checked again after an edit
        assert await store.digest("/in/a.jpg", (10, 1, 2, 3)) is None
        assert await store.digest("/in/a.jpg", (12, 4, 5, 3)) == "sha-two"


async def test_writes_made_together_are_all_there_afterwards(opener: Opener) -> None:
    async with opener() as store:
        with store.together():
            await store.put_detect("a" * 64, True, "face found")
            assert await store.claim_task("task-1", "item-1", 1.0)
            await store.put("item-1", "x", None, {"stage": "poll", "task_id": "task-1"})
    async with opener() as store:
        assert await store.detect_verdict("a" * 64) == (True, "face found")
        assert await store.claimed_since("item-1", 0.0) == "task-1"
        row = await store.get("item-1")
        assert row is not None and row.task_id == "task-1"


async def test_a_redo_replaces_its_items_together_and_the_epoch_is_the_latest_recorded(opener: Opener) -> None:
    async with opener() as store:
        assert await store.redo_epoch() == 0
        for name in ("a", "b", "c"):
            await store.put(
                f"id-{name}", name, None, {"stage": "download", "state": "succeeded", "task_id": f"t-{name}"}
            )
        await store.start_redo(
            [
                (f"id-{name}", {"stage": "upload", "state": None, "task_id": None, "redo": {"epoch": 2, "count": 1}})
                for name in ("a", "b")
            ]
        )
        assert await store.redo_epoch() == 2
    async with opener() as store:
        rows = {row.output_name: row async for row in store.items()}
        assert await store.redo_epoch() == 2
    assert (rows["a"].state, rows["a"].stage, rows["a"].task_id) == (None, "upload", None)
    assert rows["b"].data["redo"] == {"epoch": 2, "count": 1}
    assert (rows["c"].state, rows["c"].task_id, rows["c"].data.get("redo")) == ("succeeded", "t-c", None)
