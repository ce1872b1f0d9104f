"""The benchmark report: figures against the targets, from a results dict."""

from __future__ import annotations

import math
from typing import Any

import pytest
from bench.report import cpu_per_speaker, markdown, rss_slope


def _window(n: int, rss: float, cpu: float, p99: float = 5.0, dropped: float = 0.0) -> dict[str, Any]:
    return {
        "n": n,
        "kind": "active",
        "rss_mb": rss,
        "cpu_percent": cpu,
        "generator_cpu_percent": cpu / 2,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": p99},
        "service_latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
        "words": 10 * n,
        "frames_dropped": dropped,
        "connected": n,
        "ticker_lag_max_ms": 1.0,
    }


RESULTS: dict[str, Any] = {
    "command": "python -m bench.run",
    "date": "today",
    "revision": "abc",
    "machine": {"nproc": 2, "cpu": "test"},
    "pattern": {"talk_ms": 3000, "pause_ms": 1500},
    "word_map": {"period": 225, "utterances": [[1, 2], [3]]},
    "active": {
        "windows": [
            _window(0, 100.0, 0.2),
            _window(100, 200.0, 40.0, p99=20.0),
            _window(200, 300.0, 90.0, p99=80.0, dropped=3),
        ]
    },
    "silent": {"windows": [_window(0, 100.0, 0.1), _window(100, 110.0, 10.0)]},
    "churn": {
        "speaker_cycles": {"connected": 1000, "not_connected": 0},
        "speaker_seconds": 100,
        "room_cycles": 100,
        "room_failures": 0,
        "room_seconds": 50,
        "rss_before_mb": 150.0,
        "rss_after_mb": 152.0,
        "rss_growth_mb": 2.0,
        "health_end": {"rooms": 0, "speakers": 0, "targets": 0},
        "speakers_started": 1000,
        "speakers_ended": 1000,
        "rooms_opened": 100,
        "rooms_closed": 100,
        "live_speakers_metric": 0,
        "live_rooms_metric": 0,
        "generator_subscriptions_left": 0,
        "objects_before": {"peer_connections": 0, "tasks": 20},
        "objects_end": {"peer_connections": 0, "tasks": 12},
    },
    "soak": {
        "speakers": 50,
        "minutes": 2.0,
        "cpu_percent": 20.0,
        "generator_cpu_percent": 15.0,
        "rss_start_mb": 120.0,
        "rss_end_mb": 120.5,
        "rss_slope_mb_per_hour": 0.1,
        "latency_ms": {"p50": 5.0, "p95": 9.0, "p99": 12.0},
        "frames_dropped": 0,
        "samples": [
            {"minutes": 1.0, "rss_mb": 120.1, "cpu_percent": 20.0, "rooms": 5, "speakers": 50}
            | {"peer_connections": 50, "tasks": 260},
            {"minutes": 2.0, "rss_mb": 120.5, "cpu_percent": 20.0, "rooms": 5, "speakers": 50}
            | {"peer_connections": 50, "tasks": 260},
        ],
    },
    "reference_start": {"whole_path_us": 26.0, "opus_decode_us": 19.0, "srtp_unprotect_us": 1.0}
    | {"python_path_us": 6.0},
    "reference_end": {"error": "RuntimeError('x')"},
}


def test_rss_slope_and_cpu_per_speaker() -> None:
    windows = RESULTS["active"]["windows"]
    assert rss_slope(windows, 100) == pytest.approx(1.0)
    assert rss_slope(windows, 200) == pytest.approx(1.0)
    assert math.isnan(rss_slope(windows[:1], 100))
    per, above_idle = cpu_per_speaker(windows[1], windows[0])
    assert per == pytest.approx(0.4)
    assert above_idle == pytest.approx(0.398)


def test_markdown_states_each_figure_against_its_target() -> None:
    text = markdown(RESULTS, {"rss_active": "img/rss_active.png"})
    assert "| memory per active speaker (RSS slope N=0..100) | 1.00 MB | <= 3 MB | met |" in text
    # N=200 dropped frames: past capacity, its lower per-speaker CPU is no figure
    assert "CPU per active speaker (N=100, the largest N within capacity) | 0.400 %" in text
    assert "**not met**" in text  # 0.4 % per active speaker is fine, 0.1 % per silent one is not
    assert "CPU per silent participant (N=100) | 0.100 %" in text
    assert "(packet sent -> transcript at HPB) | 20.0 ms | < 50 ms | met |" in text
    assert "N = 100" in text  # capacity: N=200 dropped frames
    assert "churn (10 at once, 1000 of 1,000 connected): rooms / speakers / peer connections left" in text
    assert "connected): rooms / speakers / peer connections left | 0 / 0 / 0 | 0 / 0 / 0 | met |" in text
    assert "every room closed at the end | 0 / 0 |" in text  # peer connections in memory
    assert "| 2.0 | 120.5 | 20.0 | 5 | 50 | 50 | 260 |" in text  # a soak sample with live objects
    assert "receive path 26.0 us of CPU (Opus decode 19.0, SRTP 1.0, Python 6.0)" in text
    assert "machine speed at the end: `bench.packet_path` failed" in text
    assert "![rss_active](img/rss_active.png)" in text
    assert "2/1 words per utterance" in text


def test_windows_with_a_stalled_generator_or_missing_streams_are_not_figures() -> None:
    from bench.report import valid

    assert valid(_window(100, 1.0, 1.0) | {"seconds": 30.0, "ticker_skipped": 10})
    assert not valid(_window(100, 1.0, 1.0) | {"seconds": 30.0, "ticker_skipped": 2544})
    assert not valid(_window(200, 1.0, 1.0) | {"connected": 112})
