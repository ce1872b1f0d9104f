"""The kernel silence filter, on a real UDP socket: it must drop exactly the
packets the Python parser reads as silent audio, and nothing else."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live_transcription.media import kernel_filter
from live_transcription.media.kernel_filter import SocketFilters, silence_filter
from live_transcription.media.lean_receiver import AUDIO_LEVEL_URI
from live_transcription.media.rtp_level import audio_level

pytestmark = pytest.mark.skipif(not kernel_filter.SUPPORTED, reason="socket filters are Linux's")

OPUS = (111, 109)
DROP_QUIETER_THAN = 65
MARKER = b"end-of-batch"


def extensions_map(level_id: int) -> HeaderExtensionsMap:
    others = [i for i in range(1, 15) if i != level_id]
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(level_id, AUDIO_LEVEL_URI),
                RTCRtpHeaderExtensionParameters(others[0], "urn:ietf:params:rtp-hdrext:sdes:mid"),
                RTCRtpHeaderExtensionParameters(
                    others[1], "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
                ),
                RTCRtpHeaderExtensionParameters(
                    others[2], "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
                ),
            ]
        )
    )
    return extensions


class Receiver:
    """A socket with the filter on it, and a way to tell which datagrams got through."""

    def __init__(self, level_id: int = 1) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.filters = SocketFilters([self.sock])
        self.program = silence_filter(level_id, OPUS, DROP_QUIETER_THAN)

    def passes(self, datagram: bytes) -> bool:
        # loopback delivers in order: once the marker is read, the datagram
        # before it was either queued or dropped by the filter
        self.sender.sendto(datagram, self.sock.getsockname())
        self.sender.sendto(MARKER, self.sock.getsockname())
        got = []
        while (data := self.sock.recv(4096)) != MARKER:
            got.append(data)
        assert got in ([], [datagram])
        return bool(got)

    def close(self) -> None:
        self.filters.close()
        self.sock.close()
        self.sender.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    assert r.filters.attach(r.program)
    yield r
    r.close()


def rtp(seq: int, level: int | None, payload_type: int = 111, level_id: int = 1, **extra: object) -> bytes:
    packet = RtpPacket(payload_type=payload_type, sequence_number=seq, timestamp=seq * 960, ssrc=1)
    if level is not None:
        packet.extensions.audio_level = (False, level)
    for name, value in extra.items():
        setattr(packet.extensions, name, value)
    packet.payload = bytes(40)
    return bytes(packet.serialize(extensions_map(level_id))) + bytes(10)


def should_drop(datagram: bytes, level_id: int = 1) -> bool:
    """The reference: the Python parser's reading of the same datagram."""
    packet = RtpPacket.parse(datagram)
    level = audio_level(datagram, level_id)
    return (
        packet.payload_type in OPUS
        and level is not None
        and level > DROP_QUIETER_THAN
        and packet.sequence_number % 128 != 0
    )


def test_silent_audio_is_dropped_and_voiced_or_quiet_audio_passes(receiver: Receiver) -> None:
    assert not receiver.passes(rtp(1, 127))
    assert not receiver.passes(rtp(2, DROP_QUIETER_THAN + 1))
    assert receiver.passes(rtp(3, DROP_QUIETER_THAN))
    assert receiver.passes(rtp(4, 20))
    assert receiver.passes(rtp(5, None))  # no level: the process decides


def test_one_sequence_number_in_128_passes_whatever_its_level(receiver: Receiver) -> None:
    passed = [seq for seq in range(65_000, 65_536 + 300) if receiver.passes(rtp(seq & 0xFFFF, 127))]
    assert [seq & 0xFFFF for seq in passed] == [65_024, 65_152, 65_280, 65_408, 0, 128, 256]


def test_everything_that_is_not_audio_rtp_passes(receiver: Receiver) -> None:
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    dtls = b"\x16\xfe\xfd" + bytes(40)
    rtcp_rr = b"\x81\xc9\x00\x07" + bytes(28)
    assert receiver.passes(stun)
    assert receiver.passes(dtls)
    assert receiver.passes(rtcp_rr)
    assert receiver.passes(rtp(1, 127, payload_type=0))  # not an audio payload type we receive
    assert receiver.passes(b"\x90")  # too short to hold anything
    assert receiver.passes(b"")


def test_the_level_is_found_behind_csrcs_and_other_extensions(receiver: Receiver) -> None:
    packet = RtpPacket(payload_type=111, sequence_number=7, timestamp=0, ssrc=1)
    packet.csrc = [5, 6, 7]
    packet.extensions.mid = "audio0"
    packet.extensions.abs_send_time = 0x123456
    packet.extensions.transport_sequence_number = 300
    packet.extensions.audio_level = (True, 100)
    data = bytes(packet.serialize(extensions_map(1)))
    assert audio_level(data, 1) == 100
    assert not receiver.passes(data)


def test_after_detach_everything_passes(receiver: Receiver) -> None:
    receiver.filters.detach()
    assert receiver.passes(rtp(1, 127))
    assert receiver.filters.attach(receiver.program)
    assert not receiver.passes(rtp(2, 127))
    assert receiver.filters.attaches == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seq=st.integers(0, 0xFFFF),
    level=st.none() | st.integers(0, 127),
    payload_type=st.sampled_from([111, 109, 0, 96, 127]),
    csrcs=st.integers(0, 15),
    mid=st.none() | st.text("abc0123456789", min_size=1, max_size=16),
    abs_send_time=st.none() | st.integers(0, (1 << 24) - 1),
    transport_seq=st.none() | st.integers(0, 0xFFFF),
)
def test_the_kernel_agrees_with_the_python_parser(
    receiver: Receiver,
    *,
    seq: int,
    level: int | None,
    payload_type: int,
    csrcs: int,
    mid: str | None,
    abs_send_time: int | None,
    transport_seq: int | None,
) -> None:
    packet = RtpPacket(payload_type=payload_type, sequence_number=seq, timestamp=1, ssrc=9)
    packet.csrc = [1] * csrcs
    if level is not None:
        packet.extensions.audio_level = (False, level)
    packet.extensions.mid = mid
    packet.extensions.abs_send_time = abs_send_time
    packet.extensions.transport_sequence_number = transport_seq
    packet.payload = bytes(20)
    data = bytes(packet.serialize(extensions_map(1)))
    assert receiver.passes(data) != should_drop(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=80) | st.binary(min_size=2, max_size=80).map(lambda b: b"\x90\x6f" + b))
def test_only_audio_rtp_with_extensions_is_ever_dropped(receiver: Receiver, data: bytes) -> None:
    # STUN, DTLS, RTCP, other payload types: never; a truncated or malformed
    # audio packet may be (SRTP would refuse it anyway)
    if not receiver.passes(data):
        assert data[0] & 0xD0 == 0x90 and data[1] & 0x7F in OPUS


def test_programs_are_validated() -> None:
    with pytest.raises(ValueError, match="one-byte"):
        silence_filter(15, OPUS, 65)
    with pytest.raises(ValueError, match="level"):
        silence_filter(1, OPUS, 128)
    with pytest.raises(ValueError, match="payload"):
        silence_filter(1, [], 65)


def test_a_refused_program_turns_the_filters_off(caplog: pytest.LogCaptureFixture) -> None:
    r = Receiver()
    try:
        with caplog.at_level(logging.WARNING):
            assert not r.filters.attach(b"\x06\x00\x00\x00")  # half an instruction
        assert r.filters.failed and not r.filters.attached
        assert "refused" in caplog.text
        assert not r.filters.attach(r.program)  # stays off, no second warning
        assert caplog.text.count("refused") == 1
        assert r.passes(rtp(1, 127))
    finally:
        r.close()
