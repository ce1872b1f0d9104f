from hypothesis import given
from hypothesis import strategies as st

from live_transcription.audio.ring import DropOldestRing


def test_full_ring_drops_oldest_and_counts() -> None:
    ring: DropOldestRing[int] = DropOldestRing(3)
    for i in range(5):
        ring.push(i)
    assert list(ring) == [2, 3, 4]
    assert ring.dropped == 2
    assert ring.pop() == 2
    assert ring.drain() == [3, 4]
    assert not ring


@given(st.integers(1, 50), st.lists(st.integers(), max_size=200))
def test_never_exceeds_capacity_and_keeps_newest(capacity: int, items: list[int]) -> None:
    ring: DropOldestRing[int] = DropOldestRing(capacity)
    for item in items:
        ring.push(item)
    assert len(ring) <= capacity
    assert list(ring) == items[-capacity:] if items else list(ring) == []
    assert ring.dropped == max(0, len(items) - capacity)
