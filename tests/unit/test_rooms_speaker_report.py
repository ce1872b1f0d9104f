"""A speaker's metrics are added in steps, each adding only what changed."""

from __future__ import annotations

from prometheus_client import REGISTRY

from live_transcription.clock import ManualClock
from live_transcription.rooms.speaker_report import SpeakerReport


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


PARTICIPANT = "live_transcription_participant_audio_seconds_total"
RECEIVED = ("live_transcription_audio_packets_total", {"kind": "received"})
BEHIND = ("live_transcription_audio_frames_dropped_total", {"reason": "stt-behind"})


def test_received_time_is_added_at_each_report_from_the_answer_on() -> None:
    clock = ManualClock()
    report = SpeakerReport(clock)
    before = sample(PARTICIPANT)
    clock.skip(5.0)
    report.report({}, 0, None)  # not receiving yet: nothing
    assert sample(PARTICIPANT) == before
    report.start_receiving()
    clock.skip(2.5)
    report.report({}, 0, None)
    clock.skip(1.5)
    report.report({}, 0, None)
    assert sample(PARTICIPANT) - before == 4.0
    report.stop_receiving()
    clock.skip(10.0)
    report.report({}, 0, None)
    assert sample(PARTICIPANT) - before == 4.0


def test_counters_add_only_the_change_and_stream_drops_restart_per_stream() -> None:
    report = SpeakerReport(ManualClock())
    received, behind = sample(*RECEIVED), sample(*BEHIND)
    report.report({"packets_in": 10}, 0, 2)
    report.report({"packets_in": 25}, 0, 3)
    assert sample(*RECEIVED) - received == 25
    assert sample(*BEHIND) - behind == 3
    report.new_stream()
    report.report({"packets_in": 25}, 0, 1)
    assert sample(*BEHIND) - behind == 4
