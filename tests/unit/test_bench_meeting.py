"""The meeting mix: rooms, turn schedules and their share of talk."""

from __future__ import annotations

import pytest
from bench.meeting import PACKET_SECONDS, MixShape, room_sizes, talk_schedule, talk_share, utterances


@pytest.mark.parametrize("participants", [1, 4, 5, 19, 20, 21, 24, 25, 100, 300, 1000])
def test_rooms_hold_everyone_within_the_size_range(participants: int) -> None:
    shape = MixShape()
    sizes = room_sizes(participants, shape, seed=3)
    assert sum(sizes) == participants
    if participants >= shape.room_min:
        assert all(shape.room_min <= size <= shape.room_max for size in sizes)
    else:
        assert sizes == [participants]


def test_schedules_are_seeded() -> None:
    shape = MixShape()
    assert talk_schedule(shape, 7, 60) == talk_schedule(shape, 7, 60)
    assert talk_schedule(shape, 7, 60) != talk_schedule(shape, 8, 60)
    assert room_sizes(300, shape, 1) == room_sizes(300, shape, 1)


def test_about_the_asked_share_talks_at_any_moment() -> None:
    shape = MixShape(talk_share=0.15)
    schedules = [talk_schedule(shape, seed, 120) for seed in range(300)]
    assert talk_share(schedules) == pytest.approx(0.15, abs=0.02)
    # at every moment (away from the loop point) the talkers are near 15 %
    for packet in range(100, 5900, 250):
        talking = sum(s[packet] for s in schedules)
        assert 0.07 * 300 <= talking <= 0.25 * 300


def test_turns_are_a_mix_of_long_turns_and_back_channels() -> None:
    shape = MixShape()
    lengths: list[int] = []
    for seed in range(200):
        run = 0
        for on in talk_schedule(shape, seed, 120):
            if on:
                run += 1
            elif run:
                lengths.append(run)
                run = 0
    seconds = sorted(length * PACKET_SECONDS for length in lengths)
    short = sum(1 for s in seconds if s <= shape.backchannel_s[1])
    assert 0.15 < short / len(seconds) < 0.5  # back-channels (and a few short turns)
    median = seconds[len(seconds) // 2]
    assert 1.0 < median < 4.0
    assert max(seconds) <= shape.turn_max_s + PACKET_SECONDS


def test_a_period_ends_in_silence_so_a_loop_starts_a_new_utterance() -> None:
    schedule = talk_schedule(MixShape(), 1, 30)
    assert schedule[-1] == 0
    assert utterances(b"\x01\x01\x00\x01\x00\x00\x01") == 3
    assert utterances(b"") == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"room_min": 0}, {"room_min": 21, "room_max": 20}, {"talk_share": 0.0}, {"talk_share": 1.0}],
)
def test_a_shape_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="<"):
        MixShape(**kwargs)  # type: ignore[arg-type]
