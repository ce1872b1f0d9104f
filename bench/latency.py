"""Word latency: from the RTP packet that carried a word's last audio to the
transcript message arriving at the HPB (emulator). Pure code.

Every subscription (one publisher's stream to the service) loops the same
``Pattern`` from an ``offset``; ``SendLog`` keeps the send time of each of its
packets by packet index (a bounded ring). ``WordMap`` says, for the k-th word
of an utterance, at which packet of the period that word's audio is complete
(computed once, offline, by running the service's own audio gate and the
zero-delay engine over the pattern). ``WordLatency`` then turns each
transcript message into one latency per word it shows for the first time.

The matching assumes the service is less than one pattern period behind
(a few seconds): the newest loop whose packet was already sent is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


class SendLog:
    """Send times (monotonic seconds) of one stream's packets, by index from 0,
    keeping the last ``capacity`` packets."""

    __slots__ = ("_times", "capacity", "sent")

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._times: npt.NDArray[np.float64] = np.zeros(capacity, dtype=np.float64)
        self.sent = 0
        """Packets sent so far; the next index."""

    def record(self, when: float) -> int:
        """Record the next packet's send time; returns its index."""
        index = self.sent
        self._times[index % self.capacity] = when
        self.sent = index + 1
        return index

    def time_of(self, index: int) -> float | None:
        """Send time of packet ``index``; None when not sent yet or forgotten."""
        if index < 0 or index >= self.sent or index < self.sent - self.capacity:
            return None
        return float(self._times[index % self.capacity])


@dataclass(frozen=True, slots=True)
class WordMap:
    """``word_packets[k]``: position in the period (0 = first talk packet) of
    the packet that completes the audio of word k+1 of the utterance."""

    period: int
    word_packets: tuple[int, ...]


def packet_index_for(log: SendLog, offset: int, period: int, position: int, arrived: float) -> int | None:
    """Index (in ``log``) of the newest packet at pattern ``position`` sent no
    later than ``arrived``; the stream started at pattern position ``offset``."""
    first = (position - offset) % period  # first index at that position
    if log.sent <= first:
        return None
    index = first + (log.sent - 1 - first) // period * period
    while index >= 0:
        sent_at = log.time_of(index)
        if sent_at is None:
            return None
        if sent_at <= arrived:
            return index
        index -= period
    return None


@dataclass(slots=True)
class _SpeakerState:
    words_shown: int = 0


@dataclass(slots=True)
class WordLatency:
    """Per-speaker caption state -> latencies. One owner (the emulator's loop)."""

    word_map: WordMap
    latencies: list[float] = field(default_factory=list)
    max_samples: int = 200_000
    unmatched: int = 0
    """New words with no packet to match (more words than the map, or too old)."""
    finals: int = 0
    partials: int = 0
    samples_dropped: int = 0
    _speakers: dict[str, _SpeakerState] = field(default_factory=dict)

    def forget(self, speaker: str) -> None:
        self._speakers.pop(speaker, None)

    def on_transcript(
        self, speaker: str, text: str, *, final: bool, arrived: float, log: SendLog, offset: int
    ) -> int:
        """Account one transcript message; returns how many latencies it added."""
        state = self._speakers.setdefault(speaker, _SpeakerState())
        count = len(text.split())
        added = 0
        if final:
            self.finals += 1
        else:
            self.partials += 1
        for k in range(state.words_shown, count):
            if k >= len(self.word_map.word_packets):
                self.unmatched += 1
                continue
            position = self.word_map.word_packets[k]
            index = packet_index_for(log, offset, self.word_map.period, position, arrived)
            sent_at = None if index is None else log.time_of(index)
            if sent_at is None:
                self.unmatched += 1
                continue
            self._add(arrived - sent_at)
            added += 1
        state.words_shown = 0 if final else max(state.words_shown, count)
        return added

    def _add(self, latency: float) -> None:
        if len(self.latencies) >= self.max_samples:
            self.samples_dropped += 1
            return
        self.latencies.append(latency)

    def take(self) -> list[float]:
        """The latencies so far, and start over (the caption state is kept)."""
        taken, self.latencies = self.latencies, []
        return taken


def word_map_from_events(period: int, events: Sequence[tuple[str, int]]) -> WordMap:
    """Build the map from an offline run over at least two periods:
    ``events`` are ("word" | "pause", absolute packet index) in order. The
    last complete utterance is used (the first may be cut short)."""
    utterances: list[list[int]] = [[]]
    for kind, index in events:
        if kind == "word":
            utterances[-1].append(index)
        elif kind == "pause" and utterances[-1]:
            utterances.append([])
    complete = [u for u in utterances[:-1] if u] or [u for u in utterances if u]
    if not complete:
        raise ValueError("the offline run produced no words")
    return WordMap(period, tuple(index % period for index in complete[-1]))
