"""The production-path section of the report: figures from a window, the
targets, and rendering with and without the service's STT metrics."""

from __future__ import annotations

import math
from typing import Any

import pytest
from bench.production import figures, run_title, section, targets
from bench.report import markdown


def _window(n: int, **over: Any) -> dict[str, Any]:
    window: dict[str, Any] = {
        "n": n,
        "kind": "active",
        "seconds": 10.0,
        "cpu_percent": 0.3 * n + 1.0,
        "rss_mb": 120.0,
        "latency_ms": {"p50": 9.0, "p95": 12.0, "p99": 15.0},
        "service_latency_ms": {"p50": 5.0, "p95": 8.0, "p99": 30.0},
        "talk_seconds": 10.0 * n * 2 / 3,
        "utterances": 2 * n,
        "talking_max": n,
        "stt": {"audio_seconds": 10.0 * n, "open_max": n, "connections_opened": n},
        "stt_open_mean": float(n),
        "stt_busy_mean": float(n),
        "stt_cpu_percent": 3.0,
        "generator_cpu_percent": 8.0,
        "words_delivered": 30 * n,
        "words_while_silent": 0,
        "frames_dropped": 0.0,
        "connected": n,
        "ticker_skipped": 0,
        "engine": "modal",
        "levels": "present",
    }
    return window | over


def _run(kind: str = "active", levels: str = "present", **over: Any) -> dict[str, Any]:
    windows = [_window(0, stt={}), _window(100, kind=kind, levels=levels)]
    run: dict[str, Any] = {
        "kind": kind,
        "engine": "modal",
        "levels": levels,
        "windows": windows,
        "profile": {
            "n": 100,
            "samples": 1000,
            "stages": {"receive": 0.5, "decode": 0.25, "STT send/read": 0.25},
        },
        "words": {"stt_words": 3000, "delivered": 3000, "lost": 0, "while_silent": 0},
    }
    return run | over


def test_figures_turn_a_window_into_the_targets_terms() -> None:
    f = figures(_window(100), {"n": 100, "stages": {"receive": 0.5, "decode": 0.5}})
    assert f["cpu_per_participant"] == pytest.approx(0.31)
    assert f["talkers_mean"] == pytest.approx(100 * 2 / 3)
    assert f["cpu_per_talker"] == pytest.approx(31.0 / (100 * 2 / 3))
    assert f["stt_ratio"] == pytest.approx(1.0)  # every second of every participant streamed
    assert f["talk_share"] == pytest.approx(2 / 3)
    # allowed: talk + 0.3 s per utterance
    assert f["stt_over_allowed"] == pytest.approx(1000.0 / (1000 * 2 / 3 + 0.3 * 200))
    assert f["stages_per_participant"]["receive"] == pytest.approx(0.155)


def test_figures_of_an_empty_or_unmeasured_window_are_nan_not_errors() -> None:
    f = figures(_window(0, stt={}, talk_seconds=0.0))
    assert math.isnan(f["cpu_per_participant"])
    assert math.isnan(f["stt_ratio"])
    assert "stages_per_participant" not in f
    # a profile taken at another N is not applied
    assert "stages_per_participant" not in figures(_window(50), {"n": 100, "stages": {"receive": 1.0}})


def test_targets_say_met_or_not_met_per_figure() -> None:
    good = targets({"active/modal/present": _run()})
    assert "STT audio / (talk + 0.3 s per utterance)" in good
    assert "| words lost / misattributed | 0 / 0 | 0 / 0 | met |" in good
    # the burst pattern streams everything: the STT audio target is not met
    assert "| 1.38 | <= 1 | **not met** |" in good
    assert "added latency p99 ms | 15.0 | < 40 | met" in good
    slow = _run()
    slow["windows"][1]["latency_ms"]["p99"] = 45.0
    assert "added latency p99 ms | 45.0 | < 40 | **not met**" in targets({"a": slow})
    lossy = targets({"active/modal/present": _run(words={"lost": 2, "while_silent": 1})})
    assert "| 2 / 1 | 0 / 0 | **not met** |" in lossy


def test_a_window_whose_generator_fell_behind_is_marked_invalid() -> None:
    run = _run()
    assert "| yes |" in section({"runs": {"a": run}})
    run["windows"][1]["ticker_skipped"] = 10_000
    assert "| **no** |" in section({"runs": {"a": run}})
    assert "a N=100 (invalid window)" in targets({"a": run})


def test_a_silent_run_shows_its_stt_audio_share_not_the_talk_allowance() -> None:
    run = _run(kind="silent")
    run["windows"][1] |= {"talk_seconds": 0.0, "utterances": 0, "stt": {"audio_seconds": 0.0}}
    text = targets({"silent/modal/present": run})
    assert "STT audio / participant audio (nobody talks) | 0.000 | ~0 |" in text
    assert "CPU % per silent participant | 0.310 | <= 0.04 | **not met**" in text


def test_targets_use_the_level_dependent_cpu_budget() -> None:
    present = targets({"a": _run(levels="present")})
    absent = targets({"a": _run(levels="absent")})
    assert "<= 0.4 |" in present
    assert "<= 0.5 |" in absent


def test_instant_runs_are_labelled_a_lower_bound_and_kept_out_of_the_targets() -> None:
    instant = _run(engine="instant")
    assert "lower bound" in run_title("active/instant/present", instant)
    assert targets({"active/instant/present": instant}) == "No production-path run in these results."


def test_section_renders_every_run_and_says_when_the_service_has_no_stt_metrics() -> None:
    results = {
        "runs": {
            "active/modal/present": _run(),
            "meeting/modal/absent": _run(kind="meeting", levels="absent", rooms=[5, 12, 20]),
            "silent/moshi/present": {
                "kind": "silent",
                "engine": "moshi",
                "levels": "present",
                "error": "boom",
            },
        }
    }
    text = section(results)
    assert "active speakers, `modal` client over TLS to the fake STT, audio levels present" in text
    assert "meeting mix, `modal` client over TLS to the fake STT, audio levels absent" in text
    assert "Rooms: 3 (5-20 participants)" in text
    assert "Failed: `boom`" in text
    assert "CPU by stage at N = 100" in text
    assert "exported none of the STT pool metrics" in text
    assert "How these figures are taken" in text


def test_section_shows_the_service_stt_metrics_when_present() -> None:
    run = _run()
    run["windows"][1]["service_stt"] = {
        "audio_seconds": {"speech": 600.0, "flush": 50.0},
        "participant_audio_seconds": 1000.0,
    }
    text = section({"runs": {"active/modal/present": run}})
    assert "audio_seconds {'speech': 600.0, 'flush': 50.0}" in text
    assert "by these counters 0.650" in text


def test_the_whole_report_holds_the_production_section() -> None:
    results: dict[str, Any] = {
        "command": "python -m bench.run --engine modal",
        "date": "today",
        "revision": "abc",
        "machine": {"nproc": 2},
        "pattern": {"talk_ms": 3000, "pause_ms": 1500},
        "runs": {"active/modal/present": _run()},
    }
    text = markdown(results, {})
    assert "## Production path: against the targets" in text
    assert "python -m bench.run --engine modal" in text
