"""Matching lost submits to unclaimed tasks (`lpengine.stages.submit.match_sends`), on the service clock.

The case that made tests/integration/test_durability.py flaky on a busy host: run k sent B's submit and was
killed; run k+1 wrote A's write-ahead mark and was killed before A's request left. The calibration was late (the
client had recorded its known claims 0.5 s after their tasks were made), so B's task mapped a little after B's
send and a little before A's, and A was the closer: A adopted B's task, B then found nothing, submitted again and
paid twice, and the emulator counted 99 images for 100 videos.
"""

from __future__ import annotations

from lpengine.stages.submit import match_sends

SPEEDUP = 400.0
EARLY = SPEEDUP * 2.0
LATE = SPEEDUP * 65.0
LATE_BY = SPEEDUP * 0.5  # the calibration's lag: every send maps this much before the service saw it


def on_service_clock(local_s: float) -> float:
    return SPEEDUP * local_s


def test_a_later_mark_that_never_left_does_not_take_an_earlier_sends_task() -> None:
    sends = {"B": on_service_clock(100.0) - LATE_BY, "A": on_service_clock(101.0) - LATE_BY}
    created = {"task-of-B": on_service_clock(100.05)}
    assert match_sends(sends, created, early=EARLY, late=LATE) == {"B": "task-of-B"}


def test_a_later_send_that_left_keeps_its_task_when_the_earlier_mark_never_left() -> None:
    sends = {"B": on_service_clock(100.0) - LATE_BY, "A": on_service_clock(101.0) - LATE_BY}
    created = {"task-of-A": on_service_clock(101.05)}
    assert match_sends(sends, created, early=EARLY, late=LATE) == {"A": "task-of-A"}


def test_two_lost_sends_each_get_their_own_task() -> None:
    sends = {"B": on_service_clock(100.0) - LATE_BY, "A": on_service_clock(101.0) - LATE_BY}
    created = {"task-of-B": on_service_clock(100.05), "task-of-A": on_service_clock(101.05)}
    assert match_sends(sends, created, early=EARLY, late=LATE) == {"B": "task-of-B", "A": "task-of-A"}


def test_a_task_just_before_its_send_still_matches_when_no_send_precedes_it() -> None:
    """Within the clock slop (a local clock stepped back): still the send's, as nothing else can own it."""
    sends = {"A": on_service_clock(101.0)}
    created = {"task-of-A": on_service_clock(100.5)}
    assert match_sends(sends, created, early=EARLY, late=LATE) == {"A": "task-of-A"}


def test_nothing_outside_the_window_matches() -> None:
    sends = {"A": on_service_clock(100.0)}
    created = {"too-early": on_service_clock(97.0), "too-late": on_service_clock(166.0)}
    assert match_sends(sends, created, early=EARLY, late=LATE) == {}
