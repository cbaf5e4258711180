"""Stage hand-offs: a stop that ends the next stage first is a cancellation for the sender, not a broken stream."""

from __future__ import annotations

import anyio
import pytest

from lpengine.config import VideoParams
from lpengine.models import Item, ItemSpec
from lpengine.orchestrator import handoff

pytestmark = pytest.mark.anyio


async def test_a_handoff_to_a_stage_that_left_on_a_stop_raises_the_stop() -> None:
    send, receive = anyio.create_memory_object_stream[Item](1)
    receive.close()  # the next stage's workers left: the run is being cancelled
    item = Item(ItemSpec(image="/in/a.png", output_name="a", params=VideoParams()))

    with anyio.CancelScope() as stop:
        stop.cancel()
        await handoff(send, item)
    assert stop.cancelled_caught  # the worker ends like every other worker of a stopped run

    with pytest.raises(anyio.BrokenResourceError):  # no stop: a receiver that vanished is a bug, and says so
        await handoff(send, item)
