"""The audio level read from raw RTP bytes agrees with aiortc's own parser,
for both header-extension forms, and garbage never raises."""

from __future__ import annotations

from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtcpRrPacket, RtpPacket, pack_header_extensions
from hypothesis import given, settings
from hypothesis import strategies as st

from live_transcription.media.rtp_level import audio_level, payload_bounds, rtp_payload_type

LEVEL_ID = 1
EXTENSIONS = HeaderExtensionsMap()
EXTENSIONS.configure(
    RTCRtpParameters(
        headerExtensions=[
            RTCRtpHeaderExtensionParameters(LEVEL_ID, "urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
            RTCRtpHeaderExtensionParameters(2, "urn:ietf:params:rtp-hdrext:sdes:mid"),
        ]
    )
)

other_extensions = st.lists(
    st.tuples(
        st.integers(2, 255).filter(lambda i: i != 15),
        st.binary(min_size=1, max_size=20),
    ),
    max_size=4,
    unique_by=lambda item: item[0],
)


def datagram(
    extensions: list[tuple[int, bytes]], *, csrcs: int = 0, payload_type: int = 111, seq: int = 1
) -> bytes:
    profile, value = pack_header_extensions(extensions)
    packet = RtpPacket(payload_type=payload_type, sequence_number=seq, timestamp=960 * seq, ssrc=1234)
    packet.csrc = list(range(1, csrcs + 1))
    packet.extensions.audio_level = None
    packet.payload = b"\xfc\x01\x02encrypted-opus"
    data = bytearray(packet.serialize())
    if extensions:
        # serialize() writes only known extensions: splice in the raw ones
        header = 12 + 4 * csrcs
        data[0] |= 0x10
        block = profile.to_bytes(2, "big") + (len(value) // 4).to_bytes(2, "big") + value
        data[header:header] = block
    return bytes(data)


@given(
    level=st.integers(0, 127),
    voice=st.booleans(),
    before=other_extensions,
    after=other_extensions,
    csrcs=st.integers(0, 3),
)
def test_level_matches_what_was_written(
    level: int,
    voice: bool,
    before: list[tuple[int, bytes]],
    after: list[tuple[int, bytes]],
    csrcs: int,
) -> None:
    after = [item for item in after if item[0] not in {i for i, _ in before}]
    extensions = [*before, (LEVEL_ID, bytes([(0x80 if voice else 0) | level])), *after]
    data = datagram(extensions, csrcs=csrcs)
    assert audio_level(data, LEVEL_ID) == level
    assert rtp_payload_type(data) == 111
    # the same bytes through aiortc's parser (one-byte form when it applies)
    parsed = RtpPacket.parse(data)
    assert parsed.payload == b"\xfc\x01\x02encrypted-opus"


@given(others=other_extensions)
def test_no_level_extension_gives_none(others: list[tuple[int, bytes]]) -> None:
    assert audio_level(datagram(others), LEVEL_ID) is None


def test_both_header_forms_are_read() -> None:
    one_byte = datagram([(LEVEL_ID, b"\x2a")])
    two_byte = datagram([(LEVEL_ID, b"\x2a"), (20, b"long-form-id")])
    assert one_byte[12:14] == b"\xbe\xde"
    assert two_byte[12:14] == b"\x10\x00"
    assert audio_level(one_byte, LEVEL_ID) == 42
    assert audio_level(two_byte, LEVEL_ID) == 42
    assert audio_level(one_byte, 3) is None


def test_padding_between_elements_is_skipped() -> None:
    value = b"\x00\x00" + bytes([(LEVEL_ID << 4) | 0, 0x85]) + b"\x00\x00\x00\x00"
    data = bytearray(datagram([]))
    data[0] |= 0x10
    data[12:12] = b"\xbe\xde" + (len(value) // 4).to_bytes(2, "big") + value
    assert audio_level(bytes(data), LEVEL_ID) == 5


def test_rtcp_stun_and_dtls_are_not_rtp() -> None:
    report = bytes(RtcpRrPacket(ssrc=1, reports=[]))
    assert rtp_payload_type(report) is None
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    assert rtp_payload_type(stun) is None
    dtls = b"\x17\xfe\xfd" + bytes(20)
    assert rtp_payload_type(dtls) is None
    assert rtp_payload_type(b"\x80") is None


@given(st.binary(max_size=80), st.integers(1, 255))
def test_garbage_never_raises(data: bytes, extension_id: int) -> None:
    level = audio_level(data, extension_id)
    assert level is None or 0 <= level <= 127
    payload_type = rtp_payload_type(data)
    assert payload_type is None or 0 <= payload_type <= 127


@given(st.binary(min_size=13, max_size=60), st.integers(0, 60))
def test_a_truncated_extension_block_gives_none_or_a_level(tail: bytes, cut: int) -> None:
    data = datagram([(LEVEL_ID, b"\x10"), (2, b"0123456789")]) + tail
    level = audio_level(data[: 12 + cut], LEVEL_ID)
    assert level is None or level == 0x10


@settings(max_examples=300, deadline=None)
@given(
    csrcs=st.integers(0, 15),
    level=st.none() | st.integers(0, 127),
    mid=st.none() | st.text("abc0123456789", min_size=1, max_size=16),
    payload=st.binary(max_size=200),
    padding=st.integers(0, 40),
)
def test_payload_bounds_agree_with_aiortc(
    csrcs: int, level: int | None, mid: str | None, payload: bytes, padding: int
) -> None:
    packet = RtpPacket(payload_type=111, sequence_number=1, timestamp=2, ssrc=3)
    packet.csrc = list(range(csrcs))
    if level is not None:
        packet.extensions.audio_level = (False, level)
    packet.extensions.mid = mid
    packet.payload = payload
    packet.padding_size = padding
    data = bytes(packet.serialize(EXTENSIONS))
    bounds = payload_bounds(data)
    assert bounds is not None
    assert data[bounds[0] : bounds[1]] == RtpPacket.parse(data, EXTENSIONS).payload == payload


@given(data=st.binary(max_size=64))
def test_payload_bounds_never_raise_and_stay_inside(data: bytes) -> None:
    bounds = payload_bounds(data)
    if bounds is not None:
        assert 0 <= bounds[0] <= bounds[1] <= len(data)
