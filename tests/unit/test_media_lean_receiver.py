"""Fails loudly when an aiortc upgrade moves the internals the lean receive
path relies on (see media/lean_receiver.py)."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.codecs import HEADER_EXTENSIONS
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpReceiveParameters
from aiortc.rtp import RtpPacket

from live_transcription.media import lean_receiver
from live_transcription.media.packet import OpusRtp


async def _receiver() -> tuple[RTCPeerConnection, RTCRtpReceiver]:
    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver("audio", direction="recvonly")
    return pc, transceiver.receiver


async def test_private_names_still_exist() -> None:
    pc, receiver = await _receiver()
    try:
        for name in lean_receiver.REQUIRED_RECEIVER_ATTRIBUTES:
            assert hasattr(receiver, name), f"aiortc RTCRtpReceiver lost {name}"
        lean_receiver.check_seam(receiver)
    finally:
        await pc.close()


def test_a_missing_name_is_reported() -> None:
    class Hollow:
        pass

    with pytest.raises(lean_receiver.SeamBroken, match="_RTCRtpReceiver__codecs"):
        lean_receiver.check_seam(Hollow())  # type: ignore[arg-type]


def test_audio_level_extension_is_offered_for_audio() -> None:
    lean_receiver.ensure_audio_level_extension()
    lean_receiver.ensure_audio_level_extension()
    uris = [ext.uri for ext in HEADER_EXTENSIONS["audio"]]
    assert uris.count(lean_receiver.AUDIO_LEVEL_URI) == 1


async def test_receive_starts_no_thread_and_packets_go_through_the_tap() -> None:
    pc, receiver = await _receiver()
    got: list[OpusRtp] = []
    tap = lean_receiver.install(receiver, got.append, lambda: 42.0)
    # the transport's router calls these names: they must be ours now
    assert receiver._handle_rtp_packet == tap.handle_rtp_packet
    assert receiver.receive == tap.receive
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    pcmu = RTCRtpCodecParameters(mimeType="audio/PCMU", clockRate=8000, payloadType=0)
    try:
        await receiver.receive(RTCRtpReceiveParameters(codecs=[opus, pcmu]))
        assert not lean_receiver.decoder_thread_started(receiver)
        packet = RtpPacket(payload_type=111, sequence_number=7, timestamp=960, ssrc=5)
        packet.payload = b"\x08\x01"
        packet.extensions.audio_level = (False, 33)
        await receiver._handle_rtp_packet(packet, arrival_time_ms=0)
        other = RtpPacket(payload_type=0, sequence_number=8, timestamp=1920, ssrc=5)
        await receiver._handle_rtp_packet(other, arrival_time_ms=0)
        assert len(got) == 1
        assert (got[0].payload, got[0].sequence_number, got[0].timestamp) == (b"\x08\x01", 7, 960)
        assert (got[0].audio_level, got[0].arrival_time, got[0].ssrc) == (33, 42.0, 5)
        assert tap.unknown_payload == 1
        # aiortc's receiver reports still see the stream
        stats = await receiver.getStats()
        inbound = [s for s in stats.values() if s.type == "inbound-rtp"]
        assert inbound and inbound[0].packetsReceived == 1
        tap.detach()
        await receiver._handle_rtp_packet(packet, arrival_time_ms=0)
        assert len(got) == 1
    finally:
        await receiver.stop()  # aiortc's own stop: must find our RTCP task
        await pc.close()
    assert all(not t.get_name().startswith("decoder") for t in asyncio.all_tasks())


async def test_a_failing_handler_does_not_break_the_receive_loop() -> None:
    pc, receiver = await _receiver()

    def explode(packet: OpusRtp) -> None:
        raise RuntimeError("boom")

    tap = lean_receiver.install(receiver, explode, lambda: 0.0)
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    try:
        await receiver.receive(RTCRtpReceiveParameters(codecs=[opus]))
        packet = RtpPacket(payload_type=111, sequence_number=1, timestamp=0, ssrc=1)
        await receiver._handle_rtp_packet(packet, arrival_time_ms=0)
        await receiver._handle_rtp_packet(packet, arrival_time_ms=0)
        assert tap.handler_errors == 2
    finally:
        await receiver.stop()
        await pc.close()


async def test_install_after_start_is_refused() -> None:
    pc, receiver = await _receiver()
    tap = lean_receiver.install(receiver, lambda p: None, lambda: 0.0)
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    try:
        await tap.receive(RTCRtpReceiveParameters(codecs=[opus]))
        with pytest.raises(RuntimeError):
            lean_receiver.install(receiver, lambda p: None, lambda: 0.0)
    finally:
        await receiver.stop()
        await pc.close()
