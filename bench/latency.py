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

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt


class PacketTimes(Protocol):
    """When a stream's packets were sent, by index from 0 (``SendLog``, or a
    lean stream that derives it from its generator's tick log)."""

    @property
    def sent(self) -> int: ...

    def time_of(self, index: int) -> float | None: ...


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
    """Where words complete, per utterance of a stream that starts in the
    pause: ``utterances[u % len(utterances)][k]`` is the packet, counted
    from the first talk packet of utterance u, that completes word k+1 of
    that utterance. More than one utterance when the engine's state carries
    across utterances (e.g. a word every n voiced frames)."""

    period: int
    utterances: tuple[tuple[int, ...], ...]

    def words(self, utterance: int) -> tuple[int, ...]:
        return self.utterances[utterance % len(self.utterances)]


def first_talk_index(offset: int, period: int) -> int:
    """Index of the first talk packet of a stream started at pattern
    position ``offset`` (talk is positions 0.. of the pattern)."""
    return (period - offset) % period


def current_utterance(log: PacketTimes, offset: int, period: int, arrived: float) -> int | None:
    """The newest utterance (loop) whose first talk packet was sent no later
    than ``arrived``."""
    first = first_talk_index(offset, period)
    if log.sent <= first:
        return None
    loop = (log.sent - 1 - first) // period
    while loop >= 0:
        sent_at = log.time_of(first + loop * period)
        if sent_at is None:
            return None
        if sent_at <= arrived:
            return loop
        loop -= 1
    return None


@dataclass(slots=True)
class _SpeakerState:
    words_shown: int = 0
    utterance: int | None = None
    base: int = 0
    """Words of the same utterance in earlier captions (a caption cut short)."""
    last_utterance: int | None = None
    last_words: int = 0


@dataclass(slots=True)
class WordLatency:
    """Per-speaker caption state -> latencies. One owner (the emulator's loop).

    A caption's utterance is the newest one whose talk had started when its
    first word arrived; each word's packet is then known from the map."""

    word_map: WordMap
    latencies: list[float] = field(default_factory=list)
    max_samples: int = 200_000
    unmatched: int = 0
    """New words with no packet to match (more words than the map, forgotten)."""
    early: int = 0
    """Words that arrived before their predicted packet was sent (the map is off)."""
    finals: int = 0
    partials: int = 0
    samples_dropped: int = 0
    _speakers: dict[str, _SpeakerState] = field(default_factory=dict)

    def forget(self, speaker: str) -> None:
        self._speakers.pop(speaker, None)

    def on_transcript(
        self, speaker: str, text: str, *, final: bool, arrived: float, log: PacketTimes, offset: int
    ) -> int:
        """Account one transcript message; returns how many latencies it added."""
        state = self._speakers.setdefault(speaker, _SpeakerState())
        count = len(text.split())
        period = self.word_map.period
        if final:
            self.finals += 1
        else:
            self.partials += 1
        if count > state.words_shown and state.utterance is None:
            state.utterance = current_utterance(log, offset, period, arrived)
        added = 0
        for k in range(state.words_shown, count):
            if state.utterance is None:
                self.unmatched += 1
                continue
            words = self.word_map.words(state.utterance)
            if k >= len(words):
                self.unmatched += 1
                continue
            index = first_talk_index(offset, period) + state.utterance * period + words[k]
            sent_at = log.time_of(index)
            if sent_at is None or sent_at > arrived:
                if sent_at is None and index < log.sent:
                    self.unmatched += 1
                else:
                    self.early += 1
                continue
            self._add(arrived - sent_at)
            added += 1
        if final:
            if state.utterance is not None:
                state.last_utterance = state.utterance
                state.last_words = state.base + count
            state.words_shown = 0
            state.utterance = None
        else:
            state.words_shown = max(state.words_shown, count)
        return added

    def on_turn_transcript(
        self,
        speaker: str,
        text: str,
        *,
        final: bool,
        arrived: float,
        log: PacketTimes,
        onsets: Sequence[int],
        unmeasured: Collection[int] = (),
    ) -> int:
        """The same for a stream whose utterances start at any packet
        (``onsets``: packet indexes of utterance starts, oldest first): word k
        of an utterance completes ``word_map.words(0)[k]`` packets after its
        onset. Unmatched: a word the map puts after the next onset, a word of
        an utterance in ``unmeasured`` (one that followed its previous one too
        closely for the map to hold), and a word that arrives in a caption
        begun in an earlier utterance once a newer one has started (the
        service joined two utterances into one caption: whose word it is
        cannot be told). A caption the service cut short (at its longest
        caption length) is continued by the next one: its words count on."""
        state = self._speakers.setdefault(speaker, _SpeakerState())
        count = len(text.split())
        if final:
            self.finals += 1
        else:
            self.partials += 1
        if count > state.words_shown and state.utterance is None:
            state.utterance = newest_onset(log, onsets, arrived)
            same = state.utterance is not None and state.utterance == state.last_utterance
            state.base = state.last_words if same else 0
        added = 0
        words = self.word_map.words(0)
        joined = state.utterance is not None and newest_onset(log, onsets, arrived) != state.utterance
        for k in range(state.words_shown, count):
            onset = state.utterance
            if onset is None or state.base + k >= len(words) or onset in unmeasured or joined:
                self.unmatched += 1
                continue
            index = onset + words[state.base + k]
            later = [o for o in onsets if o > onset]
            if later and index >= later[0]:
                self.unmatched += 1
                continue
            sent_at = log.time_of(index)
            if sent_at is None or sent_at > arrived:
                self.early += 1
                continue
            self._add(arrived - sent_at)
            added += 1
        if final:
            if state.utterance is not None:
                state.last_utterance = state.utterance
                state.last_words = state.base + count
            state.words_shown = 0
            state.utterance = None
        else:
            state.words_shown = max(state.words_shown, count)
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


def newest_onset(log: PacketTimes, onsets: Sequence[int], arrived: float) -> int | None:
    """The newest utterance onset (packet index) sent no later than ``arrived``."""
    for onset in reversed(onsets):
        sent_at = log.time_of(onset)
        if sent_at is None:
            return None
        if sent_at <= arrived:
            return onset
    return None


def word_map_from_events(period: int, first_talk: int, events: Sequence[tuple[str, int]]) -> WordMap:
    """Build the map from an offline run that started in the pause, with
    its first talk packet at index ``first_talk``: ``events`` are ("word",
    packet index) in order (the packet after which the word came out). The
    shortest repeating cycle of per-utterance word positions is kept."""
    loops: dict[int, list[int]] = {}
    for kind, index in events:
        if kind != "word" or index < first_talk:
            continue
        loop, position = divmod(index - first_talk, period)
        loops.setdefault(loop, []).append(position)
    if not loops:
        raise ValueError("the offline run produced no words")
    count = max(loops) + 1
    utterances = [tuple(loops.get(loop, ())) for loop in range(count)]
    # the last loop may be cut short by the end of the run: leave it out
    if count > 1:
        utterances = utterances[:-1]
    for cycle in range(1, len(utterances) // 2 + 1):
        if all(utterances[i] == utterances[i + cycle] for i in range(len(utterances) - cycle)):
            return WordMap(period, tuple(utterances[:cycle]))
    return WordMap(period, tuple(utterances))
