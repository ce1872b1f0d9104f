"""The pool's headroom follows the measured rate of speech onsets."""

from __future__ import annotations

import pytest

from live_transcription.clock import ManualClock
from live_transcription.stt.modal import ModalEngine
from live_transcription.stt.pool import ConnectionPool, PoolOptions


def pool_with(headroom: int, open_seconds: float) -> tuple[ConnectionPool, ManualClock]:
    clock = ManualClock()
    engine = ModalEngine("ws://127.0.0.1:9/v1/stream", {}, clock=clock)
    pool = ConnectionPool(engine, PoolOptions(headroom=headroom, onset_window_seconds=60.0))
    pool._open_seconds = open_seconds
    return pool, clock


def onsets(pool: ConnectionPool, clock: ManualClock, count: int, every: float) -> None:
    for _ in range(count):
        pool._onsets.append(clock.now())
        clock.skip(every)


def test_the_configured_minimum_holds_when_onsets_are_rare() -> None:
    pool, clock = pool_with(headroom=1, open_seconds=1.0)
    assert pool._headroom(clock.now()) == 1
    onsets(pool, clock, 6, every=10.0)  # one a minute... six in the window: 0.1 per s
    assert pool._headroom(clock.now()) == 1


@pytest.mark.parametrize(
    ("per_second", "open_seconds", "expected"),
    [
        (1.0, 1.0, 3),  # one onset expected while one opens, plus two deviations
        (1.0, 4.0, 8),  # a slow (cold) server needs more warm connections
        (4.0, 1.0, 8),
    ],
)
def test_frequent_onsets_raise_the_headroom(per_second: float, open_seconds: float, expected: int) -> None:
    pool, clock = pool_with(headroom=1, open_seconds=open_seconds)
    onsets(pool, clock, int(per_second * 60), every=1.0 / per_second)
    assert pool._headroom(clock.now()) == expected


def test_onsets_older_than_the_window_no_longer_count() -> None:
    pool, clock = pool_with(headroom=0, open_seconds=1.0)
    onsets(pool, clock, 120, every=0.5)
    assert pool._headroom(clock.now()) > 0
    clock.skip(61.0)
    assert pool._headroom(clock.now()) == 0


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        PoolOptions(headroom=-1)
    with pytest.raises(ValueError):
        PoolOptions(max_connections=0)
