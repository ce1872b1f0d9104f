"""One received Opus RTP packet, as the media path hands it to the audio path.

Plain data with no aiortc types in it, so the audio code and its tests never
touch the WebRTC stack.
"""

from __future__ import annotations


class OpusRtp:
    """An Opus payload with the RTP facts the audio path needs.

    ``audio_level`` is the RFC 6464 level in -dBov (0 = loudest, 127 =
    silence) when the sender included the ``ssrc-audio-level`` extension,
    else None. ``arrival_time`` is seconds on the receiver's monotonic clock.
    """

    __slots__ = ("arrival_time", "audio_level", "payload", "sequence_number", "ssrc", "timestamp")

    def __init__(
        self,
        payload: bytes,
        sequence_number: int,
        timestamp: int,
        *,
        audio_level: int | None = None,
        arrival_time: float = 0.0,
        ssrc: int = 0,
    ) -> None:
        self.payload = payload
        self.sequence_number = sequence_number
        self.timestamp = timestamp
        self.audio_level = audio_level
        self.arrival_time = arrival_time
        self.ssrc = ssrc

    def __repr__(self) -> str:
        return (
            f"OpusRtp(seq={self.sequence_number}, ts={self.timestamp}, "
            f"level={self.audio_level}, bytes={len(self.payload)}, ssrc={self.ssrc})"
        )
