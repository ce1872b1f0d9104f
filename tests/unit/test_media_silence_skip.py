"""SilenceSkipper: silent packets outside an utterance are held back before
decryption, the pre-roll still reaches the audio path in order, and libsrtp
keeps authenticating after any length of skipped silence."""

from __future__ import annotations

import itertools
import os

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from hypothesis import given
from hypothesis import strategies as st
from pylibsrtp import Error as SrtpError
from pylibsrtp import Policy, Session

from live_transcription.media.lean_receiver import AUDIO_LEVEL_URI
from live_transcription.media.silence_skip import SilenceSkipper

LEVEL_ID = 1
OPUS = 111
SILENT = 127
VOICED = 30
THRESHOLD = 50
FIRST_SEQ = 40_000


class Gate:
    def __init__(self, preroll_packets: int = 3) -> None:
        self.speaking = False
        self.silence_level_dbov = THRESHOLD
        self.preroll_packets = preroll_packets
        self.kernel_drop_level: int | None = None


class Clock:
    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time


def rtp(seq: int, level: int | None, payload_type: int = OPUS) -> bytes:
    packet = RtpPacket(
        payload_type=payload_type, sequence_number=seq % 65536, timestamp=960 * seq % 2**32, ssrc=42
    )
    packet.payload = b"\xfc" + bytes(40)
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(headerExtensions=[RTCRtpHeaderExtensionParameters(LEVEL_ID, AUDIO_LEVEL_URI)])
    )
    if level is not None:
        packet.extensions.audio_level = (False, level)
    return bytes(packet.serialize(extensions))


def seq_of(data: bytes) -> int:
    return int.from_bytes(data[2:4], "big")


class Harness:
    def __init__(self, preroll_packets: int = 3, resync_every: int = 500) -> None:
        self.gate = Gate(preroll_packets)
        self.clock = Clock()
        self.delivered: list[bytes] = []
        self.skipper = SilenceSkipper(self.gate, now=self.clock.now, resync_every=resync_every)
        self.skipper.attach(lambda data, component: self.delivered.append(data))
        self.skipper.configure(LEVEL_ID, frozenset({OPUS}))

    def send(self, seq: int, level: int | None) -> None:
        self.skipper.datagram(rtp(seq, level), 1)

    def delivered_seqs(self) -> list[int]:
        return [seq_of(d) for d in self.delivered]


def test_inert_until_configured() -> None:
    gate = Gate()
    delivered: list[bytes] = []
    skipper = SilenceSkipper(gate, now=lambda: 0.0)
    skipper.attach(lambda data, component: delivered.append(data))
    for seq in range(10):
        skipper.datagram(rtp(seq, SILENT), 1)
    assert len(delivered) == 10 and skipper.skipped == 0


def test_silence_is_held_and_released_as_preroll_before_speech() -> None:
    h = Harness(preroll_packets=3)
    for seq in range(10):
        h.send(seq, SILENT)
    assert h.delivered == []
    assert h.skipper.skipped == 7  # three are held as pre-roll
    h.send(10, VOICED)
    assert h.delivered_seqs() == [7, 8, 9, 10]


def test_inside_an_utterance_silence_goes_on() -> None:
    h = Harness()
    h.gate.speaking = True  # the audio path's hangover wants the silence
    for seq in range(5):
        h.send(seq, SILENT)
    assert h.delivered_seqs() == [0, 1, 2, 3, 4]
    assert h.skipper.skipped == 0


def test_packets_without_a_level_other_types_and_non_rtp_go_on() -> None:
    h = Harness()
    h.send(0, None)
    h.skipper.datagram(rtp(1, SILENT, payload_type=0), 1)
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    h.skipper.datagram(stun, 1)
    rtcp = b"\x80\xc9\x00\x01" + bytes(4)
    h.skipper.datagram(rtcp, 1)
    assert len(h.delivered) == 4 and h.skipper.skipped == 0


def test_a_long_silence_lets_one_packet_through_now_and_then() -> None:
    h = Harness(preroll_packets=3, resync_every=100)
    for seq in range(1000):
        h.send(seq, SILENT)
    passed = h.delivered_seqs()
    assert passed == list(range(100, 1000, 100)) and h.skipper.resyncs == 9
    assert h.skipper.skipped == 1000 - 9 - 3  # three still held


def test_resync_goes_by_sequence_numbers_across_the_wrap() -> None:
    # the kernel filter hands over only some packets: distance, not count, decides
    h = Harness(preroll_packets=3, resync_every=500)
    for seq in range(65000, 65536 + 2000, 128):
        h.send(seq & 0xFFFF, SILENT)
    passed = h.delivered_seqs()
    assert passed and all((b - a) & 0xFFFF == 512 for a, b in itertools.pairwise(passed))


def test_liveness_counts_skipped_packets() -> None:
    h = Harness()
    h.clock.time = 12.5
    h.send(0, SILENT)
    assert h.delivered == [] and h.skipper.last_arrival == 12.5


def test_detached_delivers_nothing_more() -> None:
    h = Harness()
    h.send(0, SILENT)
    h.skipper.detach()
    h.send(1, VOICED)
    assert h.delivered == []


def test_no_preroll_means_nothing_held() -> None:
    h = Harness(preroll_packets=0)
    h.send(0, SILENT)
    h.send(1, VOICED)
    assert h.delivered_seqs() == [1] and h.skipper.skipped == 1


@given(
    st.lists(st.tuples(st.sampled_from([SILENT, VOICED, 60, 0, None]), st.booleans()), max_size=300),
    st.integers(0, 12),
    st.integers(1, 50),
)
def test_delivered_packets_keep_their_order_and_nothing_voiced_is_lost(
    stream: list[tuple[int | None, bool]], preroll: int, resync_every: int
) -> None:
    h = Harness(preroll_packets=preroll, resync_every=resync_every)
    must_pass = set()
    for seq, (level, speaking) in enumerate(stream):
        h.gate.speaking = speaking
        if level is None or level <= THRESHOLD or speaking:
            must_pass.add(seq)
        h.send(seq, level)
    delivered = h.delivered_seqs()
    assert delivered == sorted(set(delivered))
    assert must_pass <= set(delivered)
    assert len(delivered) + h.skipper.skipped + min(preroll, len(stream)) >= len(stream)
    assert len(delivered) + h.skipper.skipped <= len(stream)


def srtp_pair() -> tuple[Session, Session]:
    key = os.urandom(30)
    sender = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    receiver_policy = Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND)
    receiver_policy.window_size = 1024  # as aiortc configures it
    return sender, Session(receiver_policy)


def skip_silence_through_srtp(silent_packets: int, resync_every: int) -> list[bytes]:
    """Protect a call (voice, long silence, voice), skip through the
    skipper, unprotect what it lets through. Returns the decrypted packets."""
    sender, receiver = srtp_pair()
    gate = Gate(preroll_packets=2)
    decrypted: list[bytes] = []
    skipper = SilenceSkipper(gate, now=lambda: 0.0, resync_every=resync_every)
    skipper.attach(lambda data, component: decrypted.append(receiver.unprotect(data)))
    skipper.configure(LEVEL_ID, frozenset({OPUS}))
    levels = [VOICED] * 5 + [SILENT] * silent_packets + [VOICED] * 5
    for index, level in enumerate(levels):
        # senders start at a random sequence number; from 0 libsrtp happens to cope
        skipper.datagram(sender.protect(rtp(FIRST_SEQ + index, level)), 1)
    return decrypted


def test_srtp_keeps_authenticating_after_half_an_hour_of_skipped_silence() -> None:
    # 90,000 packets: past the 2^15 distance from which libsrtp would guess
    # the wrong rollover counter, and past one sequence-number wrap
    decrypted = skip_silence_through_srtp(90_000, resync_every=500)
    # 5 voiced; a silent one every 500 sequence numbers (the last silent packet,
    # 90,000 after the last voiced one, is one of them: no pre-roll left); 5 voiced
    assert len(decrypted) == 5 + 90_000 // 500 + 5
    assert [seq_of(d) for d in decrypted[-5:]] == [(FIRST_SEQ + 90_005 + i) % 65536 for i in range(5)]


def test_without_resync_srtp_would_lose_the_speaker() -> None:
    # the reason for resync_every: skip everything and the next voice fails
    with pytest.raises(SrtpError):
        skip_silence_through_srtp(40_000, resync_every=10**9)
