"""The poll scheduler with other workers' tasks in the account's queue: it spends no query on a task they delay."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from lpengine.client.wire import TaskInfo, TaskStatus
from lpengine.config import VideoParams
from lpengine.models import Item, ItemSpec
from lpengine.stages.poll import PollScheduler
from lpengine.state.base import QueueView

pytestmark = pytest.mark.anyio

HOUR = 3600.0


async def test_a_task_queued_behind_other_workers_tasks_waits_for_them_before_it_is_queried() -> None:
    # Emulated time a million times faster than ours: this worker's own 10 s task alone would be due at once.
    scheduler = PollScheduler(speedup=1e6, ratio=1.0, min_interval_s=0.0, max_interval_s=1e12)
    item = Item(ItemSpec(image="/in/a.png", output_name="a", params=VideoParams()), audio_duration=10.0)
    now = anyio.current_time()
    scheduler.add(item, queued=now)
    tracked = await scheduler.next_due()
    assert tracked is not None and tracked.item is item

    # Another worker queued an hour of audio just before it: the runner serves that first.
    scheduler.set_view(QueueView(runner_free=None, queued=[(now - 1e-6, 1e6 * HOUR)]))
    assert not scheduler.recheck(tracked)  # handed back, no query
    assert tracked.due >= now + HOUR
    assert scheduler.next_end() == pytest.approx(now + HOUR, abs=1e-3)  # when a place in the window should free

    # That task left the account's queue: this one is due again.
    scheduler.set_view(QueueView(runner_free=anyio.current_time(), queued=[]))
    scheduler.replan()
    assert await scheduler.next_due() is tracked


async def test_a_task_that_overran_is_looked_at_a_step_after_its_last_look_however_often_the_plan_is_redone() -> None:
    """With other workers, the plan is redone before every query; a task running longer than predicted must still
    come due (it was pushed a step past *now* by every replan, and looked at only after `max_interval`)."""
    scheduler = PollScheduler(speedup=1e6, ratio=1.0, min_interval_s=0.0, max_interval_s=1e12)
    item = Item(ItemSpec(image="/in/a.png", output_name="a", params=VideoParams()), audio_duration=10.0)
    scheduler.add(item)
    tracked = await scheduler.next_due()
    assert tracked is not None
    assert not scheduler.report(tracked, TaskInfo(task_id="t", status=TaskStatus.RUNNING))  # past its prediction
    due = tracked.due
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
        scheduler.replan()
        assert tracked.due == due  # not pushed back by the replans
    assert await scheduler.next_due() is tracked
