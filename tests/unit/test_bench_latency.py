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
from bench.latency import SendLog, WordLatency, WordMap, packet_index_for, word_map_from_events
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


def test_newest_packet_at_a_position_sent_before_arrival() -> None:
    # packet i sent at time i; the stream started at pattern position 3
    log = _log([float(i) for i in range(35)])
    # position 5 is at indices 2, 12, 22, 32
    assert packet_index_for(log, 3, PERIOD, 5, arrived=33.0) == 32
    assert packet_index_for(log, 3, PERIOD, 5, arrived=31.5) == 22
    assert packet_index_for(log, 3, PERIOD, 5, arrived=1.0) is None
    # position 2 -> indices 9, 19, 29
    assert packet_index_for(log, 3, PERIOD, 2, arrived=100.0) == 29


def test_each_new_word_of_a_partial_gets_one_latency() -> None:
    log = _log([float(i) for i in range(25)])
    latency = WordLatency(WordMap(PERIOD, (2, 4, 6)))
    # words 1 and 2 of the utterance end at positions 2 and 4: indices 12 and 14 (offset 0)
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
    assert (latency.partials, latency.finals, latency.unmatched) == (4, 1, 0)


def test_words_beyond_the_map_or_before_any_packet_are_unmatched() -> None:
    latency = WordLatency(WordMap(PERIOD, (2,)))
    log = _log([0.0, 1.0])
    assert latency.on_transcript("s", "a b", final=False, arrived=5.0, log=log, offset=0) == 0
    assert latency.unmatched == 2
    taken = latency.take()
    assert taken == [] and latency.latencies == []


def test_word_map_uses_the_last_complete_utterance() -> None:
    events = [("word", 3), ("pause", 9), ("word", 12), ("word", 14), ("pause", 18), ("word", 22)]
    assert word_map_from_events(PERIOD, events) == WordMap(PERIOD, (2, 4))
    with pytest.raises(ValueError):
        word_map_from_events(PERIOD, [("pause", 3)])


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
    stacks = parse_collapsed(lines)
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
