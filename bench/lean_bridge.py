"""The lean load generator: aiortc for ICE and DTLS only, then SRTP protected
ahead of time and sent on one tick.

aiortc's sender costs Python per packet (an RTP object, its serialisation,
a coroutine step, SRTP, ``sendto`` through aioice): about 0.3 % of a core per
stream, so one process tops out near 200 streams (``bench/notes.md``).
Here each subscription is still an aiortc peer connection, which makes the
offer, runs ICE (aioice keeps answering the service's consent checks, RFC
7675, and sending its own: they ride on the same socket) and the DTLS
handshake. When aiortc would start its sender (``RTCRtpSender.send``, called
once DTLS is up with the negotiated parameters), the stream is taken over:

* its payload type, header extension ids, MID, CNAME and SSRC come from
  those parameters; the SRTP session from the DTLS transport
  (``_tx_srtp``); the socket and the remote address from the ICE pair
  aioice nominated (the socket's descriptor is duplicated, so aioice keeps
  receiving STUN and RTCP on the original);
* packets are built from per-shape bodies (``bench.lean_packets``) and
  protected ``ahead`` packets at a time, in one batch per stream;
* one timer (``SendTicker``) sends every stream's next packet: the 20 ms
  period is split into phases, each tick sends one phase's streams with a
  plain ``sendto`` each, and one stream in 50 of the phase sends its RTCP
  sender report (so each stream reports once a second).

What the harness asks of a stream (packets sent and when, whether it talks,
its utterance onsets, talk packets) is derived from the tick log and the
stream's ``Plan`` when asked, never recorded per packet.

One owner: the event loop of the generator process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pylibsrtp
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from pylibsrtp._binding import ffi, lib

from bench.lean_packets import (
    Packetizer,
    Plan,
    first_byte,
    hush_position,
    make_bodies,
    pattern_plan,
    schedule_plan,
    sender_report,
)
from bench.patterns import PACKET_MS, RATE, Pattern
from bench.subscriptions import SubscriptionBook

log = logging.getLogger("bench.lean")

MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
REPORT_EVERY_PACKETS = 50
"""A sender report per stream every 50 packets: once a second."""
DEFAULT_AHEAD = 10
"""Packets protected per batch (200 ms)."""
MAX_AHEAD = 1000
"""A hush drops the unsent batch and protects its sequence numbers again:
libsrtp allows that within its window (1024 on aiortc's sessions)."""
TICK_RING = 1 << 15
"""Tick times kept: 2 ** 15 ticks of 5 ms, about 164 s."""
MAX_BEHIND_S = 0.1
"""A timer further behind than this starts its schedule over from now."""
HISTORY_PACKETS = 4096
"""How far back onsets are looked for (as ``SendLog``'s capacity)."""
RECENT_ONSETS = 64


class FastProtect:
    """SRTP protect through pylibsrtp's C binding with one preallocated
    buffer and length: ``Session.protect`` allocates a length cell and
    checks its argument on every call (``python -m bench.lean_cost``
    measures both)."""

    __slots__ = ("_buffer", "_length", "_session", "_srtp", "_view")

    def __init__(self, session: pylibsrtp.Session) -> None:
        self._session = session  # keeps the C context alive
        self._srtp = session._srtp
        self._buffer = ffi.new("char[]", 2048)
        self._view = ffi.buffer(self._buffer)
        self._length = ffi.new("int *")

    def __call__(self, packet: bytes) -> bytes:
        size = len(packet)
        if size > 2048 - 16:
            raise ValueError("packet is too long")
        self._view[0:size] = packet
        self._length[0] = size
        status = lib.srtp_protect(self._srtp[0], self._buffer, self._length)
        if status:
            raise pylibsrtp.Error(f"srtp_protect failed: {status}")
        data: bytes = self._view[0 : self._length[0]]
        return data


# --- the timer --------------------------------------------------------------------------


class SendTicker:
    """One timer for every lean stream. Logical tick ``n`` sends the next
    packet of every stream in phase ``n % phases``; ticks are never skipped
    (a late timer sends late, as a starved browser does), so a stream's
    packet ``i`` always goes out on tick ``first_tick + i * phases`` and its
    send time is that tick's. Lateness is recorded as the aiortc
    generator's ``Ticker`` records it: ``skipped`` counts ticks that went
    out more than a tick late."""

    def __init__(self, phases: int = 4, *, ahead: int = DEFAULT_AHEAD) -> None:
        if not 1 <= ahead <= MAX_AHEAD:
            raise ValueError(f"ahead: 1..{MAX_AHEAD} packets")
        self.phases = phases
        self.ahead = ahead
        self.step = PACKET_MS / 1000 / phases
        self._loop = asyncio.get_running_loop()
        self._buckets: list[list[LeanStream]] = [[] for _ in range(phases)]
        self._reports: list[list[list[LeanStream]]] = [
            [[] for _ in range(REPORT_EVERY_PACKETS)] for _ in range(phases)
        ]
        self._times = array("d", bytes(8 * TICK_RING))
        self._joined = itertools.count()
        self._base = self._loop.time()
        self._handle: asyncio.TimerHandle | None = None
        self._hushed = False
        self.tick = -1
        self.skipped = 0
        self.lag_max = 0.0
        self.lag_over_5ms = 0
        self.streams = 0
        self.send_errors = 0
        self.reports_sent = 0
        self.report_errors = 0

    def start(self) -> None:
        self._base = self._loop.time() - (self.tick + 1) * self.step
        self._handle = self._loop.call_at(self._base + (self.tick + 1) * self.step, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def reset_stats(self) -> None:
        self.skipped = 0
        self.lag_max = 0.0
        self.lag_over_5ms = 0

    @property
    def hushed(self) -> bool:
        return self._hushed

    @hushed.setter
    def hushed(self, on: bool) -> None:
        """Every stream sends its noise floor (the harness' quiet end of a
        window); from the next packet on, not after the batch protected ahead."""
        if on == self._hushed:
            return
        self._hushed = on
        for bucket in self._buckets:
            for stream in bucket:
                stream.rewind(hushed=on)

    def add(self, stream: LeanStream) -> None:
        n = next(self._joined)
        phase = n % self.phases
        stream.phase = phase
        stream.first_tick = self.tick + 1 + (phase - self.tick - 1) % self.phases
        stream.report_slot = (n // self.phases) % REPORT_EVERY_PACKETS
        self._buckets[phase].append(stream)
        self._reports[phase][stream.report_slot].append(stream)
        self.streams += 1

    def remove(self, stream: LeanStream) -> None:
        with contextlib.suppress(ValueError):
            self._buckets[stream.phase].remove(stream)
            self._reports[stream.phase][stream.report_slot].remove(stream)
            self.streams -= 1

    def time_of_tick(self, tick: int) -> float | None:
        """When logical tick ``tick`` was sent (loop time); None when it is
        still to come or forgotten."""
        if tick < 0 or tick > self.tick or tick <= self.tick - TICK_RING:
            return None
        return self._times[tick % TICK_RING]

    def _fire(self) -> None:
        try:
            self.send_tick(self._loop.time())
        finally:
            self._handle = self._loop.call_at(self._base + (self.tick + 1) * self.step, self._fire)

    def send_tick(self, now: float) -> None:
        """Send the next logical tick: one packet of every stream of its
        phase, and the sender reports that are due."""
        tick = self.tick + 1
        lag = now - (self._base + tick * self.step)
        self.lag_max = max(self.lag_max, lag)
        if lag > 0.005:
            self.lag_over_5ms += 1
        if lag > self.step:
            self.skipped += 1
        if lag > MAX_BEHIND_S:
            self._base += lag  # start over from now rather than burst to catch up
        self.tick = tick
        self._times[tick % TICK_RING] = now
        phase = tick % self.phases
        errors = 0
        # the hot loop: one sendto per stream; packets were built and
        # protected ahead, in batches (``refill``)
        for stream in self._buckets[phase]:
            try:
                k = stream.cursor
                if k == stream.ready_len:
                    stream.refill()
                    k = 0
                stream.cursor = k + 1
                stream.sendto(stream.ready[k], stream.addr)
            except (OSError, pylibsrtp.Error):
                # a full socket buffer (EAGAIN), a closed peer, an SRTP
                # session that refused: the packet is lost, as on a network
                errors += 1
        self.send_errors += errors
        for stream in self._reports[phase][(tick // self.phases) % REPORT_EVERY_PACKETS]:
            try:
                self.reports_sent += stream.send_report(now)
            except (OSError, pylibsrtp.Error):
                self.report_errors += 1


# --- one stream -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """What every stream of one publisher shares: its pattern and plan."""

    pattern: Pattern
    plan: Plan
    start: int
    scheduled: bool


class LeanStream:
    """One subscription's RTP, taken over from aiortc. Looks to the load
    generator's bookkeeping like ``loadgen.PatternTrack`` (and
    ``ScheduledTrack`` when ``scheduled``): ``log``, ``talking``,
    ``last_talk``, ``talk_packets``, ``utterances``, ``onsets``,
    ``unmeasured``, ``offset``; all derived, none counted per packet."""

    __slots__ = (
        "_counted_from",
        "_hushes",
        "_octets",
        "_removed_at",
        "addr",
        "batch_octets",
        "bodies",
        "cname",
        "cursor",
        "extension_size",
        "first_tick",
        "hushed",
        "made",
        "packetizer",
        "phase",
        "protect",
        "ready",
        "ready_len",
        "report_slot",
        "sendto",
        "shape",
        "socket",
        "srtp",
        "ticker",
    )

    def __init__(
        self,
        ticker: SendTicker,
        shape: Shape,
        *,
        bodies: tuple[bytes, ...],
        packetizer: Packetizer,
        srtp: pylibsrtp.Session,
        sock: socket.socket,
        addr: tuple[Any, ...],
        cname: str,
    ) -> None:
        self.ticker = ticker
        self.shape = shape
        self.bodies = bodies
        self.extension_size = len(bodies[0]) - len(shape.pattern.payloads[0])
        self.packetizer = packetizer
        self.srtp = srtp
        self.protect = FastProtect(srtp)
        self.socket = sock
        self.sendto = sock.sendto
        self.addr = addr
        self.cname = cname
        self.phase = 0
        self.first_tick = 0
        self.report_slot = 0
        self.hushed = ticker.hushed
        self.made = 0
        """Packets built and protected so far (sent, or ready to send)."""
        self.ready: list[bytes] = []
        self.ready_len = 0
        self.cursor = 0
        self.batch_octets: list[int] = []
        self._octets = 0
        """Payload octets of the batches before the current one."""
        self._removed_at: int | None = None
        self._counted_from = 0
        self._hushes: deque[tuple[int, int | None]] = deque(maxlen=8)
        """Packet index ranges [from, to) sent hushed; ``to`` None while hushed."""
        if self.hushed:
            self._hushes.append((0, None))

    # --- sending ------------------------------------------------------------------------

    def refill(self) -> None:
        """Build and protect the next ``ahead`` packets, in one batch."""
        first = self.made
        count = self.ticker.ahead
        shape = self.shape
        bodies = self.bodies
        if self.hushed:
            pattern = shape.pattern
            chosen = [bodies[hush_position(pattern, i)] for i in range(first, first + count)]
        else:
            positions = shape.plan.positions
            period = shape.plan.period
            start = shape.start
            chosen = [bodies[positions[(start + i) % period]] for i in range(first, first + count)]
        protect = self.protect
        self.ready = [protect(packet) for packet in self.packetizer.packets(chosen, first)]
        self.ready_len = count
        self.cursor = 0
        if self.batch_octets:
            self._octets += self.batch_octets[-1]
        size = self.extension_size
        self.batch_octets = list(itertools.accumulate(len(body) - size for body in chosen))
        self.made = first + count

    def rewind(self, *, hushed: bool) -> None:
        """Drop the packets protected but not sent; the next batch is built
        hushed or not (its sequence numbers are protected again, which
        aiortc's SRTP sessions allow)."""
        sent = self.sent
        if self.cursor and self.batch_octets:
            self._octets += self.batch_octets[self.cursor - 1]
        self.batch_octets = []
        self.ready = []
        self.ready_len = 0
        self.cursor = 0
        self.made = sent
        self.hushed = hushed
        if hushed:
            self._hushes.append((sent, None))
        elif self._hushes and self._hushes[-1][1] is None:
            self._hushes[-1] = (self._hushes[-1][0], sent)

    def send_report(self, now: float) -> bool:
        """An RTCP sender report for what was sent so far, SRTCP-protected;
        none before the first packet."""
        sent = self.sent
        if sent == 0:
            return False
        last = sent - 1
        sent_at = self.ticker.time_of_tick(self.first_tick + last * self.ticker.phases)
        rtp_timestamp = self.packetizer.timestamp(last) + int(
            max(0.0, now - (sent_at if sent_at is not None else now)) * RATE
        )
        octets = self._octets + (self.batch_octets[self.cursor - 1] if self.cursor else 0)
        report = sender_report(
            self.packetizer.ssrc,
            unix_time=time.time(),
            rtp_timestamp=rtp_timestamp,
            packets=sent,
            octets=octets,
            cname=self.cname,
        )
        self.sendto(self.srtp.protect_rtcp(report), self.addr)
        return True

    def stopped(self) -> None:
        """The ticker no longer sends this stream: its counts stop here."""
        if self._removed_at is None:
            self._removed_at = self.sent

    # --- what the harness reads ---------------------------------------------------------

    @property
    def sent(self) -> int:
        """Packets sent so far (the next packet's index)."""
        if self._removed_at is not None:
            return self._removed_at
        ticks = self.ticker.tick - self.first_tick
        return 0 if ticks < 0 else ticks // self.ticker.phases + 1

    @property
    def log(self) -> LeanStream:
        """``bench.latency.PacketTimes``: ``sent`` and ``time_of``."""
        return self

    def time_of(self, index: int) -> float | None:
        if index < 0 or index >= self.sent:
            return None
        return self.ticker.time_of_tick(self.first_tick + index * self.ticker.phases)

    @property
    def scheduled(self) -> bool:
        return self.shape.scheduled

    @property
    def offset(self) -> int:
        return self.shape.start

    def _hushed_at(self, index: int) -> bool:
        return any(start <= index and (end is None or index < end) for start, end in self._hushes)

    def _talk_between(self, first: int, end: int) -> int:
        plan, start = self.shape.plan, self.shape.start
        count = plan.talk_between(start, first, end)
        for hush_start, hush_end in self._hushes:
            low, high = max(first, hush_start), min(end, end if hush_end is None else hush_end)
            count -= plan.talk_between(start, low, high)
        return count

    def _resumptions(self, first: int, end: int) -> list[int]:
        """Where a hush ended in the middle of a turn: the service sees an
        utterance start there (one the word map does not hold for)."""
        plan, start = self.shape.plan, self.shape.start
        return [
            hush_end
            for _, hush_end in self._hushes
            if hush_end is not None
            and first <= hush_end < end
            and plan.is_talk(start, hush_end)
            and not plan.onset[(start + hush_end) % plan.period]
        ]

    @property
    def talking(self) -> bool:
        sent = self.sent
        return (
            sent > 0 and not self._hushed_at(sent - 1) and self.shape.plan.is_talk(self.shape.start, sent - 1)
        )

    @property
    def last_talk(self) -> float:
        """When the last talk packet was sent (loop time), -inf if none is known."""
        plan, start = self.shape.plan, self.shape.start
        before = self.sent
        for _ in range(len(self._hushes) + 1):
            index = plan.last_talk(start, before)
            if index is None:
                return -math.inf
            hush = next((h for h in self._hushes if h[0] <= index and (h[1] is None or index < h[1])), None)
            if hush is None:
                sent_at = self.time_of(index)
                return -math.inf if sent_at is None else sent_at
            before = hush[0]
        return -math.inf

    @property
    def talk_packets(self) -> int:
        """Talk packets sent since the count was last set to 0."""
        return self._talk_between(self._counted_from, self.sent)

    @talk_packets.setter
    def talk_packets(self, value: int) -> None:
        if value != 0:
            raise ValueError("the count can only be started over (set to 0)")
        self._counted_from = self.sent

    @property
    def utterances(self) -> int:
        """Utterances started since the count was last set to 0."""
        return len(self._onsets(self._counted_from, self.sent))

    @utterances.setter
    def utterances(self, value: int) -> None:
        self.talk_packets = value

    def _onsets(self, first: int, end: int) -> list[int]:
        plan, start = self.shape.plan, self.shape.start
        onsets = [i for i in plan.onset_indexes(start, first, end) if not self._hushed_at(i)]
        return sorted(onsets + self._resumptions(first, end))

    @property
    def onsets(self) -> list[int]:
        """Packet indexes of the recent utterance onsets, oldest first."""
        sent = self.sent
        return self._onsets(max(0, sent - HISTORY_PACKETS), sent)[-RECENT_ONSETS:]

    @property
    def unmeasured(self) -> set[int]:
        """Recent onsets too close to the previous utterance for the word map."""
        plan, start = self.shape.plan, self.shape.start
        sent = self.sent
        first = max(0, sent - HISTORY_PACKETS)
        resumed = set(self._resumptions(first, sent))
        return {i for i in self.onsets if i in resumed or plan.unmeasured[(start + i) % plan.period]}


# --- the bridge -------------------------------------------------------------------------


class _IdleTrack(MediaStreamTrack):
    """What aiortc's offer is made for; never read (the sender is taken over)."""

    kind = "audio"

    async def recv(self) -> Any:
        raise MediaStreamError("the lean generator sends its own packets")


@dataclass(eq=False)
class LeanSubscription:
    sid: str
    subscriber: str
    publisher: str
    pc: RTCPeerConnection
    shape: Shape
    stream: LeanStream | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def track(self) -> LeanStream:
        """The stream, once taken over (``LeanBridge.is_up``)."""
        if self.stream is None:
            raise LookupError(f"{self.sid} is not sending yet")
        return self.stream


class LeanBridge(SubscriptionBook[LeanSubscription]):
    """``MediaBridge`` for the emulator: every subscription is an aiortc
    peer connection whose sending is taken over by a ``LeanStream``."""

    def __init__(self, ticker: SendTicker, *, levels: bool = True) -> None:
        super().__init__()
        self._ticker = ticker
        self._levels = levels
        self._shapes: dict[str, Shape] = {}
        self._bodies: dict[tuple[int, str | None, int | None, int | None], tuple[bytes, ...]] = {}
        self._plans: dict[int, Plan] = {}
        self._sids = (f"lean-{n}" for n in itertools.count(1))
        self.takeover_failures = 0

    @property
    def subscriptions(self) -> dict[str, LeanSubscription]:
        """Subscriptions that are sending (the harness reads their streams)."""
        return {sid: sub for sid, sub in self._subscriptions.items() if sub.stream is not None}

    def add_publisher(
        self, session_id: str, pattern: Pattern, offset: int, schedule: bytes | None = None
    ) -> None:
        if schedule is None:
            plan = self._plans.get(id(pattern))
            if plan is None:
                plan = self._plans[id(pattern)] = pattern_plan(pattern)
            self._shapes[session_id] = Shape(pattern, plan, offset, scheduled=False)
        else:
            self._shapes[session_id] = Shape(pattern, schedule_plan(pattern, schedule), 0, scheduled=True)

    async def remove_publisher(self, session_id: str) -> None:
        self._shapes.pop(session_id, None)
        await self._close_publisher(session_id)

    def subscription_of(self, publisher: str) -> LeanSubscription | None:
        sub = self._by_publisher.get(publisher)
        return sub if sub is not None and sub.stream is not None else None

    def is_up(self, sub: object) -> bool:
        return (
            isinstance(sub, LeanSubscription)
            and sub.stream is not None
            and sub.pc.connectionState == "connected"
        )

    def connected(self) -> int:
        return sum(1 for sub in self._subscriptions.values() if self.is_up(sub))

    def _bodies_for(
        self, pattern: Pattern, mid: str | None, mid_id: int | None, level_id: int | None
    ) -> tuple[bytes, ...]:
        key = (id(pattern), mid, mid_id, level_id if self._levels else None)
        bodies = self._bodies.get(key)
        if bodies is None:
            bodies = self._bodies[key] = make_bodies(
                pattern, mid=mid, mid_id=mid_id, level_id=level_id, levels=self._levels
            )
        return bodies

    async def request_offer(self, subscriber: str, publisher: str) -> tuple[str, str]:
        shape = self._shapes.get(publisher)
        if shape is None:
            raise LookupError(f"session {publisher} publishes no media")
        await self._close_earlier(subscriber, publisher)
        pc = RTCPeerConnection()
        sender = pc.addTrack(_IdleTrack())
        sub = LeanSubscription(next(self._sids), subscriber, publisher, pc, shape)

        async def take_over(parameters: Any) -> None:
            # stands in for RTCRtpSender.send: called by aiortc once DTLS is up
            try:
                self._take_over(sub, sender, parameters)
            except Exception:
                self.takeover_failures += 1
                log.exception("could not take over %s", sub.sid)

        # an instance attribute shadows the method for aiortc's connect task
        sender.send = take_over  # type: ignore[method-assign]

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and sub.stream is not None:
                self._ticker.remove(sub.stream)
                sub.stream.stopped()

        await pc.setLocalDescription(await pc.createOffer())
        if self._shapes.get(publisher) is not shape:
            await pc.close()
            raise LookupError(f"session {publisher} left")
        self._add(sub)
        return sub.sid, pc.localDescription.sdp

    def _take_over(self, sub: LeanSubscription, sender: Any, parameters: Any) -> None:
        if sub.stream is not None or self._subscriptions.get(sub.sid) is not sub:
            return
        codec = parameters.codecs[0]
        if codec.mimeType.lower() != "audio/opus":
            raise ValueError(f"negotiated {codec.mimeType}, not Opus")
        ids = {ext.uri: ext.id for ext in parameters.headerExtensions}
        dtls = sender.transport
        srtp = dtls._tx_srtp
        pair = dtls.transport._connection._nominated[1]
        original = pair.protocol.transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(original.fileno()))
        sock.setblocking(False)
        pattern = sub.shape.pattern
        bodies = self._bodies_for(
            pattern, parameters.muxId or None, ids.get(MID_URI), ids.get(AUDIO_LEVEL_URI)
        )
        rng = int.from_bytes(os.urandom(6))
        packetizer = Packetizer(
            ssrc=sender._ssrc,
            payload_type=codec.payloadType,
            # the lower half, as browsers and aiortc do: no early wrap for SRTP's rollover
            seq0=rng % 32768,
            ts0=(rng >> 16) & 0xFFFFFFFF,
            first=first_byte(bodies, pattern),
        )
        stream = LeanStream(
            self._ticker,
            sub.shape,
            bodies=bodies,
            packetizer=packetizer,
            srtp=srtp,
            sock=sock,
            addr=tuple(pair.remote_addr),
            cname=parameters.rtcp.cname or "",
        )
        sub.stream = stream
        self._ticker.add(stream)

    def _release(self, sub: LeanSubscription) -> None:
        if sub.stream is not None:
            self._ticker.remove(sub.stream)
            sub.stream.stopped()
            sub.stream.socket.close()

    def packets_sent(self) -> int:
        return sum(sub.track.sent for sub in self.subscriptions.values())
