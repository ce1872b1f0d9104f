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

Once a whole pre-roll of silence is held, a socket filter takes over
(``kernel_filter``, where the kernel supports it): the kernel drops the
participant's quietest packets before the process wakes up for them, and the
skipper sees only the quiet-but-not-silent ones, one sequence number in 128,
and everything else. The first voiced packet takes the filter off again.

SRTP stays consistent because skipped packets are never seen by it: libsrtp
infers the rollover counter from the distance to the last packet it
authenticated, which must stay below 2^15 packets (about 11 minutes at 50
packets/s). A silent packet ``resync_every`` sequence numbers after the last
one let through is therefore let through too.
The receiver reports aiortc sends show the skipped packets as lost; Janus
only records that for audio.

Single owner: the event loop thread, called from the ICE connection's
datagram callback.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from live_transcription.media.kernel_filter import SocketFilters, silence_filter
from live_transcription.media.rtp_level import audio_level, rtp_payload_type

Deliver = Callable[[bytes, int], None]
_SEQ_MASK = 0xFFFF
_MAX_COUNTED_GAP = 3000  # a bigger jump of sequence numbers is a restart, not drops


class SilenceGate(Protocol):
    """What the skipper asks the speaker's audio path (``SpeakerAudio``)."""

    @property
    def speaking(self) -> bool: ...

    @property
    def silence_level_dbov(self) -> int: ...

    @property
    def preroll_packets(self) -> int: ...

    @property
    def kernel_drop_level(self) -> int | None: ...


def _nowhere(data: bytes, component: int) -> None:
    pass


class SilenceSkipper:
    """Sits between the ICE connection and the DTLS/SRTP transport of one
    peer. Inert (everything goes on) until ``configure`` names the audio
    level extension and the audio payload types."""

    __slots__ = (
        "_deliver",
        "_deliver_audio",
        "_extension_id",
        "_filters",
        "_gate",
        "_held",
        "_last_passed_seq",
        "_last_seq",
        "_now",
        "_payload_types",
        "_program",
        "_resync_every",
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
        self._held: deque[tuple[bytes, int, int]] = deque(maxlen=gate.preroll_packets)
        self._deliver: Deliver = _nowhere
        self._deliver_audio: Deliver = _nowhere
        self._extension_id: int | None = None
        self._payload_types: frozenset[int] = frozenset()
        self._resync_every = resync_every
        self._last_seq: int | None = None
        self._last_passed_seq: int | None = None
        self._filters: SocketFilters | None = None
        self._program: bytes | None = None
        self.last_arrival = now()
        """When the last audio datagram arrived, skipped or not (liveness)."""
        self.skipped = 0
        """Silent packets never decrypted, the kernel's drops included (held
        ones not counted until dropped)."""
        self.resyncs = 0

    def attach(self, deliver: Deliver, audio: Deliver | None = None) -> None:
        """Where datagrams go on to (the ICE connection's own handler), and
        the audio RTP let through (by default the same)."""
        self._deliver = deliver
        self._deliver_audio = audio or deliver

    def use_kernel_filters(self, filters: SocketFilters) -> None:
        """The peer's sockets, for the kernel filter (owned from now on)."""
        if self._filters is not None:
            self._filters.close()
        self._filters = filters
        self._build_program()

    def configure(self, extension_id: int | None, payload_types: frozenset[int]) -> None:
        """The negotiated audio level extension id (``None``: the sender does
        not send levels, nothing is skipped) and the Opus payload types."""
        self._extension_id = extension_id
        self._payload_types = payload_types
        self._build_program()

    @property
    def kernel_filter_attaches(self) -> int:
        return 0 if self._filters is None else self._filters.attaches

    @property
    def kernel_filtering(self) -> bool:
        """Whether the kernel drops this peer's silence right now."""
        return self._filters is not None and self._filters.attached

    def detach(self) -> None:
        """Drop the held packets, the kernel filter and the reference to the
        connection."""
        self._deliver = _nowhere
        self._deliver_audio = _nowhere
        self._extension_id = None
        self._held.clear()
        self._program = None
        if self._filters is not None:
            self._filters.close()
            self._filters = None

    def _build_program(self) -> None:
        level = self._gate.kernel_drop_level
        extension_id = self._extension_id
        if self._filters is not None:
            self._filters.detach()
        self._program = None
        if self._filters is None or level is None or extension_id is None or not 1 <= extension_id <= 14:
            return  # two-byte header ids (15..255) are left to the process
        if not self._payload_types:
            return
        self._program = silence_filter(extension_id, self._payload_types, max(level, self._threshold))

    def datagram(self, data: bytes, component: int) -> None:
        extension_id = self._extension_id
        if extension_id is None or rtp_payload_type(data) not in self._payload_types:
            self._deliver(data, component)
            return
        self.last_arrival = self._now()
        seq = (data[2] << 8) | data[3]  # an RTP header: at least 12 bytes
        filters = self._filters
        filtering = filters is not None and filters.attached
        if filtering and self._last_seq is not None:
            gap = (seq - self._last_seq - 1) & _SEQ_MASK
            if gap < _MAX_COUNTED_GAP:
                self.skipped += gap  # dropped by the kernel
        self._last_seq = seq
        level = audio_level(data, extension_id)
        if level is None or level <= self._threshold or self._gate.speaking:
            if filtering:
                assert filters is not None
                filters.detach()
            self._pass(data, component, seq)
            return
        if self._last_passed_seq is None:
            self._last_passed_seq = seq
        if (seq - self._last_passed_seq) & _SEQ_MASK >= self._resync_every:
            self.resyncs += 1
            self.skipped += len(self._held)
            self._held.clear()
            self._pass(data, component, seq)
            return
        held = self._held
        self._forget_stale(seq)
        if len(held) == held.maxlen:
            self.skipped += 1  # the oldest falls out of the pre-roll
            if not filtering and self._program is not None:
                assert filters is not None
                filters.attach(self._program)  # a whole pre-roll of silence: the kernel takes over
        held.append((data, component, seq))

    def _forget_stale(self, seq: int) -> None:
        """Held packets more than a pre-roll of sequence numbers before
        ``seq`` are no pre-roll of it (the kernel dropped what was between)."""
        held = self._held
        window = held.maxlen or 0
        while held and (seq - held[0][2]) & _SEQ_MASK > window:
            held.popleft()
            self.skipped += 1

    def _pass(self, data: bytes, component: int, seq: int) -> None:
        self._last_passed_seq = seq
        self._forget_stale(seq)
        held = self._held
        deliver = self._deliver_audio
        while held:
            packet, held_component, _ = held.popleft()
            deliver(packet, held_component)
        deliver(data, component)
