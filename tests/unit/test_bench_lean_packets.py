"""The lean generator's packets: browser-like RTP built from per-shape
bodies, protected ahead of time, continuous across loops and refills, with
the audio level in the clear and RTCP sender reports."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtcpPacket, RtcpSdesPacket, RtcpSrPacket, RtpPacket
from bench.lean_bridge import FastProtect, LeanStream, SendTicker, Shape
from bench.lean_packets import (
    Packetizer,
    first_byte,
    hush_position,
    make_bodies,
    pattern_plan,
    schedule_plan,
    sender_report,
)
from bench.meeting import MixShape, talk_schedule
from bench.patterns import Pattern
from pylibsrtp import Policy, Session

from live_transcription.media.rtp_level import audio_level, payload_bounds

MID_ID, LEVEL_ID = 1, 2
TALK, PAUSE = 6, 4


def small_pattern() -> Pattern:
    """Ten packets, six of talk then four of noise floor; payload k is k+1 repeated."""
    payloads = tuple(bytes([k + 1]) * (20 + k) for k in range(TALK + PAUSE))
    levels = tuple([20 + k for k in range(TALK)] + [75] * PAUSE)
    return Pattern(payloads, levels, TALK)


def extension_map() -> HeaderExtensionsMap:
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=MID_ID, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
                RTCRtpHeaderExtensionParameters(
                    id=LEVEL_ID, uri="urn:ietf:params:rtp-hdrext:ssrc-audio-level"
                ),
            ]
        )
    )
    return extensions


def sessions() -> tuple[Session, Session]:
    key = os.urandom(30)
    receiver = Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND)
    receiver.window_size = 1024
    sender = Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND)
    sender.allow_repeat_tx = True
    sender.window_size = 1024
    return Session(sender), Session(receiver)


def test_packets_are_browser_like_rtp_with_mid_and_level() -> None:
    pattern = small_pattern()
    bodies = make_bodies(pattern, mid="0", mid_id=MID_ID, level_id=LEVEL_ID)
    packetizer = Packetizer(
        ssrc=0x1234ABCD, payload_type=111, seq0=100, ts0=5000, first=first_byte(bodies, pattern)
    )
    plan = pattern_plan(pattern)
    packets = packetizer.packets([bodies[plan.position(0, i)] for i in range(pattern.period)], 0)
    for index, raw in enumerate(packets):
        packet = RtpPacket.parse(raw, extension_map())
        assert packet.version == 2
        assert packet.payload_type == 111
        assert packet.ssrc == 0x1234ABCD
        assert packet.sequence_number == 100 + index
        assert packet.timestamp == 5000 + 960 * index
        assert packet.marker == (index == 0)
        assert packet.payload == pattern.payloads[index]
        assert packet.extensions.mid == "0"
        voiced = index < TALK
        assert packet.extensions.audio_level == (voiced, pattern.levels[index])
        # what the service reads before decrypting, and after
        assert audio_level(raw, LEVEL_ID) == pattern.levels[index]
        bounds = payload_bounds(raw)
        assert bounds is not None and raw[bounds[0] : bounds[1]] == pattern.payloads[index]


def test_without_levels_the_packets_carry_only_the_mid() -> None:
    pattern = small_pattern()
    bodies = make_bodies(pattern, mid="0", mid_id=MID_ID, level_id=LEVEL_ID, levels=False)
    packet = Packetizer(1, 96, 0, 0, first=first_byte(bodies, pattern)).packets([bodies[0]], 0)[0]
    assert audio_level(packet, LEVEL_ID) is None
    assert RtpPacket.parse(packet, extension_map()).extensions.mid == "0"
    bare = make_bodies(pattern, mid=None, mid_id=None, level_id=None)
    assert bare == pattern.payloads
    plain = Packetizer(1, 96, 0, 0, first=first_byte(bare, pattern)).packets([bare[0]], 0)[0]
    assert plain[0] == 0x80 and RtpPacket.parse(plain).payload == pattern.payloads[0]


def test_sequence_numbers_and_timestamps_run_on_across_loops_and_wrap() -> None:
    pattern = small_pattern()
    bodies = make_bodies(pattern, mid="0", mid_id=MID_ID, level_id=LEVEL_ID)
    packetizer = Packetizer(7, 111, seq0=65530, ts0=2**32 - 2000, first=first_byte(bodies, pattern))
    plan = pattern_plan(pattern)
    start = 3
    packets: list[bytes] = []
    # three loops of the period, built in batches of 7 (not a divisor of the period)
    for first in range(0, 3 * pattern.period, 7):
        packets += packetizer.packets(
            [bodies[plan.position(start, i)] for i in range(first, first + 7)], first
        )
    parsed = [RtpPacket.parse(p, extension_map()) for p in packets]
    for index, packet in enumerate(parsed):
        assert packet.sequence_number == (65530 + index) % 65536
        assert packet.timestamp == (2**32 - 2000 + 960 * index) % 2**32
        assert packet.payload == pattern.payloads[(start + index) % pattern.period]
        assert packet.marker == (index == 0)
    assert parsed[6].sequence_number == 0  # wrapped


def test_protected_ahead_the_packets_decrypt_and_keep_the_level_in_the_clear() -> None:
    pattern = small_pattern()
    bodies = make_bodies(pattern, mid="0", mid_id=MID_ID, level_id=LEVEL_ID)
    packetizer = Packetizer(99, 111, 1000, 0, first=first_byte(bodies, pattern))
    plain = packetizer.packets([bodies[i % pattern.period] for i in range(50)], 0)
    fast_sender, receiver = sessions()
    protect = FastProtect(fast_sender)
    protected = [protect(p) for p in plain]
    # the same bytes as pylibsrtp's own protect with the same key
    key = os.urandom(30)
    fast_twin = FastProtect(Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND)))
    slow_twin = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    assert [fast_twin(p) for p in plain[:5]] == [slow_twin.protect(p) for p in plain[:5]]
    for raw, secret in zip(plain, protected, strict=True):
        assert secret != raw and len(secret) == len(raw) + 10  # HMAC-SHA1-80 tag
        assert audio_level(secret, LEVEL_ID) == audio_level(raw, LEVEL_ID)
        assert receiver.unprotect(secret) == raw


def test_sender_report_and_cname_parse_as_rtcp() -> None:
    raw = sender_report(
        0xCAFE, unix_time=1_700_000_000.25, rtp_timestamp=123_456, packets=50, octets=4000, cname="abc-1"
    )
    assert len(raw) % 4 == 0
    report, sdes = RtcpPacket.parse(raw)
    assert isinstance(report, RtcpSrPacket) and isinstance(sdes, RtcpSdesPacket)
    assert report.ssrc == 0xCAFE
    assert report.sender_info.packet_count == 50
    assert report.sender_info.octet_count == 4000
    assert report.sender_info.rtp_timestamp == 123_456
    assert report.sender_info.ntp_timestamp >> 32 == 1_700_000_000 + 2_208_988_800
    assert (report.sender_info.ntp_timestamp & 0xFFFFFFFF) == 1 << 30
    assert sdes.chunks[0].ssrc == 0xCAFE and sdes.chunks[0].items == [(1, b"abc-1")]


def brute_onsets(talk: list[int]) -> list[int]:
    return [i for i in range(len(talk)) if talk[i] and (i == 0 or not talk[i - 1])]


def test_the_plan_counts_over_any_range_as_packet_by_packet() -> None:
    pattern = small_pattern()
    schedule = talk_schedule(MixShape(talk_share=0.3, turn_median_s=0.2), 5, 4.0)
    plan = schedule_plan(pattern, schedule)
    assert plan.period == len(schedule)
    for start in (0, 17, plan.period - 1):
        talk = [plan.talk[(start + i) % plan.period] for i in range(3 * plan.period)]
        # as the stream sends it: onsets need the talk before packet 0 too
        before = plan.talk[(start - 1) % plan.period]
        onsets = [i for i in range(len(talk)) if talk[i] and not (talk[i - 1] if i else before)]
        for first, end in (
            (0, 1),
            (0, plan.period),
            (5, 2 * plan.period + 3),
            (plan.period, 3 * plan.period),
        ):
            assert plan.talk_between(start, first, end) == sum(talk[first:end])
            assert plan.onset_indexes(start, first, end) == [i for i in onsets if first <= i < end]
            assert plan.onsets_between(start, first, end) == len([i for i in onsets if first <= i < end])
        for before_index in (1, 40, plan.period + 3, 3 * plan.period):
            expected = max((i for i in range(before_index) if talk[i]), default=None)
            assert plan.last_talk(start, before_index) == expected


def test_a_meeting_plan_starts_every_turn_at_the_start_of_the_talk() -> None:
    pattern = small_pattern()
    schedule = bytes([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0])
    plan = schedule_plan(pattern, schedule)
    assert list(plan.positions) == [6, 7, 0, 1, 2, 3, 4, 5, 0, 1, 6, 7, 8, 9, 6, 0, 1, 6]
    assert plan.onset_indexes(0, 0, len(schedule)) == [2, 15]
    assert plan.unmeasured[15] == 1  # five packets after the previous turn
    assert hush_position(pattern, 13) == TALK + 13 % PAUSE


# --- the stream on its ticker, over a real socket -------------------------------------------


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


async def test_a_stream_sends_one_packet_per_tick_of_its_phase_with_reports_and_hush(
    udp_pair: tuple[socket.socket, socket.socket],
) -> None:
    sender_socket, receiver_socket = udp_pair
    pattern = small_pattern()
    bodies = make_bodies(pattern, mid="0", mid_id=MID_ID, level_id=LEVEL_ID)
    tx, rx = sessions()
    # 7 ahead: the hush and its end fall inside a batch, whose packets are protected again
    ticker = SendTicker(phases=2, ahead=7)
    packetizer = Packetizer(42, 111, seq0=65533, ts0=0, first=first_byte(bodies, pattern))
    stream = LeanStream(
        ticker,
        Shape(pattern, pattern_plan(pattern), start=TALK - 2, scheduled=False),
        bodies=bodies,
        packetizer=packetizer,
        srtp=tx,
        sock=sender_socket,
        addr=receiver_socket.getsockname(),
        cname="cname-42",
    )
    ticker.add(stream)
    loop = asyncio.get_running_loop()
    # the timer is driven by hand: 2 phases, so 2 ticks per packet
    for _ in range(2 * 60):
        ticker.send_tick(loop.time())
    ticker.hushed = True
    for _ in range(2 * 10):
        ticker.send_tick(loop.time())
    ticker.hushed = False
    for _ in range(2 * 5):
        ticker.send_tick(loop.time())
    assert stream.sent == 75
    assert ticker.send_errors == 0
    # one report a second (50 packets), from the stream's first packet
    assert ticker.reports_sent == 2
    received = []
    reports: list[RtcpSrPacket] = []
    for _ in range(75 + 2):
        data = await asyncio.to_thread(receiver_socket.recv, 2048)
        if 192 <= data[1] <= 223:
            report = RtcpPacket.parse(rx.unprotect_rtcp(data))[0]
            assert isinstance(report, RtcpSrPacket)
            reports.append(report)
        else:
            received.append(RtpPacket.parse(rx.unprotect(data), extension_map()))
    assert [p.sequence_number for p in received] == [(65533 + i) % 65536 for i in range(75)]
    assert [p.timestamp for p in received] == [960 * i for i in range(75)]
    # from pattern position TALK - 2: two talk packets, then the pause, looped
    normal = [*range(60), *range(70, 75)]
    for i in normal:
        assert received[i].payload == pattern.payloads[(TALK - 2 + i) % pattern.period]
    for i in range(60, 70):  # hushed: the noise floor, not the talk
        assert received[i].payload == pattern.payloads[hush_position(pattern, i)]
        assert received[i].extensions.audio_level == (False, 75)
    assert all(r.ssrc == 42 for r in reports)
    assert [r.sender_info.packet_count for r in reports] == [1, 51]
    assert reports[1].sender_info.octet_count == sum(len(p.payload) for p in received[:51])
    assert reports[1].sender_info.rtp_timestamp >= 960 * 50
    # what the harness derives instead of counting per packet
    assert stream.time_of(0) is not None and stream.time_of(75) is None
    talk = [(TALK - 2 + i) % pattern.period < TALK for i in range(75)]
    expected_talk = sum(talk[i] for i in normal)
    assert stream.talk_packets == expected_talk
    stream.talk_packets = 0
    assert stream.talk_packets == 0 and stream.utterances == 0
