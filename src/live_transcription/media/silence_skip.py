"""Skip a silent participant's packets before they are decrypted.

Most participants of a call are silent most of the time, yet a browser with
an open microphone still sends 50 packets a second. Each one used to pay
the whole receive chain in Python (the ICE connection's queue, the DTLS
transport's loop, SRTP unprotect, RTP parsing, receiver statistics) only for
the audio gate to find it silent and skip decoding. The RFC 6464 level is in
the clear in the RTP header (``rtp_level``), so the decision is taken right
where the datagram leaves the ICE connection:

* a voiced packet, or any packet while the speaker's audio path is inside an
  utterance (``gate.speaking``: its hangover needs the silence too), goes on;
* a silent packet outside an utterance is held in a short ring (the
  pre-roll). When speech starts, the held packets go on first, in order, so
  the audio path still gets its pre-roll and the first syllable;
* a packet that is not RTP, not of the audio payload types, or carries no
  level goes on untouched (without the extension the energy VAD decides
  after decoding).

SRTP stays consistent because skipped packets are never seen by it: libsrtp
infers the rollover counter from the distance to the last packet it
authenticated, which must stay below 2^15 packets (about 11 minutes at 50
packets/s). One silent packet in ``resync_every`` is therefore let through.
The receiver reports aiortc sends show the skipped packets as lost; Janus
only records that for audio.

Single owner: the event loop thread, called from the ICE connection's
datagram callback.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from live_transcription.media.rtp_level import audio_level, rtp_payload_type

Deliver = Callable[[bytes, int], None]


class SilenceGate(Protocol):
    """What the skipper asks the speaker's audio path (``SpeakerAudio``)."""

    @property
    def speaking(self) -> bool: ...

    @property
    def silence_level_dbov(self) -> int: ...

    @property
    def preroll_packets(self) -> int: ...


def _nowhere(data: bytes, component: int) -> None:
    pass


class SilenceSkipper:
    """Sits between the ICE connection and the DTLS/SRTP transport of one
    peer. Inert (everything goes on) until ``configure`` names the audio
    level extension and the audio payload types."""

    __slots__ = (
        "_deliver",
        "_extension_id",
        "_gate",
        "_held",
        "_now",
        "_payload_types",
        "_resync_every",
        "_run",
        "_threshold",
        "last_arrival",
        "resyncs",
        "skipped",
    )

    def __init__(
        self,
        gate: SilenceGate,
        *,
        now: Callable[[], float],
        resync_every: int = 500,
    ) -> None:
        if resync_every < 1:
            raise ValueError("resync_every must be positive")
        self._gate = gate
        self._now = now
        self._threshold = gate.silence_level_dbov
        self._held: deque[tuple[bytes, int]] = deque(maxlen=gate.preroll_packets)
        self._deliver: Deliver = _nowhere
        self._extension_id: int | None = None
        self._payload_types: frozenset[int] = frozenset()
        self._resync_every = resync_every
        self._run = 0
        self.last_arrival = now()
        """When the last audio datagram arrived, skipped or not (liveness)."""
        self.skipped = 0
        """Silent packets never decrypted (held ones not counted until dropped)."""
        self.resyncs = 0

    def attach(self, deliver: Deliver) -> None:
        """Where datagrams go on to (the ICE connection's own handler)."""
        self._deliver = deliver

    def configure(self, extension_id: int | None, payload_types: frozenset[int]) -> None:
        """The negotiated audio level extension id (``None``: the sender does
        not send levels, nothing is skipped) and the Opus payload types."""
        self._extension_id = extension_id
        self._payload_types = payload_types

    def detach(self) -> None:
        """Drop the held packets and the reference to the connection."""
        self._deliver = _nowhere
        self._extension_id = None
        self._held.clear()

    def datagram(self, data: bytes, component: int) -> None:
        extension_id = self._extension_id
        if extension_id is None or rtp_payload_type(data) not in self._payload_types:
            self._deliver(data, component)
            return
        self.last_arrival = self._now()
        level = audio_level(data, extension_id)
        if level is None or level <= self._threshold or self._gate.speaking:
            self._pass(data, component)
            return
        if self._run >= self._resync_every:
            self.resyncs += 1
            self.skipped += len(self._held)
            self._held.clear()
            self._pass(data, component)
            return
        self._run += 1
        held = self._held
        if len(held) == held.maxlen:
            self.skipped += 1  # the oldest falls out of the pre-roll
        held.append((data, component))

    def _pass(self, data: bytes, component: int) -> None:
        self._run = 0
        held = self._held
        deliver = self._deliver
        while held:
            deliver(*held.popleft())
        deliver(data, component)
