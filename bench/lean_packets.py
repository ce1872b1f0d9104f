"""Browser-like RTP and RTCP for the lean load generator. Pure: no sockets.

A browser's microphone stream, as Janus forwards it, is Opus in 20 ms
packets with the negotiated payload type, one SSRC, sequence numbers and
timestamps (960 per packet at 48 kHz) that run on without gaps, RFC 8285
one-byte header extensions carrying the MID and the RFC 6464 audio level
(the V bit set while the microphone hears voice), and an RTCP sender report
with the CNAME about once a second.

What does not depend on the stream is computed once per stream *shape*:

* ``make_bodies``: per pattern position, the header extension block and the
  Opus payload as one ``bytes`` (shared by every stream with the same
  negotiated extension ids and MID);
* a ``Plan`` says which pattern position each packet of one loop plays (an
  active speaker's talk and pause from its offset, a meeting participant's
  turns and pauses) and keeps prefix sums, so the counts the harness asks
  for (talk packets, utterances, onsets, the last talk) over any range of
  packets are computed when asked, with no bookkeeping per packet.

A stream then only adds its 12-byte fixed header (``Packetizer``). The SRTP
protection cannot be computed once per shape or reused across loops: its
keystream and authentication tag depend on the SSRC and on the packet's
48-bit index (rollover counter and sequence number), which never repeats in
a stream, and a receiver's replay window refuses an index seen before.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from array import array
from dataclasses import dataclass

from bench.patterns import PACKET_SAMPLES, Pattern

RTP_HEADER = struct.Struct("!BBHII")
RTP_VERSION_BITS = 0x80
EXTENSION_BIT = 0x10
MARKER_BIT = 0x80
ONE_BYTE_PROFILE = 0xBEDE
VOICE_BIT = 0x80
SEQ_MASK = 0xFFFF
TIMESTAMP_MASK = 0xFFFFFFFF
NTP_UNIX_OFFSET = 2_208_988_800
"""Seconds from 1900 (NTP's epoch) to 1970 (Unix')."""
RTCP_SR = 200
RTCP_SDES = 202
SDES_CNAME = 1
MEASURABLE_GAP_PACKETS = 50
"""An onset after less silence than this cannot be matched to the word map
(the service's gate may not have closed): the same rule as ``bench.loadgen``."""


def extension_block(elements: list[tuple[int, bytes]]) -> bytes:
    """RFC 8285 one-byte header extension block (profile, length, elements,
    zero padding to 32 bits). Ids 1..14, values of 1..16 bytes."""
    data = bytearray()
    for element_id, value in elements:
        if not 1 <= element_id <= 14 or not 1 <= len(value) <= 16:
            raise ValueError(f"one-byte header extension {element_id} of {len(value)} bytes")
        data.append((element_id << 4) | (len(value) - 1))
        data += value
    data += bytes(-len(data) % 4)
    return struct.pack("!HH", ONE_BYTE_PROFILE, len(data) // 4) + bytes(data)


def level_byte(level: int, *, voiced: bool) -> int:
    """RFC 6464: V bit (voice activity) and the level in -dBov, 0..127."""
    return (VOICE_BIT if voiced else 0) | (min(127, max(0, level)) & 0x7F)


def make_bodies(
    pattern: Pattern, *, mid: str | None, mid_id: int | None, level_id: int | None, levels: bool = True
) -> tuple[bytes, ...]:
    """Per pattern position: the header extension block (MID, then the
    audio level with the V bit on talk positions, as a browser's VAD would
    set it) followed by the Opus payload. No block at all when there is
    nothing to carry."""
    bodies = []
    for position, payload in enumerate(pattern.payloads):
        elements: list[tuple[int, bytes]] = []
        if mid is not None and mid_id is not None:
            elements.append((mid_id, mid.encode()))
        if levels and level_id is not None:
            voiced = position < pattern.talk_packets
            elements.append((level_id, bytes([level_byte(pattern.levels[position], voiced=voiced)])))
        bodies.append((extension_block(elements) if elements else b"") + payload)
    return tuple(bodies)


def first_byte(bodies: tuple[bytes, ...], pattern: Pattern) -> int:
    """The RTP header's first byte for these bodies: version 2, X when the
    bodies start with an extension block."""
    has_block = bool(bodies) and len(bodies[0]) > len(pattern.payloads[0])
    return RTP_VERSION_BITS | (EXTENSION_BIT if has_block else 0)


def _prefix(flags: bytes | bytearray) -> array[int]:
    return array("I", itertools.accumulate(flags, initial=0))


@dataclass(frozen=True, slots=True)
class Plan:
    """One loop of a stream: the pattern position each packet plays and
    whether it is talk. Packet ``i`` of a stream started at ``start`` plays
    loop position ``(start + i) % len``."""

    positions: array[int]
    talk: bytes
    onset: bytes
    """1 where an utterance starts (talk after silence, looping)."""
    unmeasured: bytes
    """1 where an onset follows its previous utterance too closely for the word map."""
    _talk_sum: array[int]
    _onset_sum: array[int]
    _talk_positions: array[int]
    _onset_positions: array[int]

    @classmethod
    def build(cls, positions: list[int], talk: bytes) -> Plan:
        if not positions or len(positions) != len(talk):
            raise ValueError("a plan needs as many talk flags as positions, at least one")
        size = len(talk)
        onset = bytes(1 if talk[i] and not talk[i - 1] else 0 for i in range(size))
        unmeasured = bytearray(size)
        if any(onset) and not all(talk):
            for i in (i for i in range(size) if onset[i]):
                gap = 0
                j = i - 1
                while gap < MEASURABLE_GAP_PACKETS and not talk[j % size]:
                    gap += 1
                    j -= 1
                unmeasured[i] = gap < MEASURABLE_GAP_PACKETS
        return cls(
            array("H", positions),
            bytes(talk),
            onset,
            bytes(unmeasured),
            _prefix(talk),
            _prefix(onset),
            array("I", (i for i in range(size) if talk[i])),
            array("I", (i for i in range(size) if onset[i])),
        )

    @property
    def period(self) -> int:
        return len(self.talk)

    def position(self, start: int, index: int) -> int:
        return self.positions[(start + index) % len(self.talk)]

    def is_talk(self, start: int, index: int) -> bool:
        return bool(self.talk[(start + index) % len(self.talk)])

    def _count(self, sums: array[int], n: int) -> int:
        loops, rest = divmod(n, len(self.talk))
        return loops * sums[-1] + sums[rest]

    def talk_between(self, start: int, first: int, end: int) -> int:
        """Talk packets among packets ``first`` .. ``end - 1``."""
        if end <= first:
            return 0
        return self._count(self._talk_sum, start + end) - self._count(self._talk_sum, start + first)

    def onsets_between(self, start: int, first: int, end: int) -> int:
        if end <= first:
            return 0
        return self._count(self._onset_sum, start + end) - self._count(self._onset_sum, start + first)

    def onset_indexes(self, start: int, first: int, end: int) -> list[int]:
        """Packet indexes of the onsets among packets ``first`` .. ``end - 1``, in order."""
        if end <= first or not self._onset_positions:
            return []
        period = len(self.talk)
        out: list[int] = []
        loop, rest = divmod(start + first, period)
        k = bisect.bisect_left(self._onset_positions, rest)
        while True:
            if k == len(self._onset_positions):
                loop += 1
                k = 0
            index = loop * period + self._onset_positions[k] - start
            if index >= end:
                return out
            out.append(index)
            k += 1

    def last_talk(self, start: int, before: int) -> int | None:
        """The index of the last talk packet before packet ``before``; None
        when there is none at or after packet 0."""
        if before <= 0 or not self._talk_positions:
            return None
        period = len(self.talk)
        loop, rest = divmod(start + before, period)
        k = bisect.bisect_left(self._talk_positions, rest) - 1
        if k < 0:
            loop -= 1
            k = len(self._talk_positions) - 1
        index = loop * period + self._talk_positions[k] - start
        return index if index >= 0 else None


def pattern_plan(pattern: Pattern) -> Plan:
    """An active speaker: the pattern's talk then its pause, looped."""
    return Plan.build(
        list(range(pattern.period)),
        bytes(1 if p < pattern.talk_packets else 0 for p in range(pattern.period)),
    )


def schedule_plan(pattern: Pattern, schedule: bytes) -> Plan:
    """A meeting participant (``bench.meeting.talk_schedule``): each turn
    plays the pattern's talk from its start (looping it when longer), each
    pause the pattern's noise floor from its start, as ``loadgen.ScheduledTrack``."""
    talk_len = max(1, pattern.talk_packets)
    pause_len = max(1, pattern.pause_packets)
    positions = []
    talk_cursor = pause_cursor = 0
    talking = False
    for on in schedule:
        if on and pattern.talk_packets:
            if not talking:
                talk_cursor = 0
            positions.append(talk_cursor % talk_len)
            talk_cursor += 1
            talking = True
        else:
            if talking:
                pause_cursor = 0
            positions.append(pattern.talk_packets + pause_cursor % pause_len)
            pause_cursor += 1
            talking = False
    talk = bytes(1 if on and pattern.talk_packets else 0 for on in schedule)
    return Plan.build(positions, talk)


def hush_position(pattern: Pattern, index: int) -> int:
    """The pattern position a hushed stream plays at packet ``index``: its noise floor."""
    if pattern.pause_packets == 0:
        raise ValueError("a pattern without a pause cannot be hushed")
    return pattern.talk_packets + index % pattern.pause_packets


@dataclass(frozen=True, slots=True)
class Packetizer:
    """One stream's RTP header: SSRC, payload type, where its sequence
    numbers and timestamps start. Packet ``i`` gets sequence number
    ``seq0 + i`` and timestamp ``ts0 + 960 i`` (both wrapping)."""

    ssrc: int
    payload_type: int
    seq0: int
    ts0: int
    first: int = RTP_VERSION_BITS | EXTENSION_BIT

    def sequence(self, index: int) -> int:
        return (self.seq0 + index) & SEQ_MASK

    def timestamp(self, index: int) -> int:
        return (self.ts0 + index * PACKET_SAMPLES) & TIMESTAMP_MASK

    def packets(self, bodies: list[bytes], first_index: int) -> list[bytes]:
        """Plain RTP packets for ``bodies``, numbered from ``first_index``.
        Packet 0 carries the marker bit (the start of the talkspurt: a
        browser without DTX sends one talkspurt)."""
        pack = RTP_HEADER.pack
        first, pt, ssrc = self.first, self.payload_type, self.ssrc
        seq, ts = self.seq0 + first_index, self.ts0 + first_index * PACKET_SAMPLES
        out = [
            pack(first, pt, (seq + k) & SEQ_MASK, (ts + k * PACKET_SAMPLES) & TIMESTAMP_MASK, ssrc) + body
            for k, body in enumerate(bodies)
        ]
        if first_index == 0 and out:
            out[0] = bytes([out[0][0], out[0][1] | MARKER_BIT]) + out[0][2:]
        return out


def sender_report(
    ssrc: int, *, unix_time: float, rtp_timestamp: int, packets: int, octets: int, cname: str
) -> bytes:
    """A compound RTCP packet as a browser sends it: sender report (no
    report blocks: the stream is send-only) and SDES with the CNAME."""
    ntp = unix_time + NTP_UNIX_OFFSET
    seconds = int(ntp)
    fraction = int((ntp - seconds) * (1 << 32)) & 0xFFFFFFFF
    report = struct.pack(
        "!BBHIIIIII",
        RTP_VERSION_BITS,
        RTCP_SR,
        6,
        ssrc,
        seconds & 0xFFFFFFFF,
        fraction,
        rtp_timestamp & TIMESTAMP_MASK,
        packets & 0xFFFFFFFF,
        octets & 0xFFFFFFFF,
    )
    text = cname.encode()[:255]
    chunk = struct.pack("!IBB", ssrc, SDES_CNAME, len(text)) + text + b"\x00"
    chunk += bytes(-len(chunk) % 4)
    sdes = struct.pack("!BBH", RTP_VERSION_BITS | 1, RTCP_SDES, len(chunk) // 4) + chunk
    return report + sdes
