"""Every reach into aiortc's internals, in one place.

Stock ``RTCRtpReceiver.receive`` starts a decoder thread per receiver and
feeds it through an unbounded ``queue.Queue`` after a jitter buffer; measured
~2 % of a core and ~1 MB per stream. We keep aiortc for ICE, DTLS and SRTP
and take the Opus packets straight from RTP instead:

* ``receive`` is overridden per instance: it records the negotiated codecs,
  registers the receiver with the DTLS transport (so SRTP packets are routed
  to it) and starts aiortc's own RTCP task (receiver reports), but starts no
  decoder thread.
* ``_handle_rtp_packet`` is overridden per instance: it feeds aiortc's
  per-SSRC statistics (what the receiver reports need) and hands each packet,
  inline on the event loop, to ``on_rtp`` as an ``OpusRtp``. No jitter
  buffer, no queue, no thread.
* optionally, aioice's ``Connection.data_received`` is overridden per
  instance by a ``SilenceSkipper``, which holds back silent packets before
  they enter the connection's queue (``silence_skip``); and once candidates
  are gathered, each ``StunProtocol.datagram_received`` is overridden per
  instance so that an RTP/RTCP datagram (first byte 128..191, never STUN,
  RFC 7983) goes to the skipper without aioice first trying, and failing,
  to parse it as STUN.
* with the skipper, audio RTP it lets through takes the fast path once the
  DTLS transport has its SRTP session (``AudioFastPath``): decrypted with
  that session and handed to the tap directly, without aioice's queue, the
  DTLS transport's receive loop, aiortc's RTP parsing, routing and
  statistics (a quarter of an active speaker's cost in the profile). The
  receiver reports then carry no statistics for the stream; Janus uses them
  for audio only to show them.

After ``RTCPeerConnection.close``, ``release_closed`` breaks the reference
cycles aiortc and aioice leave behind (transports holding the peer
connection's bound methods as event listeners, ICE candidate pairs holding
their protocol, which holds the connection). Without it a closed peer
connection, its DTLS and SRTP state and its sockets' objects wait for the
cyclic garbage collector's oldest generation: under churn that is hundreds of
dead peers at a time, a high-water mark the heap keeps (``bench`` churn
scenario). With it they are freed by reference counting when the owner lets
go.

``RTCRtpReceiver.stop`` keeps working unchanged: it sees ``__started``,
unregisters from the transport, finds no decoder thread to stop, and cancels
the RTCP task we started.

Private names relied on are listed in ``REQUIRED_RECEIVER_ATTRIBUTES``;
``check_seam`` verifies them so an aiortc upgrade that moves them fails
loudly (at the first peer, and in the unit tests) rather than silently
falling back to a decoder thread per speaker. pyproject pins aiortc tightly
for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

import pylibsrtp
from aioice import Connection
from aioice.ice import StunProtocol
from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.codecs import HEADER_EXTENSIONS
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceTransport
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpReceiveParameters
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import HeaderExtensions, RtpPacket

from live_transcription.media.kernel_filter import SocketFilters
from live_transcription.media.packet import OpusRtp
from live_transcription.media.rtp_level import audio_level, payload_bounds
from live_transcription.media.silence_skip import SilenceSkipper

logger = logging.getLogger(__name__)

AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"

# name-mangled private state of RTCRtpReceiver that this module reads or sets
_CODECS = "_RTCRtpReceiver__codecs"
_STARTED = "_RTCRtpReceiver__started"
_RTCP_TASK = "_RTCRtpReceiver__rtcp_task"
_REMOTE_STREAMS = "_RTCRtpReceiver__remote_streams"
_DECODER_THREAD = "_RTCRtpReceiver__decoder_thread"

REQUIRED_RECEIVER_ATTRIBUTES = (
    _CODECS,
    _STARTED,
    _RTCP_TASK,
    _REMOTE_STREAMS,
    _DECODER_THREAD,
    "_enabled",
    "_run_rtcp",
    "_handle_rtp_packet",
    "receive",
    "stop",
    "transport",
)

_seam_checked = False


class SeamBroken(RuntimeError):
    """The installed aiortc no longer has the internals the lean receiver uses."""


def check_seam(receiver: RTCRtpReceiver | None = None) -> None:
    """Raise ``SeamBroken`` naming what is missing. With a receiver, check that
    instance; else check a throwaway one built on a stub transport."""
    missing = []
    if receiver is not None:
        missing += [name for name in REQUIRED_RECEIVER_ATTRIBUTES if not hasattr(receiver, name)]
    for owner, name in (
        (RTCDtlsTransport, "_register_rtp_receiver"),
        (RTCDtlsTransport, "_unregister_rtp_receiver"),
        (StreamStatistics, "add"),
        (Connection, "data_received"),
        (StunProtocol, "datagram_received"),
    ):
        if not hasattr(owner, name):
            missing.append(f"{owner.__name__}.{name}")
    if not hasattr(HeaderExtensions(), "audio_level"):
        missing.append("HeaderExtensions.audio_level")
    if receiver is not None:
        if not hasattr(getattr(receiver, "transport", None), "_rx_srtp"):
            missing.append("RTCDtlsTransport._rx_srtp")
        connection = _ice_connection(receiver)
        if not isinstance(connection, Connection):
            missing.append("RTCIceTransport._connection")
        else:
            missing += [
                f"Connection.{name}"
                for name in ("_protocols", "_check_list")
                if not isinstance(getattr(connection, name, None), list)
            ]
    if missing:
        raise SeamBroken("aiortc internals used by media/lean_receiver.py are gone: " + ", ".join(missing))


def ensure_audio_level_extension() -> None:
    """Make aiortc offer/accept the RFC 6464 audio level for audio. aiortc
    1.16 lists it already; older or newer lists may not. Idempotent."""
    audio = HEADER_EXTENSIONS["audio"]
    if any(ext.uri == AUDIO_LEVEL_URI for ext in audio):
        return
    # ids share one space across media kinds when bundled: take a free one
    used = {ext.id for kind in HEADER_EXTENSIONS.values() for ext in kind}
    free = next(i for i in range(1, 15) if i not in used)
    audio.append(RTCRtpHeaderExtensionParameters(id=free, uri=AUDIO_LEVEL_URI))


class LeanTap:
    """The per-receiver replacement for aiortc's decode path. Counts what it
    sees; the receiver only holds its bound methods, the tap holds the
    receiver weakly, so there is no reference cycle to wait on."""

    __slots__ = (
        "__weakref__",
        "_level_id",
        "_now",
        "_on_rtp",
        "_opus_types",
        "_receiver",
        "_skipper",
        "_warned",
        "detached",
        "fast_packets",
        "handler_errors",
        "malformed",
        "packets",
        "started",
        "unknown_payload",
    )

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        on_rtp: Callable[[OpusRtp], None],
        now: Callable[[], float],
        skipper: SilenceSkipper | None,
    ) -> None:
        self._receiver: weakref.ref[RTCRtpReceiver] = weakref.ref(receiver)
        self._on_rtp = on_rtp
        self._now = now
        self._skipper = skipper
        self._opus_types: frozenset[int] = frozenset()
        self._level_id: int | None = None
        self._warned = False
        self.started = False
        """The receiver is registered: the fast path may hand packets over."""
        self.detached = False
        self.packets = 0
        self.unknown_payload = 0
        self.malformed = 0
        self.fast_packets = 0
        """Packets of ``packets`` that came by the fast path."""
        self.handler_errors = 0

    def detach(self) -> None:
        """Stop handing packets to ``on_rtp`` and drop the reference to it;
        the receiver will not start any more (see ``receive``)."""
        self._on_rtp = _ignore
        self._opus_types = frozenset()
        self.started = False
        self.detached = True
        if self._skipper is not None:
            self._skipper.detach()
            receiver = self._receiver()
            connection = None if receiver is None else _ice_connection(receiver)
            if isinstance(connection, Connection):
                # back to aioice's own methods; breaks the aioice -> skipper links
                vars(connection).pop("data_received", None)
                for protocol in getattr(connection, "_protocols", []):
                    vars(protocol).pop("datagram_received", None)

    async def receive(self, parameters: RTCRtpReceiveParameters) -> None:
        receiver = self._receiver()
        if receiver is None or getattr(receiver, _STARTED) or self.detached:
            # detached: the peer is closing. aiortc's connect task can still
            # get here after close() stopped the receiver (the DTLS handshake
            # finished meanwhile); started now, its RTCP loop would run forever
            return
        codecs: dict[int, Any] = getattr(receiver, _CODECS)
        opus_types = set()
        for codec in parameters.codecs:
            if codec.payloadType is None:
                continue
            codecs[codec.payloadType] = codec
            if codec.mimeType.lower() == "audio/opus":
                opus_types.add(codec.payloadType)
        self._opus_types = frozenset(opus_types)
        level_ids = [ext.id for ext in parameters.headerExtensions if ext.uri == AUDIO_LEVEL_URI]
        self._level_id = level_ids[0] if level_ids else None
        if self._skipper is not None:
            self._skipper.configure(self._level_id, self._opus_types)
        receiver.transport._register_rtp_receiver(receiver, parameters)
        # aiortc's RTCP loop: receiver reports, and what stop() waits for
        setattr(receiver, _RTCP_TASK, asyncio.ensure_future(receiver._run_rtcp()))
        setattr(receiver, _STARTED, True)
        self.started = True

    async def handle_rtp_packet(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        receiver = self._receiver()
        if receiver is None or not receiver._enabled:
            return
        if packet.payload_type not in self._opus_types:
            self.unknown_payload += 1
            return
        streams: dict[int, StreamStatistics] = getattr(receiver, _REMOTE_STREAMS)
        stats = streams.get(packet.ssrc)
        if stats is None:
            stats = streams[packet.ssrc] = StreamStatistics(48_000)
        stats.add(packet)
        self.packets += 1
        level = packet.extensions.audio_level
        self._hand_over(
            OpusRtp(
                packet.payload,
                packet.sequence_number,
                packet.timestamp,
                audio_level=None if level is None else level[1],
                arrival_time=self._now(),
                ssrc=packet.ssrc,
            )
        )

    def handle_decrypted(self, packet: bytes) -> None:
        """An audio RTP packet from the fast path, decrypted: what aiortc's
        parsing and routing did, reduced to what the audio path needs."""
        receiver = self._receiver()
        if receiver is None or not receiver._enabled:
            return
        if packet[1] & 0x7F not in self._opus_types:
            self.unknown_payload += 1
            return
        bounds = payload_bounds(packet)
        if bounds is None:
            self.malformed += 1
            return
        self.packets += 1
        self.fast_packets += 1
        level_id = self._level_id
        self._hand_over(
            OpusRtp(
                packet[bounds[0] : bounds[1]],
                (packet[2] << 8) | packet[3],
                int.from_bytes(packet[4:8]),
                audio_level=None if level_id is None else audio_level(packet, level_id),
                arrival_time=self._now(),
                ssrc=int.from_bytes(packet[8:12]),
            )
        )

    def _hand_over(self, packet: OpusRtp) -> None:
        try:
            self._on_rtp(packet)
        except Exception:
            # an exception here would end aiortc's DTLS receive loop for good
            self.handler_errors += 1
            if not self._warned:
                self._warned = True
                logger.exception("RTP handler failed; packet skipped")


def _ignore(packet: OpusRtp) -> None:
    pass


class AudioFastPath:
    """Where the skipper sends the audio RTP it lets through: decrypted with
    the DTLS transport's SRTP session and handed to the tap, or, before
    that session and the receiver exist, into aioice's queue as before."""

    __slots__ = ("_dtls", "_fallback", "_tap", "srtp_errors")

    def __init__(self, dtls: RTCDtlsTransport, fallback: Callable[[bytes, int], None], tap: LeanTap) -> None:
        self._dtls: weakref.ref[RTCDtlsTransport] = weakref.ref(dtls)
        self._fallback = fallback
        self._tap: weakref.ref[LeanTap] = weakref.ref(tap)
        self.srtp_errors = 0

    def __call__(self, data: bytes, component: int) -> None:
        dtls = self._dtls()
        tap = self._tap()
        srtp = None if dtls is None else dtls._rx_srtp
        if srtp is None or tap is None or not tap.started:
            self._fallback(data, component)
            return
        try:
            packet = srtp.unprotect(data)
        except pylibsrtp.Error:
            self.srtp_errors += 1  # forged, replayed or damaged: as aiortc, dropped
            return
        tap.handle_decrypted(packet)


def _ice_connection(receiver: RTCRtpReceiver) -> object:
    ice = getattr(getattr(receiver, "transport", None), "transport", None)
    return getattr(ice, "_connection", None) if isinstance(ice, RTCIceTransport) else None


def install(
    receiver: RTCRtpReceiver,
    on_rtp: Callable[[OpusRtp], None],
    now: Callable[[], float],
    skipper: SilenceSkipper | None = None,
) -> LeanTap:
    """Replace ``receiver``'s decode path with a ``LeanTap`` and, with a
    ``skipper``, put it in front of the ICE connection's datagram handler.
    Call before the connection starts receiving (before the local
    description is set)."""
    global _seam_checked  # noqa: PLW0603 - checked once per process
    if not _seam_checked:
        check_seam(receiver)
        _seam_checked = True
    if getattr(receiver, _STARTED):
        raise RuntimeError("the receiver already started: install the lean tap before")
    tap = LeanTap(receiver, on_rtp, now, skipper)
    # instance attributes shadow the class' methods for every caller,
    # including the transport's packet router and aioice's datagram protocol
    receiver.receive = tap.receive  # type: ignore[method-assign]
    receiver._handle_rtp_packet = tap.handle_rtp_packet  # type: ignore[method-assign]
    if skipper is not None:
        connection = _ice_connection(receiver)
        assert isinstance(connection, Connection)
        fallback = connection.data_received
        skipper.attach(fallback, audio=AudioFastPath(receiver.transport, fallback, tap))
        connection.data_received = skipper.datagram  # type: ignore[method-assign]
    return tap


def bypass_stun_parsing(receiver: RTCRtpReceiver, skipper: SilenceSkipper) -> int:
    """After gathering: route RTP/RTCP datagrams of every local candidate's
    protocol straight to ``skipper`` (what aioice does for them too, minus
    the failed STUN parse), and give the skipper their sockets for the
    kernel filter. Returns how many protocols were routed."""
    connection = _ice_connection(receiver)
    protocols = getattr(connection, "_protocols", None)
    if not isinstance(protocols, list):
        raise SeamBroken("aiortc internals used by media/lean_receiver.py are gone: Connection._protocols")
    sockets = []
    for protocol in protocols:
        if isinstance(protocol, StunProtocol):
            protocol.datagram_received = _rtp_first(  # type: ignore[method-assign,assignment]
                protocol, skipper.datagram, protocol.local_candidate.component
            )
            sock = protocol.transport.get_extra_info("socket")
            if sock is not None:
                sockets.append(sock)
    skipper.use_kernel_filters(SocketFilters(sockets))
    return len(protocols)


def _rtp_first(
    protocol: StunProtocol,
    rtp_path: Callable[[bytes, int], None],
    component: int,
) -> Callable[[bytes | str, tuple[Any, ...]], None]:
    # the protocol holds this function: it holds the protocol weakly (and
    # aioice's method unbound), so the two make no reference cycle
    stun_path = type(protocol).datagram_received
    protocol_ref = weakref.ref(protocol)

    def datagram_received(data: bytes | str, addr: tuple[Any, ...]) -> None:
        if isinstance(data, bytes) and data and 127 < data[0] < 192:
            rtp_path(data, component)
        else:
            owner = protocol_ref()
            if owner is not None:
                stun_path(owner, data, addr)

    return datagram_received


def release_closed(pc: RTCPeerConnection) -> None:
    """Break the reference cycles of a closed peer connection, so that it is
    freed as soon as its owner drops it. Call after ``pc.close()``."""
    pc.remove_all_listeners()
    for transceiver in pc.getTransceivers():
        # a receiver started by a connect that raced the close: its RTCP loop
        # (which holds the receiver and its transports) would never end
        rtcp = getattr(transceiver.receiver, _RTCP_TASK, None)
        if isinstance(rtcp, asyncio.Future) and not rtcp.done():
            rtcp.cancel()
        for dtls in (transceiver.receiver.transport, transceiver.sender.transport):
            # the peer connection's state handlers, bound methods of pc
            dtls.remove_all_listeners()
            ice = dtls.transport
            ice.remove_all_listeners()
            ice.iceGatherer.remove_all_listeners()
            _release_verify_helper(getattr(dtls, "_ssl", None))
            connection = getattr(ice, "_connection", None)
            if isinstance(connection, Connection):
                # candidate pair -> protocol -> connection; the checks are
                # over once the connection is closed
                connection._check_list.clear()
                connection._protocols.clear()


def _release_verify_helper(ssl: object) -> None:
    # pyOpenSSL's verify helper and its C callback hold each other; the
    # context keeps the callback itself alive for OpenSSL
    get_context = getattr(ssl, "get_context", None)
    if get_context is None:
        return
    helper = getattr(get_context(), "_verify_helper", None)
    if helper is not None and hasattr(helper, "callback"):
        helper.callback = None


def decoder_thread_started(receiver: RTCRtpReceiver) -> bool:
    """Whether aiortc's own decoder thread runs for ``receiver`` (it must not)."""
    return getattr(receiver, _DECODER_THREAD, None) is not None
