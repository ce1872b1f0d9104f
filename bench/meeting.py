"""The meeting mix, pure: participants in rooms of 5-20, each talking about
15 % of the time, in turns and pauses drawn from a seeded distribution.

Each participant is a renewal process: a turn, then a pause, then a turn...
Most turns are log-normal around a few seconds (``turn_median_s``,
``turn_sigma``); a share of them are short back-channel utterances ("yes",
"mm-hm": ``backchannel_s``). Pauses are a minimum plus an exponential whose
mean makes the expected talk share ``talk_share``. Participants are
independent, so at any moment about ``talk_share`` of all of them talk,
whatever the room sizes (real turn-taking correlates speakers within a room;
what the service pays for depends on how many talk, not on who answers
whom). Everything is counted in 20 ms packets and repeats with a period.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

PACKET_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class MixShape:
    room_min: int = 5
    room_max: int = 20
    talk_share: float = 0.15
    turn_median_s: float = 2.5
    turn_sigma: float = 0.6
    turn_max_s: float = 15.0
    backchannel_share: float = 0.3
    backchannel_s: tuple[float, float] = (0.3, 0.8)
    pause_min_s: float = 0.4

    def __post_init__(self) -> None:
        if not 1 <= self.room_min <= self.room_max:
            raise ValueError("1 <= room_min <= room_max")
        if not 0.0 < self.talk_share < 1.0:
            raise ValueError("0 < talk_share < 1")
        if not 0.0 <= self.backchannel_share <= 1.0:
            raise ValueError("0 <= backchannel_share <= 1")

    def mean_turn_s(self) -> float:
        lognormal = min(self.turn_median_s * math.exp(self.turn_sigma**2 / 2), self.turn_max_s)
        low, high = self.backchannel_s
        return (1 - self.backchannel_share) * lognormal + self.backchannel_share * (low + high) / 2

    def mean_pause_s(self) -> float:
        return self.mean_turn_s() * (1 - self.talk_share) / self.talk_share


def room_sizes(participants: int, shape: MixShape, seed: int) -> list[int]:
    """Rooms of room_min..room_max holding ``participants`` in all (a smaller
    room only when there are fewer participants than room_min)."""
    rng = random.Random(seed)
    sizes: list[int] = []
    left = participants
    while left > 0:
        size = rng.randint(shape.room_min, shape.room_max)
        if left - size < shape.room_min:
            # what is left fits one room, or leaves enough for one more
            size = left if left <= shape.room_max else left - shape.room_min
        sizes.append(size)
        left -= size
    return sizes


def talk_schedule(shape: MixShape, seed: int, period_s: float) -> bytes:
    """One participant's period: byte ``i`` is 1 when packet ``i`` is talk."""
    rng = random.Random(seed)
    packets = max(1, round(period_s / PACKET_SECONDS))
    talking = bytearray(packets)
    mean_extra = max(0.0, shape.mean_pause_s() - shape.pause_min_s)

    def pause() -> int:
        return round(
            (shape.pause_min_s + rng.expovariate(1 / mean_extra if mean_extra else math.inf)) / PACKET_SECONDS
        )

    def turn() -> int:
        if rng.random() < shape.backchannel_share:
            seconds = rng.uniform(*shape.backchannel_s)
        else:
            seconds = min(
                rng.lognormvariate(math.log(shape.turn_median_s), shape.turn_sigma), shape.turn_max_s
            )
        return max(1, round(seconds / PACKET_SECONDS))

    # start anywhere in a turn-and-pause cycle, so participants are not in step
    cycle = (shape.mean_turn_s() + shape.mean_pause_s()) / PACKET_SECONDS
    position = -round(rng.random() * 2 * cycle)
    while position < packets:
        length = turn()
        start, end = max(0, position), max(0, min(packets, position + length))
        talking[start:end] = b"\x01" * (end - start)
        position += length + pause()
    # a turn must not run across the loop point into the first packets'
    # talk: end the period in silence
    talking[-1] = 0
    return bytes(talking)


def utterances(schedule: bytes) -> int:
    """Turns in one period (talk runs)."""
    return sum(1 for i, on in enumerate(schedule) if on and (i == 0 or not schedule[i - 1]))


def talk_share(schedules: list[bytes]) -> float:
    total = sum(len(s) for s in schedules)
    return sum(sum(s) for s in schedules) / total if total else 0.0
