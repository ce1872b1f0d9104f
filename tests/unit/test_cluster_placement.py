"""Placement and routing: pure decisions."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from live_transcription.cluster.codec import Leave, ReplicaLoad, SetLanguage, Transcribe
from live_transcription.cluster.placement import choose_replica
from live_transcription.cluster.routing import ExecuteHere, ForwardTo, PlaceRoom, TooManyHops, route


def load(
    replica: str, speakers: int, rooms: int = 0, capacity: int = 100, accepting: bool = True
) -> ReplicaLoad:
    return ReplicaLoad(replica, speakers, rooms, capacity, accepting)


def test_least_loaded_by_speakers_not_rooms() -> None:
    loads = [load("a", speakers=30, rooms=1), load("b", speakers=5, rooms=9)]
    assert choose_replica("room", loads) == "b"


def test_rooms_break_a_speaker_tie() -> None:
    loads = [load("a", speakers=5, rooms=3), load("b", speakers=5, rooms=1)]
    assert choose_replica("room", loads) == "b"


def test_full_or_draining_replica_never_chosen() -> None:
    loads = [load("a", speakers=100), load("b", speakers=50, accepting=False), load("c", speakers=99)]
    assert choose_replica("room", loads) == "c"
    assert choose_replica("room", loads[:2]) is None


def test_sticky_owner_keeps_its_room_even_when_busier() -> None:
    loads = [load("a", speakers=100), load("b", speakers=0)]
    assert choose_replica("room", loads, current_owner="a") == "a"


def test_gone_or_excluded_owner_is_replaced() -> None:
    loads = [load("a", speakers=0), load("b", speakers=10)]
    assert choose_replica("room", loads, current_owner="dead") == "a"
    assert choose_replica("room", loads, current_owner="a", exclude={"a"}) == "b"


def test_ties_spread_new_rooms_over_equal_replicas() -> None:
    loads = [load(name, speakers=0) for name in ("a", "b", "c")]
    chosen = Counter(choose_replica(f"room{i}", loads) for i in range(300))
    assert set(chosen) == {"a", "b", "c"}
    assert min(chosen.values()) > 50


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50), st.booleans()), min_size=1, max_size=8))
def test_choice_is_least_loaded_and_never_full(raw: list[tuple[int, int, bool]]) -> None:
    loads = [
        load(f"r{i}", speakers, rooms, capacity=100, accepting=ok)
        for i, (speakers, rooms, ok) in enumerate(raw)
    ]
    chosen = choose_replica("room", loads)
    open_ = [entry for entry in loads if not entry.full]
    if not open_:
        assert chosen is None
        return
    picked = next(entry for entry in loads if entry.replica == chosen)
    assert not picked.full
    assert picked.speakers == min(entry.speakers for entry in open_)
    # every replica computes the same answer from the same loads, in any order
    assert choose_replica("room", reversed(loads)) == chosen


def test_route() -> None:
    opening = Transcribe("room", "s1")
    assert route(opening, "me", self_id="me", hops=0, max_hops=2) == ExecuteHere()
    assert route(opening, "other", self_id="me", hops=0, max_hops=2) == ForwardTo("other")
    assert route(opening, "other", self_id="me", hops=2, max_hops=2) == TooManyHops("other")
    assert route(opening, None, self_id="me", hops=0, max_hops=2) == PlaceRoom()
    # commands that do not open a room run here when nobody owns it: the host says it is not active
    assert (
        route(Transcribe("room", "s1", enable=False), None, self_id="me", hops=0, max_hops=2) == ExecuteHere()
    )
    assert route(SetLanguage("room", "de"), None, self_id="me", hops=0, max_hops=2) == ExecuteHere()
    assert route(Leave("room"), "other", self_id="me", hops=1, max_hops=2) == ForwardTo("other")
