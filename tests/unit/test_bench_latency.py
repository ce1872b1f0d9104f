"""Word latency matching, send logs, talk patterns and the harness' metric parsing."""

from __future__ import annotations

import math

import pytest
from bench.analysis import (
    by_label,
    diff,
    histogram_buckets,
    histogram_quantile,
    parse_collapsed,
    parse_metrics,
    top_inclusive,
    top_self,
    total,
)
from bench.latency import (
    SendLog,
    WordLatency,
    WordMap,
    current_utterance,
    first_talk_index,
    word_map_from_events,
)
from bench.patterns import SILENT_LEVEL, audio_level, build_pattern

PERIOD = 10


def _log(times: list[float], capacity: int = 64) -> SendLog:
    log = SendLog(capacity)
    for when in times:
        log.record(when)
    return log


def test_send_log_forgets_beyond_its_capacity() -> None:
    log = _log([float(i) for i in range(10)], capacity=4)
    assert log.sent == 10
    assert log.time_of(9) == 9.0
    assert log.time_of(6) == 6.0
    assert log.time_of(5) is None  # forgotten
    assert log.time_of(10) is None  # not sent yet
    assert log.time_of(-1) is None


def test_the_current_utterance_is_the_newest_talk_start_sent() -> None:
    # packet i sent at time i; the stream started at pattern position 6:
    # talk (position 0) starts at indices 4, 14, 24
    log = _log([float(i) for i in range(30)])
    assert first_talk_index(6, PERIOD) == 4
    assert first_talk_index(0, PERIOD) == 0
    assert current_utterance(log, 6, PERIOD, arrived=15.0) == 1
    assert current_utterance(log, 6, PERIOD, arrived=29.5) == 2
    assert current_utterance(log, 6, PERIOD, arrived=3.0) is None


def test_each_new_word_of_a_partial_gets_one_latency() -> None:
    log = _log([float(i) for i in range(25)])
    latency = WordLatency(WordMap(PERIOD, ((2, 4, 6),)))
    # utterance 1 starts at index 10: words 1 and 2 end at indices 12 and 14
    added = latency.on_transcript("s", "w1 w2", final=False, arrived=14.25, log=log, offset=0)
    assert added == 2
    assert latency.latencies == pytest.approx([2.25, 0.25])
    # the same words again add nothing; a third word adds one
    assert latency.on_transcript("s", "w1 w2", final=False, arrived=15.0, log=log, offset=0) == 0
    assert latency.on_transcript("s", "w1 w2 w3", final=False, arrived=16.5, log=log, offset=0) == 1
    assert latency.latencies[-1] == pytest.approx(0.5)
    # the final closes the utterance; the next one starts from word 1
    assert latency.on_transcript("s", "w1 w2 w3", final=True, arrived=17.0, log=log, offset=0) == 0
    assert latency.on_transcript("s", "w4", final=False, arrived=22.5, log=log, offset=0) == 1
    assert latency.latencies[-1] == pytest.approx(0.5)
    assert (latency.partials, latency.finals, latency.unmatched, latency.early) == (4, 1, 0, 0)


def test_engine_state_across_utterances_is_followed() -> None:
    log = _log([float(i) for i in range(40)])
    latency = WordLatency(WordMap(PERIOD, ((3,), (5,))))
    assert latency.on_transcript("s", "a", final=False, arrived=3.5, log=log, offset=0) == 1
    latency.on_transcript("s", "a", final=True, arrived=9.0, log=log, offset=0)
    assert latency.on_transcript("s", "b", final=False, arrived=15.25, log=log, offset=0) == 1
    latency.on_transcript("s", "b", final=True, arrived=19.0, log=log, offset=0)
    assert latency.on_transcript("s", "c", final=False, arrived=23.5, log=log, offset=0) == 1
    assert latency.latencies == pytest.approx([0.5, 0.25, 0.5])


def test_words_beyond_the_map_or_before_their_packet_are_counted() -> None:
    latency = WordLatency(WordMap(PERIOD, ((2,),)))
    log = _log([float(i) for i in range(12)])
    assert latency.on_transcript("s", "a b", final=False, arrived=11.5, log=log, offset=0) == 0
    # utterance 1 (index 10): word 1 predicted at index 12, not sent yet
    assert (latency.early, latency.unmatched) == (1, 1)
    before_talk = WordLatency(WordMap(PERIOD, ((2,),)))
    assert before_talk.on_transcript("s", "a", final=False, arrived=0.5, log=_log([0.0]), offset=5) == 0
    assert before_talk.unmatched == 1
    assert latency.take() == [] and latency.latencies == []


def test_word_map_finds_the_cycle_of_utterances() -> None:
    # first talk at index 5; loops of 10: words at positions (1, 3), (2,), (1, 3), (2,), cut
    events = [("word", 6), ("word", 8), ("pause", 9), ("word", 17), ("word", 26), ("word", 28)]
    events += [("word", 37), ("word", 46)]
    assert word_map_from_events(PERIOD, 5, events) == WordMap(PERIOD, ((1, 3), (2,)))
    steady = [("word", 5 + 10 * loop + 4) for loop in range(5)]
    assert word_map_from_events(PERIOD, 5, steady) == WordMap(PERIOD, ((4,),))
    with pytest.raises(ValueError):
        word_map_from_events(PERIOD, 5, [("pause", 3), ("word", 2)])


def test_audio_levels_follow_rfc_6465() -> None:
    import numpy as np

    assert audio_level(np.zeros(960, dtype=np.float32)) == SILENT_LEVEL
    assert audio_level(np.ones(960, dtype=np.float32)) == 0
    assert audio_level(np.full(960, 0.1, dtype=np.float32)) == 20
    assert audio_level(np.zeros(0, dtype=np.float32)) == SILENT_LEVEL


def test_a_pattern_talks_then_pauses() -> None:
    pattern = build_pattern(400, 600, seed=3)
    assert pattern.period == 50 and pattern.talk_packets == 20 and pattern.pause_packets == 30
    assert max(pattern.levels[:20]) < 50 < min(pattern.levels[20:])
    silent = build_pattern(0, 200)
    assert silent.talk_packets == 0 and min(silent.levels) > 50
    with pytest.raises(ValueError):
        build_pattern(30, 0)


METRICS = """# HELP live_transcription_audio_frames_dropped_total x
# TYPE live_transcription_audio_frames_dropped_total counter
live_transcription_audio_frames_dropped_total{reason="stt_behind"} 3.0
live_transcription_audio_frames_dropped_total{reason="late"} 2.0
# HELP live_transcription_caption_latency_seconds x
# TYPE live_transcription_caption_latency_seconds histogram
live_transcription_caption_latency_seconds_bucket{le="0.01"} 50.0
live_transcription_caption_latency_seconds_bucket{le="0.05"} 90.0
live_transcription_caption_latency_seconds_bucket{le="0.1"} 100.0
live_transcription_caption_latency_seconds_bucket{le="+Inf"} 100.0
live_transcription_caption_latency_seconds_count 100.0
live_transcription_caption_latency_seconds_sum 2.0
"""


def test_metrics_totals_labels_and_differences() -> None:
    scrape = parse_metrics(METRICS)
    assert total(scrape, "live_transcription_audio_frames_dropped_total") == 5.0
    assert total(scrape, "live_transcription_audio_frames_dropped_total", reason="late") == 2.0
    assert by_label(scrape, "live_transcription_audio_frames_dropped_total", "reason") == {
        "stt_behind": 3.0,
        "late": 2.0,
    }
    assert total(diff(scrape, scrape), "live_transcription_audio_frames_dropped_total") == 0.0


def test_histogram_quantiles_interpolate_like_prometheus() -> None:
    buckets = histogram_buckets(parse_metrics(METRICS), "live_transcription_caption_latency_seconds")
    assert buckets[-1] == (math.inf, 100.0)
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.01)
    assert histogram_quantile(buckets, 0.7) == pytest.approx(0.03)
    assert histogram_quantile(buckets, 0.95) == pytest.approx(0.075)
    assert math.isnan(histogram_quantile([], 0.5))
    assert histogram_quantile([(0.1, 1.0), (math.inf, 10.0)], 0.99) == 0.1


def test_collapsed_stacks_rank_self_and_inclusive_time() -> None:
    lines = [
        "main (a.py:1);loop (a.py:2);decode (b.py:3) 60",
        "main (a.py:1);loop (a.py:2);send (c.py:4) 30",
        "main (a.py:1);idle (a.py:9) 10",
        "garbage line",
        "",
    ]
    stacks = parse_collapsed(lines, by_function=False)
    assert sum(stacks.values()) == 100
    leaves = top_self(stacks)
    assert [(e.function, e.share) for e in leaves] == [
        ("decode (b.py:3)", 0.6),
        ("send (c.py:4)", 0.3),
        ("idle (a.py:9)", 0.1),
    ]
    inclusive = {e.function: e.share for e in top_inclusive(stacks)}
    assert inclusive["main (a.py:1)"] == 1.0
    assert inclusive["loop (a.py:2)"] == 0.9
    merged = parse_collapsed(["f (a.py:1);g (b.py:2) 3", "f (a.py:1);g (b.py:7) 4"])
    assert [(e.function, e.share) for e in top_self(merged)] == [("g (b.py)", 1.0)]


def test_turn_transcripts_are_matched_from_each_utterance_onset() -> None:
    latency = WordLatency(WordMap(PERIOD, ((2, 5),)))
    log = _log([float(i) for i in range(40)])
    onsets = [3, 20]
    # the second utterance (onset 20): word 1 completes at packet 22, word 2 at 25
    added = latency.on_turn_transcript("s", "a", final=False, arrived=22.5, log=log, onsets=onsets)
    added += latency.on_turn_transcript("s", "a b", final=True, arrived=26.0, log=log, onsets=onsets)
    assert added == 2
    assert latency.take() == [pytest.approx(0.5), pytest.approx(1.0)]
    # a word the map puts beyond the next onset, and one of an unmeasured utterance
    latency.on_turn_transcript("s", "a b c", final=True, arrived=19.0, log=log, onsets=onsets)
    latency.on_turn_transcript("s", "a", final=True, arrived=23.0, log=log, onsets=onsets, unmeasured={20})
    assert latency.take() == [pytest.approx(14.0), pytest.approx(11.0)]
    assert latency.unmatched == 2


def test_a_caption_that_runs_into_the_next_utterance_gets_no_latency_for_its_later_words() -> None:
    latency = WordLatency(WordMap(PERIOD, ((2, 5),)))
    log = _log([float(i) for i in range(40)])
    onsets = [3, 20]
    assert latency.on_turn_transcript("s", "a", final=False, arrived=6.0, log=log, onsets=onsets) == 1
    # the next word comes once utterance 2 has started: it may be either's
    assert latency.on_turn_transcript("s", "a b", final=True, arrived=21.0, log=log, onsets=onsets) == 0
    assert latency.unmatched == 1


def test_a_caption_cut_short_inside_an_utterance_is_continued_by_the_next() -> None:
    latency = WordLatency(WordMap(PERIOD, ((2, 5, 8),)))
    log = _log([float(i) for i in range(40)])
    onsets = [3]
    # the service ends a long caption after two words; the third word opens a new one
    assert latency.on_turn_transcript("s", "a b", final=True, arrived=9.0, log=log, onsets=onsets) == 2
    assert latency.on_turn_transcript("s", "c", final=True, arrived=12.0, log=log, onsets=onsets) == 1
    assert latency.take() == [pytest.approx(4.0), pytest.approx(1.0), pytest.approx(1.0)]
