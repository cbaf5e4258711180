"""CPU per item of the state store alone: one run's statements for N items replayed against a fresh state file.

    python scripts/bench_store.py --items 20000
    python scripts/bench_store.py --items 2000 --url postgresql://user@127.0.0.1/db   # the PostgreSQL backend

The sequence is what a successful item commits on its way (lpengine/stages): the resume lookup, the detect
verdict lookup, the detect write-ahead mark, verdict + progress together, the submit write-ahead save, the task
claim + task id together, the download write-ahead save and the final save. No network and no event-loop
wake-ups, so the figure is steadier than bench.py's and isolates what a schema or pragma change costs; compare two
commits by running this script from a worktree of each, side by side (docs/benchmarks.md).

With `--url` the same statements go to PostgreSQL (a fresh batch name in an upgraded database, `lpengine db
upgrade`), and the wall time per item is printed beside the client's CPU: there each statement is a round trip.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import tempfile
import time
import uuid
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio

from lpengine.state.base import StateStore
from lpengine.state.sqlite import SqliteStateStore

_DATA = {f"field{i}": "x" * 20 for i in range(17)}  # about the size of a real item's persisted fields


STATEMENTS_PER_ITEM = 10


async def _replay(opened: AbstractAsyncContextManager[StateStore], items: int) -> None:
    async with opened as store:
        for i in range(items):
            digest = hashlib.sha256(str(i).encode()).hexdigest()
            item, image, task, name = digest[:32], digest, f"task-{digest[:28]}", f"portrait-{i:06d}"
            await store.get(item)
            await store.detect_verdict(image)
            await store.put_detect(image, None, "")
            with store.together():
                await store.put_detect(image, True, "face found")
                await store.put(item, name, image, {**_DATA, "stage": "detect"})
            await store.put(item, name, image, {**_DATA, "stage": "submit", "submit_inflight_wall": time.time()})
            with store.together():
                await store.claim_task(task, item, time.time())
                await store.put(item, name, image, {**_DATA, "stage": "submit", "task_id": task})
            await store.put(item, name, image, {**_DATA, "stage": "download", "task_id": task})
            await store.put(item, name, image, {**_DATA, "stage": "download", "task_id": task, "state": "succeeded"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3, help="fresh state files, one after another")
    parser.add_argument("--url", help="a PostgreSQL URL: replay against that backend instead of a SQLite file")
    args = parser.parse_args()
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "state.db"
            opened: AbstractAsyncContextManager[StateStore]
            if args.url:
                from lpengine.state.postgres import PostgresStateStore

                opened = PostgresStateStore(args.url, f"bench-{uuid.uuid4().hex[:12]}")
            else:
                opened = SqliteStateStore(path)
            before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            anyio.run(_replay, opened, args.items)
            wall = (time.perf_counter() - started) / args.items * 1e3
            after = resource.getrusage(resource.RUSAGE_SELF)
            user = (after.ru_utime - before.ru_utime) / args.items * 1e6
            system = (after.ru_stime - before.ru_stime) / args.items * 1e6
            size = sum(f.stat().st_size for f in Path(folder).iterdir()) / 1e6
            where = "PostgreSQL" if args.url else f"files {size:.0f} MB"
            print(
                f"{args.items:,} items: {user + system:.0f} us CPU per item ({user:.0f} user, {system:.0f} sys), "
                f"{wall:.2f} ms wall per item, {STATEMENTS_PER_ITEM} statements per item, {where}"
            )


if __name__ == "__main__":
    main()
