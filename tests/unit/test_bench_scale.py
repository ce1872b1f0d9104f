"""The scale-out figures of the benchmark: capacity, fail-over and their report."""

from __future__ import annotations

import math
from typing import Any

from bench import scale
from bench.run import merge_scale


def _window(n: int, p99: float, *, dropped: float = 0.0, connected: int | None = None) -> dict[str, Any]:
    return {
        "n": n,
        "latency_ms": {"p50": 10.0, "p99": p99},
        "frames_dropped": dropped,
        "connected": n if connected is None else connected,
        "cpu_percent": n * 0.5,
    }


def test_capacity_is_the_last_step_before_the_first_miss() -> None:
    windows = [_window(0, math.nan), _window(50, 20), _window(100, 60), _window(150, 130), _window(200, 40)]
    assert scale.capacity(windows) == (100, "N=150: p99 130 ms")


def test_dropped_audio_or_a_missing_stream_is_past_capacity() -> None:
    assert scale.capacity([_window(50, 20), _window(100, 30, dropped=3)]) == (50, "N=100: 3 frames dropped")
    assert scale.capacity([_window(50, 20, connected=49)]) == (0, "N=50: 49 of 50 streams connected")
    assert scale.capacity([_window(50, math.nan)]) == (0, "N=50: no words measured")
    assert scale.capacity([_window(50, 20), _window(100, 99.9)]) == (100, "")


def test_resume_times_split_kept_interrupted_and_never() -> None:
    times = scale.resume_times(
        100.0, {"r1": 100.4, "r2": 101.9, "r3": 104.0, "r4": 118.5}, ["r1", "r2", "r3", "r4", "r5"]
    )
    assert times == {"r1": 0.4000000000000057, "r2": 1.9000000000000057, "r3": 4.0, "r4": 18.5, "r5": None}
    summary = scale.resume_summary(times)
    assert summary == {
        "rooms": 5,
        "kept": 2,
        "interrupted": 2,
        "never_resumed": 1,
        "interrupted_median_s": 18.5,
        "interrupted_max_s": 18.5,
        "kept_max_s": 1.9,
    }


def test_section_reports_capacity_per_worker_count_and_each_fail_over() -> None:
    results = {
        "runs": {
            "active/modal/present": {"kind": "active", "windows": [_window(100, 30)]},
            "capacity/modal/present/w1": {
                "kind": "active",
                "workers": 1,
                "windows": [_window(50, 20), _window(100, 150)],
            },
            "capacity/modal/present/w2": {
                "kind": "active",
                "workers": 2,
                "windows": [_window(50, 20), _window(100, 30), _window(150, 80)],
            },
        },
        "failover": {
            "kill a worker process": {
                "description": "rooms on two workers",
                "summary": scale.resume_summary({"a": 0.5, "b": 3.2}),
                "deadline_s": 90.0,
            },
            "kill a replica": {"error": "RuntimeError('no nats-server')"},
        },
        "scale_commands": ["python -m bench.run --scenario capacity,failover"],
    }
    text = scale.section(results)
    assert "`python -m bench.run --scenario capacity,failover`" in text
    assert "| capacity/modal/present/w1 | 1 | 50 | 20.00 | 0.50 | 25.00 | N=100: p99 150 ms |" in text
    assert "| capacity/modal/present/w2 | 2 | 150 | 80.00 | 0.50 | 75.00 | no step missed |" in text
    assert "active/modal/present |" not in text  # single-process runs are not capacity runs
    assert "### Fail-over: kill a worker process" in text
    assert "| 2 | 1 (max gap 0.50 s) | 1 | 3.20 / 3.20 | 0 (90.00) |" in text
    assert "Failed: `RuntimeError('no nats-server')`" in text
    assert scale.section({"runs": {}}) == ""


def test_merge_brings_scale_runs_and_their_command_only() -> None:
    results: dict[str, Any] = {"runs": {"active/modal/present": {"kind": "active"}}, "command": "first"}
    other = {
        "command": "second",
        "runs": {
            "active/modal/present": {"kind": "active", "windows": ["other"]},
            "meeting/modal/present": {"kind": "meeting", "workers": 2},
        },
        "failover": {"kill a worker process": {"summary": {}}},
        "scale_commands": ["second"],
        "durations_s": {"meeting/modal/present": 300},
    }
    merge_scale(results, other)
    assert results["runs"] == {
        "active/modal/present": {"kind": "active"},
        "meeting/modal/present": {"kind": "meeting", "workers": 2},
    }
    assert results["failover"] == other["failover"]
    assert results["scale_commands"] == ["second"]
    assert results["durations_s"] == {"meeting/modal/present": 300}


def test_rooms_the_service_reopened_are_the_interrupted_ones_however_fast() -> None:
    before = {"r1": ["s-1"], "r2": ["s-2"], "r3": ["s-3"]}
    after = {"r1": ["s-1"], "r2": ["s-9"], "r3": ["s-3", "s-10"]}
    moved = scale.moved_rooms(before, after)
    assert moved == {"r2", "r3"}
    summary = scale.resume_summary({"r1": 3.0, "r2": 0.9, "r3": 1.4}, moved)
    assert (summary["kept"], summary["interrupted"]) == (1, 2)
    assert (summary["interrupted_median_s"], summary["interrupted_max_s"], summary["kept_max_s"]) == (
        1.4,
        1.4,
        3.0,
    )
