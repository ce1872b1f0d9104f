"""What one speaker adds to the metrics: its audio path's counters and the
time its audio was received. Added in steps (at speech ends, now and then
while the speaker is silent, and at its end), never per packet."""

from __future__ import annotations

from collections.abc import Mapping

from live_transcription import metrics
from live_transcription.clock import Clock

PACKET_KINDS = {
    "packets_in": "received",
    "packets_silent": "silent",
    "packets_decoded": "decoded",
    "packets_lost": "lost",
    "packets_late": "late",
    "packets_concealed": "concealed",
    "decode_errors": "decode-error",
    "packets_skipped": "skipped",
}


class SpeakerReport:
    """Remembers what was already added, so each report adds only the change."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._reported: dict[str, int] = {}
        self._stream_drops = 0
        self._receiving_since: float | None = None

    def start_receiving(self) -> None:
        """The speaker's audio flows from now on (the offer is answered)."""
        self._receiving_since = self._clock.now()

    def new_stream(self) -> None:
        """A new STT stream starts counting its drops from zero."""
        self._stream_drops = 0

    def report(
        self, counters: Mapping[str, int], frames_without_stream: int, stream_drops: int | None
    ) -> None:
        for name, value in counters.items():
            kind = PACKET_KINDS.get(name)
            if kind is not None and value != self._reported.get(name, 0):
                metrics.audio_packets.labels(kind).inc(value - self._reported.get(name, 0))
                self._reported[name] = value
        if frames_without_stream != self._reported.get("no-stream", 0):
            metrics.audio_frames_dropped.labels("no-stream").inc(
                frames_without_stream - self._reported.get("no-stream", 0)
            )
            self._reported["no-stream"] = frames_without_stream
        if stream_drops is not None and stream_drops != self._stream_drops:
            metrics.audio_frames_dropped.labels("stt-behind").inc(stream_drops - self._stream_drops)
            self._stream_drops = stream_drops
        since = self._receiving_since
        if since is not None:
            now = self._clock.now()
            if now > since:
                metrics.participant_audio_seconds.inc(now - since)
            self._receiving_since = now

    def stop_receiving(self) -> None:
        self._receiving_since = None
