"""Caps shared over workers, and the restart backoff."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from live_transcription.workers.policy import RestartBackoff, cap_share


@given(st.integers(1, 10_000), st.integers(1, 256))
def test_shares_add_up_to_the_total_and_differ_by_one_at_most(total: int, workers: int) -> None:
    shares = [cap_share(total, workers, index) for index in range(workers)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_shares() -> None:
    assert [cap_share(500, 3, i) for i in range(3)] == [167, 167, 166]
    assert [cap_share(200, 2, i) for i in range(2)] == [100, 100]
    with pytest.raises(ValueError, match="worker 2 of 2"):
        cap_share(10, 2, 2)


def test_a_worker_that_ran_a_while_restarts_at_once_and_one_that_keeps_crashing_waits_longer() -> None:
    backoff = RestartBackoff(first=0.5, cap=4.0, stable_after=60.0)
    assert backoff.delay_after(3600.0) == 0.0
    assert [backoff.delay_after(0.1) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    # a long run clears the streak
    assert backoff.delay_after(61.0) == 0.0
    assert backoff.delay_after(1.0) == 0.5
