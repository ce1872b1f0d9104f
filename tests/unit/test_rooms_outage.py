"""The process-wide HPB outage tracker: when an outage starts and ends, and
the two lines it logs."""

from __future__ import annotations

import logging

import pytest

from live_transcription.clock import ManualClock
from live_transcription.hpb.failures import FailureCause
from live_transcription.rooms.outage import OutageEnded, OutageStarted, OutageTracker, log_transition

REFUSED = FailureCause("connection-refused", "connection refused")
TIMED_OUT = FailureCause("timed-out", "timed out")


def test_the_first_failure_starts_it_the_others_are_counted_the_first_success_ends_it() -> None:
    clock = ManualClock(start=100.0)
    tracker = OutageTracker(clock)
    assert not tracker.ongoing
    assert tracker.failed("reconnect", REFUSED, began=100.0) == OutageStarted(REFUSED)
    assert tracker.ongoing
    clock.skip(3)
    # other rooms, other attempts, even another cause: the same outage
    assert tracker.failed("reconnect", REFUSED, began=clock.now()) is None
    assert tracker.failed("join", TIMED_OUT, began=clock.now()) is None
    assert tracker.failed("join", REFUSED, began=clock.now()) is None
    clock.skip(40)
    assert tracker.succeeded() == OutageEnded(REFUSED, 43.0, failed_joins=2, failed_reconnects=2)
    assert not tracker.ongoing
    assert tracker.succeeded() is None  # the other rooms coming back: nothing more


def test_successes_without_an_outage_change_nothing() -> None:
    tracker = OutageTracker(ManualClock())
    assert tracker.succeeded() is None
    assert not tracker.ongoing


def test_a_failure_that_raced_the_recovery_starts_no_outage() -> None:
    clock = ManualClock(start=0.0)
    tracker = OutageTracker(clock)
    tracker.failed("reconnect", REFUSED, began=0.0)
    clock.skip(10)
    began_before_recovery = clock.now()
    clock.skip(1)
    assert tracker.succeeded() is not None
    # another room's attempt began before that success and is reported after it
    assert tracker.failed("reconnect", REFUSED, began=began_before_recovery) is None
    assert not tracker.ongoing
    # an attempt begun after the recovery that fails: the HPB is gone again
    clock.skip(5)
    assert tracker.failed("join", TIMED_OUT, began=clock.now()) == OutageStarted(TIMED_OUT)
    clock.skip(2)
    assert tracker.succeeded() == OutageEnded(TIMED_OUT, 2.0, failed_joins=1, failed_reconnects=0)


def test_counts_start_again_with_each_outage() -> None:
    clock = ManualClock(start=0.0)
    tracker = OutageTracker(clock)
    for _ in range(5):
        tracker.failed("reconnect", REFUSED, began=clock.now())
    tracker.succeeded()
    clock.skip(1)
    tracker.failed("join", REFUSED, began=clock.now())
    assert tracker.succeeded() == OutageEnded(REFUSED, 0.0, failed_joins=1, failed_reconnects=0)


def test_the_two_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="live_transcription")
    log_transition(None)
    log_transition(OutageStarted(REFUSED))
    log_transition(OutageEnded(REFUSED, 42.4, failed_joins=17, failed_reconnects=3))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "cannot reach the signaling server (connection refused): rooms cannot be joined or kept"),
        (
            "INFO",
            "signaling server reachable again after 42 s "
            "(17 join(s) and 3 reconnection attempt(s) failed meanwhile)",
        ),
    ]
    assert [(r.__dict__["event"], r.__dict__["state"], r.__dict__["cause"]) for r in caplog.records] == [
        ("hpb-outage", "started", "connection-refused"),
        ("hpb-outage", "ended", "connection-refused"),
    ]
