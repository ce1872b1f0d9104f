"""Reconnect bookkeeping: server time -> stream time, duplicate detection."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from live_transcription.clock import ManualClock
from live_transcription.stt.base import FRAME_SECONDS, Word
from live_transcription.stt.replay import ConnectionTimeline, ReplayDeduper


def test_timeline_maps_server_frames_to_stream_frames_skipping_padding() -> None:
    timeline = ConnectionTimeline()
    for index in range(10, 15):  # a replay that starts at stream frame 10
        timeline.record_audio(index)
    timeline.record_padding(15, 13)  # flush silence is not stream time
    for index in range(15, 18):
        timeline.record_audio(index)
    assert timeline.stream_frame_at(0) == 10
    assert timeline.stream_frame_at(3) == 13
    assert timeline.stream_frame_at(7) == 15  # inside the padding
    assert timeline.stream_frame_at(18) == 15
    assert timeline.stream_frame_at(19) == 16
    assert timeline.stream_time_at(19 * FRAME_SECONDS) == 16 * FRAME_SECONDS
    assert timeline.server_frames == 21


def test_timed_words_are_deduplicated_by_start() -> None:
    dedupe = ReplayDeduper()
    first = [Word(t, audio_start=s) for t, s in (("a", 0.0), ("b", 0.4), ("c", 0.8))]
    assert all(dedupe.accept(word) for word in first)
    dedupe.start_replay(0.0)
    again = [Word(t, audio_start=s) for t, s in (("a", 0.0), ("b", 0.4), ("c", 0.8), ("d", 1.2))]
    assert [dedupe.accept(word) for word in again] == [False, False, False, True]
    assert dedupe.duplicates_dropped == 3


def test_untimed_words_are_matched_in_order() -> None:
    dedupe = ReplayDeduper()
    for text, end in (("one", 0.3), ("two", 0.6), ("three", 0.9)):
        assert dedupe.accept(Word(text, audio_end=end))
    dedupe.start_replay(0.5)  # 'one' ended before the replayed audio
    assert not dedupe.accept(Word("Two,", audio_end=0.6))
    assert not dedupe.accept(Word("three", audio_end=0.9))
    assert dedupe.accept(Word("three", audio_end=1.2))  # said again: a new word
    assert not dedupe.replaying


def test_a_pause_forgets_everything() -> None:
    dedupe = ReplayDeduper()
    dedupe.accept(Word("one", audio_end=0.3))
    dedupe.acknowledge_all()
    dedupe.start_replay(0.0)
    assert dedupe.accept(Word("one", audio_end=0.3))


@given(
    st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=20),
    st.integers(min_value=0, max_value=20),
)
def test_replaying_a_suffix_delivers_each_word_once(spoken: list[str], cut: int) -> None:
    """The server re-recognises the replayed suffix, then goes on with new words:
    the deliveries are exactly the spoken words."""
    cut = min(cut, len(spoken))
    dedupe = ReplayDeduper()
    delivered = [w for i, w in enumerate(spoken[:cut]) if dedupe.accept(Word(w, audio_end=i))]
    replay_from = max(0, cut - 3)
    dedupe.start_replay(replay_from)
    for i, w in enumerate(spoken[replay_from:], start=replay_from):
        if dedupe.accept(Word(w, audio_end=i)):
            delivered.append(w)
    assert delivered == spoken


def test_manual_clock_fires_timers_in_order() -> None:
    clock = ManualClock(start=0.0)
    fired: list[str] = []
    clock.call_later(2.0, lambda: fired.append("late"))
    clock.call_later(1.0, lambda: fired.append("early"))
    cancelled = clock.call_later(1.5, lambda: fired.append("never"))
    cancelled.cancel()
    clock.skip(1.0)
    assert fired == ["early"]
    clock.skip(5.0)
    assert fired == ["early", "late"]
    assert clock.now() == 6.0
