"""The packet-path microbenchmark measures the service's real path: every
packet takes the fast path and becomes audio (counts, never times)."""

from __future__ import annotations

import pytest
from bench import packet_path

from live_transcription.audio.pipeline import GateConfig


def test_every_voiced_packet_takes_the_fast_path_into_frames() -> None:
    packets = packet_path.voiced_packets(400)
    microseconds, frames = packet_path.whole_path(packets)
    # 20 ms packets in 80 ms frames, after the 240 ms pre-roll the audio path
    # puts before the first word (silence here: nothing came before it)
    assert frames == 400 // 4 + GateConfig().preroll_ms // 80
    assert microseconds > 0


def test_a_packet_that_leaves_the_fast_path_fails_the_measurement() -> None:
    packets = packet_path.voiced_packets(10)
    packets[3] = packets[3][:2] + bytes(10)  # not RTP of the audio payload type: goes elsewhere
    with pytest.raises(AssertionError):
        packet_path.whole_path(packets)


def test_reference_parts_run_on_the_same_packets() -> None:
    packets = packet_path.voiced_packets(50)
    assert packet_path.unprotect_only(packets) > 0
    assert packet_path.decode_only(packets) > 0
