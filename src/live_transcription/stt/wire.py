"""What a remote STT server says, once parsed: the vocabulary shared by the
Modal and moshi-server protocol cores and the stream driver.

A protocol core (``WireProtocol``) is pure: it encodes audio and control
messages to bytes and parses server messages into these events. It never
raises on bad input: it returns ``Ignored`` with a reason, and the driver logs
it once per reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from live_transcription.stt.base import Frame


@dataclass(frozen=True, slots=True)
class ServerWord:
    text: str
    joins_previous: bool = False
    start_seconds: float | None = None
    """Server time of the word's start, when the server says it (moshi)."""


@dataclass(frozen=True, slots=True)
class ServerPause:
    """The server's own end-of-speech signal (legacy ``vad_end``, moshi ``prs``)."""


@dataclass(frozen=True, slots=True)
class ServerReady:
    pass


@dataclass(frozen=True, slots=True)
class ServerMarker:
    marker_id: int


@dataclass(frozen=True, slots=True)
class ServerProgress:
    frames: int
    """Frames the server has processed on this connection."""


@dataclass(frozen=True, slots=True)
class ServerError:
    message: str
    capacity: bool = False


@dataclass(frozen=True, slots=True)
class Ignored:
    reason: str


ServerEvent = ServerWord | ServerPause | ServerReady | ServerMarker | ServerProgress | ServerError | Ignored


@dataclass(frozen=True, slots=True)
class Padding:
    """Send ``frames`` frames of silence."""

    frames: int


@dataclass(frozen=True, slots=True)
class SendMarker:
    marker_id: int


FlushStep = Padding | SendMarker


class WireProtocol(ABC):
    """One connection's protocol state. ``reset`` starts a new connection."""

    delay_frames: int = 6
    """Model delay: a word comes back this many frames after its audio."""
    needs_ready: bool = False
    """Wait for ``ServerReady`` before sending audio."""
    flush_by_marker: bool = False
    """The flush ends when the marker comes back (else: a quiet period)."""

    def reset(self) -> None:  # noqa: B027 - stateless protocols need nothing
        """A new connection begins."""

    @abstractmethod
    def encode_audio(self, frame: Frame) -> bytes: ...

    def encode_marker(self, marker_id: int) -> bytes:
        raise NotImplementedError

    @abstractmethod
    def flush_plan(self, marker_id: int, quiet_frames: int = 0) -> list[FlushStep]:
        """What to send to get the last words out; ``quiet_frames``: how many
        quiet frames the speech already ended with (they count as padding)."""

    @abstractmethod
    def parse(self, message: str | bytes) -> list[ServerEvent]: ...
