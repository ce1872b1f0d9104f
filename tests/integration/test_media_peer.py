"""ReceivePeer over real loopback sockets, against aiortc publishers: a peer
that sends known audio, with the offer/answer/candidate exchange done by hand
(candidates trickled, as the SFU does)."""

from __future__ import annotations

import asyncio
import fractions
import gc
import os
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aioice.stun
import av
import numpy as np
import numpy.typing as npt
import psutil
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, VideoStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpReceiveParameters

from live_transcription.audio.opus import OpusEncoder
from live_transcription.audio.pipeline import GateConfig, SpeakerAudio
from live_transcription.audio.ring import DropOldestRing
from live_transcription.clock import ManualClock
from live_transcription.media import kernel_filter, lean_receiver
from live_transcription.media.packet import OpusRtp
from live_transcription.media.peer import ReceivePeer, UnsupportedOffer
from live_transcription.rooms.ports import LocalCandidate
from tests.unit.test_audio_opus import best_correlation, chirp
from tests.waiting import until

DEADLINE = 30
PTIME = 0.02
RATE = 48_000
STEP = 960


class WaveTrack(MediaStreamTrack):
    """Sends ``signal`` (48 kHz mono float) as 20 ms frames, in real time,
    then silence. aiortc encodes it and adds the audio-level extension."""

    kind = "audio"

    def __init__(self, signal: npt.NDArray[np.float32]) -> None:
        super().__init__()
        self._pcm = (np.clip(signal, -1, 1) * 32767).astype(np.int16)
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            # pace like a microphone (a media source, not synchronisation)
            await asyncio.sleep(max(0.0, self._start + self._index * PTIME - time.monotonic()))
        chunk = self._pcm[self._index * STEP : (self._index + 1) * STEP]
        if chunk.size < STEP:
            chunk = np.zeros(STEP, dtype=np.int16)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._index * STEP
        frame.time_base = fractions.Fraction(1, RATE)
        self._index += 1
        return frame


class PacketTrack(MediaStreamTrack):
    """Sends pre-made Opus payloads (or garbage) without encoding: no thread.
    ``paced=False`` sends as fast as the loop allows."""

    kind = "audio"

    def __init__(self, payloads: Iterator[bytes], *, paced: bool = True) -> None:
        super().__init__()
        self._payloads = payloads
        self._paced = paced
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> av.Packet:  # type: ignore[type-arg]
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        elif self._paced:
            await asyncio.sleep(max(0.0, self._start + self._index * PTIME - time.monotonic()))
        else:
            await asyncio.sleep(0)
        try:
            payload = next(self._payloads)
        except StopIteration:
            self.stop()
            raise MediaStreamError from None
        packet = av.Packet(payload)
        packet.pts = self._index * STEP
        packet.time_base = fractions.Fraction(1, RATE)
        self._index += 1
        return packet


def _strip(sdp: str, *prefixes: str) -> str:
    lines = [line for line in sdp.splitlines() if not line.startswith(prefixes)]
    return "\r\n".join(lines) + "\r\n"


async def make_offer(
    track: MediaStreamTrack, *, with_video: bool = False
) -> tuple[RTCPeerConnection, str, list[str]]:
    """A publisher and its offer with the candidates taken out (to trickle)."""
    publisher = RTCPeerConnection()
    publisher.addTrack(track)
    if with_video:
        publisher.addTrack(VideoStreamTrack())
    await publisher.setLocalDescription(await publisher.createOffer())
    sdp = publisher.localDescription.sdp
    candidates = [line[2:] for line in sdp.splitlines() if line.startswith("a=candidate:")]
    return publisher, _strip(sdp, "a=candidate:", "a=end-of-candidates"), candidates


async def connect(
    peer: ReceivePeer,
    track: MediaStreamTrack,
    *,
    with_video: bool = False,
    without_audio_level: bool = False,
) -> RTCPeerConnection:
    publisher, offer, candidates = await make_offer(track, with_video=with_video)
    if without_audio_level:
        offer = _strip(offer, "a=extmap:2 urn:ietf:params:rtp-hdrext:ssrc-audio-level")
        assert "ssrc-audio-level" not in offer
    try:
        answer = await peer.accept_offer(offer)
        for candidate in candidates:
            await peer.add_remote_candidate(candidate, "0", 0)
        await peer.add_remote_candidate("", "0", 0)
        await publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    except BaseException:
        await publisher.close()
        raise
    return publisher


class Listener:
    """Collects what a peer and its audio pipeline deliver; events to wait on."""

    def __init__(self, config: GateConfig | None = None) -> None:
        self.packets: list[OpusRtp] = []
        self.frames: list[npt.NDArray[np.float32]] = []
        self.candidates: list[LocalCandidate] = []
        self.speech_ended = asyncio.Event()
        self.enough = asyncio.Event()
        self.wanted_packets = 1
        self.audio = SpeakerAudio(
            on_frame=self.frames.append, on_speech_end=self.speech_ended.set, config=config
        )

    def on_rtp(self, packet: OpusRtp) -> None:
        self.packets.append(packet)
        self.audio.feed(packet)
        if len(self.packets) >= self.wanted_packets:
            self.enough.set()

    def peer(self, label: str = "speaker", **kwargs: object) -> ReceivePeer:
        return ReceivePeer(
            ice_servers=[],
            on_rtp=self.on_rtp,
            on_candidate=self.candidates.append,
            label=label,
            **kwargs,  # type: ignore[arg-type]
        )


def opus_payloads(seconds: float) -> list[bytes]:
    encoder = OpusEncoder(48_000, 1)
    signal = chirp(48_000, seconds)
    return [encoder.encode(signal[i : i + 960]) for i in range(0, signal.size - 959, 960)]


def speech_then_silence() -> npt.NDArray[np.float32]:
    return np.concatenate([chirp(48_000, 2.0), np.zeros(48_000, dtype=np.float32)])


@pytest.mark.parametrize("without_audio_level", [False, True])
async def test_audio_arrives_as_24khz_frames_matching_the_source(
    without_audio_level: bool,
) -> None:
    listener = Listener(GateConfig(speech_end_ms=400))
    async with listener.peer() as peer:
        publisher = await connect(
            peer,
            WaveTrack(speech_then_silence()),
            with_video=True,
            without_audio_level=without_audio_level,
        )
        try:
            async with asyncio.timeout(DEADLINE):
                await listener.speech_ended.wait()
        finally:
            await publisher.close()
    levels = {p.audio_level is None for p in listener.packets}
    assert levels == {without_audio_level}
    assert listener.candidates and all(c.candidate.startswith("candidate:") for c in listener.candidates)
    assert listener.audio.decode_errors == 0
    decoded = np.concatenate(listener.frames)
    assert decoded.size >= 24_000 * 2
    # speech from the first packet comes after a pre-roll of silence (240 ms at most)
    assert best_correlation(chirp(24_000, 2.0), decoded, max_lag=2_400 + 5_760) > 0.8
    assert await peer.wait_closed() == "closed"


async def test_answer_rejects_video_and_negotiates_audio_level() -> None:
    listener = Listener()
    async with listener.peer() as peer:
        publisher, offer, _ = await make_offer(WaveTrack(chirp(48_000, 0.1)), with_video=True)
        try:
            answer = await peer.accept_offer(offer)
        finally:
            await publisher.close()
    m_lines = [line for line in answer.splitlines() if line.startswith("m=")]
    assert len(m_lines) == 2
    assert m_lines[0].startswith("m=audio ") and not m_lines[0].startswith("m=audio 0 ")
    assert m_lines[1].startswith("m=video 0 ")
    assert "urn:ietf:params:rtp-hdrext:ssrc-audio-level" in answer
    audio = answer.split("m=video")[0]
    assert "opus/48000" in audio and "PCMU" not in audio
    assert "a=recvonly" in audio


async def test_several_speakers_without_a_thread_each() -> None:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)  # a fixed pool: any new thread is ours
    await loop.run_in_executor(None, lambda: None)
    baseline = threading.active_count()
    speakers = 6
    listeners = [Listener() for _ in range(speakers)]
    for listener in listeners:
        listener.wanted_packets = 40
    peers = [listener.peer(f"s{i}") for i, listener in enumerate(listeners)]
    publishers: list[RTCPeerConnection] = []
    try:
        for peer in peers:
            payloads = iter(opus_payloads(2.0))
            publishers.append(await connect(peer, PacketTrack(payloads)))
        async with asyncio.timeout(DEADLINE):
            for listener in listeners:
                await listener.enough.wait()
        assert threading.active_count() == baseline, [t.name for t in threading.enumerate()]
        assert not any("decoder" in t.name for t in threading.enumerate())
        for peer in peers:
            assert peer.connected
            assert not lean_receiver.decoder_thread_started(peer.receiver)
            assert peer.packets >= 40
        for listener in listeners:
            assert listener.audio.frames_out > 0
            assert listener.audio.decode_errors == 0
    finally:
        for publisher in publishers:
            await publisher.close()
        for peer in peers:
            await peer.aclose()
    assert threading.active_count() == baseline


async def test_buffers_stay_bounded_when_the_consumer_falls_behind() -> None:
    # nobody drains the STT-side ring: it must drop the oldest, never grow
    ring: DropOldestRing[npt.NDArray[np.float32]] = DropOldestRing(8)
    packets = 0
    done = asyncio.Event()
    total = 400

    def on_rtp(packet: OpusRtp) -> None:
        nonlocal packets
        packets += 1
        audio.feed(packet)
        if packets >= total * 9 // 10:
            done.set()

    audio = SpeakerAudio(on_frame=ring.push, on_speech_end=lambda: None)
    peer = ReceivePeer(ice_servers=[], on_rtp=on_rtp, on_candidate=lambda c: None)
    async with peer:
        publisher = await connect(peer, PacketTrack(iter(opus_payloads(8.0)), paced=False))
        try:
            async with asyncio.timeout(DEADLINE):
                await done.wait()
        finally:
            await publisher.close()
    assert len(ring) == ring.capacity
    assert audio.frames_out > 80
    assert ring.dropped == audio.frames_out - ring.capacity


async def test_garbage_rtp_is_skipped_and_other_speakers_are_unaffected() -> None:
    rng = np.random.default_rng(1)
    garbage = iter([rng.bytes(int(rng.integers(1, 300))) for _ in range(100)])
    bad, good = Listener(), Listener()
    bad.wanted_packets = good.wanted_packets = 60
    async with bad.peer("bad") as bad_peer, good.peer("good") as good_peer:
        publishers = [
            await connect(bad_peer, PacketTrack(garbage)),
            await connect(good_peer, PacketTrack(iter(opus_payloads(2.0)))),
        ]
        try:
            async with asyncio.timeout(DEADLINE):
                await bad.enough.wait()
                await good.enough.wait()
            assert bad_peer.connected and good_peer.connected
        finally:
            for publisher in publishers:
                await publisher.close()
    assert bad.audio.decode_errors > 0
    assert good.audio.decode_errors == 0
    assert good.audio.frames_out > 0


@pytest.mark.parametrize("case", ["no-audio", "no-opus", "not-sdp"])
async def test_unusable_offer_is_refused_and_leaves_nothing_open(case: str) -> None:
    listener = Listener()
    good = Listener()
    good.wanted_packets = 30
    async with good.peer("good") as good_peer:
        good_publisher = await connect(good_peer, PacketTrack(iter(opus_payloads(2.0))))
        publisher, offer, _ = await make_offer(WaveTrack(chirp(48_000, 0.1)), with_video=True)
        await publisher.close()
        if case == "no-audio":
            offer = offer[: offer.index("m=audio")] + offer[offer.index("m=video") :]
            offer = offer.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 1")
        elif case == "no-opus":
            offer = "\r\n".join(line for line in offer.splitlines() if "opus" not in line.lower())
            offer = offer.replace("m=audio 9 UDP/TLS/RTP/SAVPF 96 ", "m=audio 9 UDP/TLS/RTP/SAVPF ")
        else:
            offer = "garbage"
        peer = listener.peer("bad")
        with pytest.raises(UnsupportedOffer) as raised:
            await peer.accept_offer(offer)
        assert isinstance(raised.value, ValueError)
        assert peer.closed
        assert await peer.wait_closed() == "unsupported-offer"
        await peer.aclose()
        try:
            async with asyncio.timeout(DEADLINE):
                await good.enough.wait()
        finally:
            await good_publisher.close()
    assert good.audio.frames_out > 0


async def test_wrong_dtls_fingerprint_closes_with_dtls_failed() -> None:
    listener = Listener()
    peer = listener.peer()
    publisher, offer, candidates = await make_offer(WaveTrack(chirp(48_000, 0.1)))
    try:
        wrong = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)
        lines = [wrong if line.startswith("a=fingerprint:sha-256 ") else line for line in offer.splitlines()]
        answer = await peer.accept_offer("\r\n".join(lines) + "\r\n")
        for candidate in candidates:
            await peer.add_remote_candidate(candidate, "0", 0)
        await peer.add_remote_candidate("", "0", 0)
        await publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        async with asyncio.timeout(DEADLINE):
            assert await peer.wait_closed() == "dtls-failed"
    finally:
        await publisher.close()
        await peer.aclose()


async def test_no_rtp_for_the_timeout_closes_with_disconnected_timeout() -> None:
    clock = ManualClock()
    listener = Listener()
    listener.wanted_packets = 25
    peer = listener.peer(clock=clock, disconnect_timeout=20.0)
    async with peer:
        publisher = await connect(peer, PacketTrack(iter(opus_payloads(0.5))))
        try:
            async with asyncio.timeout(DEADLINE):
                await listener.enough.wait()  # then the publisher sends nothing more
                waiter = asyncio.ensure_future(peer.wait_closed())
                await clock.wait_for_sleepers(1)
                await clock.advance(19.0)
                assert not waiter.done()
                await clock.advance(1.5)
                assert await waiter == "disconnected-timeout"
        finally:
            await publisher.close()


async def test_never_connecting_closes_with_connect_timeout() -> None:
    clock = ManualClock()
    peer = Listener().peer(clock=clock, connect_timeout=30.0)
    publisher, offer, _ = await make_offer(WaveTrack(chirp(48_000, 0.1)))
    try:
        await peer.accept_offer(offer)  # and no candidate ever arrives
        async with asyncio.timeout(DEADLINE):
            waiter = asyncio.ensure_future(peer.wait_closed())
            await clock.wait_for_sleepers(1)
            await clock.advance(29.0)
            assert not waiter.done()
            await clock.advance(2.0)
            assert await waiter == "connect-timeout"
    finally:
        await publisher.close()
        await peer.aclose()


async def test_bad_remote_candidates_are_skipped() -> None:
    listener = Listener()
    listener.wanted_packets = 20
    async with listener.peer() as peer:
        await peer.add_remote_candidate("candidate:garbage", "0", 0)  # before the offer: held
        publisher, offer, candidates = await make_offer(PacketTrack(iter(opus_payloads(1.0))))
        try:
            await peer.accept_offer(offer)
            await peer.add_remote_candidate("candidate:1 1 udp", "0", 0)
            for candidate in candidates:
                await peer.add_remote_candidate(candidate, "0", 0)
            await peer.add_remote_candidate("", None, 0)
            await peer.add_remote_candidate("candidate:late", "0", 0)
            assert peer.candidates_bad == 3
        finally:
            await publisher.close()


def _open_fds() -> int:
    return psutil.Process(os.getpid()).num_fds()


async def test_open_close_cycles_leave_nothing_alive() -> None:
    created: weakref.WeakSet[object] = weakref.WeakSet()
    gc.collect()
    tasks_before = set(asyncio.all_tasks())
    fds_before = _open_fds()
    publisher, offer, _ = await make_offer(WaveTrack(chirp(48_000, 0.1)))
    await publisher.close()
    del publisher

    tracked = 0

    def track(peer: ReceivePeer) -> None:
        nonlocal tracked
        tracked += 6
        pc = peer._pc
        dtls = peer.receiver.transport
        for obj in (peer, pc, peer.receiver, dtls, dtls.transport, peer._tap):
            created.add(obj)

    for cycle in range(200):
        listener = Listener()
        if cycle % 25 == 0:
            listener.wanted_packets = 10
            async with listener.peer(f"c{cycle}") as peer:
                track(peer)
                pub = await connect(peer, PacketTrack(iter(opus_payloads(1.0))))
                try:
                    async with asyncio.timeout(DEADLINE):
                        await listener.enough.wait()
                finally:
                    await pub.close()
                del pub
        else:
            async with listener.peer(f"c{cycle}") as peer:
                track(peer)
                await peer.accept_offer(offer)
        listener.audio.close()
        del peer, listener

    leftover = set(asyncio.all_tasks()) - tasks_before - {asyncio.current_task()}
    if leftover:
        # aiortc's own close-time tasks finish on their own; wait, do not sleep
        await asyncio.wait(leftover, timeout=DEADLINE)
    gc.collect()
    assert tracked == 200 * 6
    assert len(created) == 0, [type(o).__name__ for o in created]
    still_running = [t for t in leftover if not t.done()]
    assert still_running == []
    assert _open_fds() <= fds_before + 2


async def test_a_close_cut_short_by_cancellation_still_completes_and_is_waited_for() -> None:
    listener = Listener()
    async with listener.peer("cut", gate=listener.audio) as peer:
        pub = await connect(peer, PacketTrack(iter(opus_payloads(1.0))))
        try:
            await until(lambda: peer.connected)
            first = asyncio.ensure_future(peer.aclose())
            # one loop step at a time, so the cancellation lands inside aiortc's close
            while peer._pc.signalingState != "closed":  # noqa: ASYNC110
                await asyncio.sleep(0)
            assert peer._pc.connectionState != "closed"  # and is not over
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await peer.aclose()  # waits for the close that the cancellation did not stop
            assert peer._pc.connectionState == "closed"
            assert peer._pc.iceConnectionState == "closed"
        finally:
            await pub.close()
    listener.audio.close()


async def answered_then_closed(label: str) -> tuple[ReceivePeer, Listener]:
    """A peer that answered an offer and was closed before connecting."""
    publisher, offer, _ = await make_offer(WaveTrack(chirp(48_000, 0.1)))
    await publisher.close()
    listener = Listener()
    async with listener.peer(label, gate=listener.audio) as peer:
        await peer.accept_offer(offer)
    return peer, listener


async def test_a_connect_that_finishes_after_the_close_starts_no_rtcp_loop() -> None:
    # aiortc's connect task can reach receiver.receive() after close() has
    # stopped the receiver (the DTLS handshake finished meanwhile): an RTCP
    # loop started then was never cancelled, and kept the receiver alive
    peer, listener = await answered_then_closed("late")
    receiver = peer.receiver
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48_000, channels=2, payloadType=111)
    await receiver.receive(RTCRtpReceiveParameters(codecs=[opus]))  # what the racing connect does
    assert getattr(receiver, lean_receiver._RTCP_TASK) is None
    assert not getattr(receiver, lean_receiver._STARTED)
    listener.audio.close()


async def test_release_ends_an_rtcp_loop_that_outlived_the_close() -> None:
    peer, listener = await answered_then_closed("outlived")
    receiver = peer.receiver
    loop_task = asyncio.ensure_future(receiver._run_rtcp())
    setattr(receiver, lean_receiver._RTCP_TASK, loop_task)
    lean_receiver.release_closed(peer._pc)
    await asyncio.gather(loop_task, return_exceptions=True)
    assert loop_task.cancelled()
    listener.audio.close()


async def test_closed_peers_are_freed_by_reference_counting_alone() -> None:
    """Nothing of a closed peer waits for the cyclic garbage collector: under
    churn, hundreds of dead peers (DTLS, SRTP, sockets) would wait for its
    oldest generation at a time, a high-water mark the heap keeps."""
    refs: list[tuple[str, weakref.ref[object]]] = []

    def track(peer: ReceivePeer) -> None:
        dtls = peer.receiver.transport
        ice = dtls.transport
        connection = ice._connection
        objects: dict[str, object] = {
            "peer": peer,
            "pc": peer._pc,
            "receiver": peer.receiver,
            "dtls": dtls,
            "ice": ice,
            "connection": connection,
            "tap": peer._tap,
        }
        if dtls._ssl is not None:
            objects["ssl"] = dtls._ssl
        for index, protocol in enumerate(connection._protocols):
            objects[f"protocol{index}"] = protocol
            objects[f"udp{index}"] = protocol.transport
        refs.extend((f"{peer.label}.{name}", weakref.ref(obj)) for name, obj in objects.items())

    gc.collect()
    tasks_before = set(asyncio.all_tasks())
    gc.disable()
    try:
        for cycle in range(4):
            listener = Listener()
            listener.wanted_packets = 10
            async with listener.peer(f"c{cycle}", gate=listener.audio) as peer:
                if cycle % 2:
                    publisher, offer, _ = await make_offer(WaveTrack(chirp(48_000, 0.1)))
                    await publisher.close()
                    lean_receiver.release_closed(publisher)
                    del publisher
                    await peer.accept_offer(offer)  # answered, never connected
                    track(peer)
                else:
                    pub = await connect(peer, PacketTrack(iter(opus_payloads(1.0))))
                    try:
                        async with asyncio.timeout(DEADLINE):
                            await listener.enough.wait()
                        track(peer)
                    finally:
                        await pub.close()
                        lean_receiver.release_closed(pub)
                    del pub
            listener.audio.close()
            del peer, listener
        leftover = set(asyncio.all_tasks()) - tasks_before - {asyncio.current_task()}
        if leftover:
            # aiortc's own close-time tasks finish on their own; wait, do not sleep
            await asyncio.wait(leftover, timeout=DEADLINE)
        del leftover
        assert len(refs) >= 4 * 9
        assert [name for name, ref in refs if ref() is not None] == []
    finally:
        gc.enable()


def silence(seconds: float) -> npt.NDArray[np.float32]:
    return np.zeros(int(48_000 * seconds), dtype=np.float32)


def quiet_tone(seconds: float, dbov: float) -> npt.NDArray[np.float32]:
    """A 200 Hz tone whose RMS is ``dbov`` below full scale."""
    t = np.arange(int(48_000 * seconds)) / 48_000
    tone: npt.NDArray[np.float32] = (np.sqrt(2) * 10 ** (dbov / 20) * np.sin(2 * np.pi * 200 * t)).astype(
        np.float32
    )
    return tone


async def test_silence_is_skipped_before_decryption_and_speech_keeps_its_preroll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed_as_stun: list[bytes] = []
    parse_message = aioice.stun.parse_message

    def counting_parse(data: bytes, *args: Any, **kwargs: Any) -> aioice.stun.Message:
        parsed_as_stun.append(data[:2])
        return parse_message(data, *args, **kwargs)

    monkeypatch.setattr(aioice.stun, "parse_message", counting_parse)
    config = GateConfig(speech_end_ms=400)
    listener = Listener(config)
    second_utterance = asyncio.Event()
    connected_at = 0

    def on_rtp(packet: OpusRtp) -> None:
        listener.on_rtp(packet)
        if listener.audio.utterances >= 2:
            second_utterance.set()

    # digital silence (the kernel drops it once a pre-roll of it is held), a quiet
    # lead-in below the speech threshold but above the kernel's (it reaches the
    # pre-roll), speech, silence, speech
    lead_in = quiet_tone(0.5, -57.0)
    signal = np.concatenate([silence(2.0), lead_in, chirp(48_000, 1.5), silence(1.5), chirp(48_000, 0.3)])
    peer = ReceivePeer(
        ice_servers=[], on_rtp=on_rtp, on_candidate=lambda _: None, label="s", gate=listener.audio
    )
    async with peer:
        publisher = await connect(peer, WaveTrack(signal))
        try:
            async with asyncio.timeout(DEADLINE):
                await until(lambda: peer.connected and peer.packets_skipped > 0)
                # what arrived before the receiver knew its payload types went on unskipped
                connected_at = len(listener.packets)
                await second_utterance.wait()
        finally:
            await publisher.close()
        skipped = peer.packets_skipped
        kernel_attaches = peer.kernel_filter_attaches
        fast, handed_on = peer.packets_fast_path, peer.packets
    preroll = listener.audio.preroll_packets
    levels = [p.audio_level for p in listener.packets[connected_at:]]
    assert all(level is not None for level in levels)
    first_voiced = next(i for i, level in enumerate(levels) if level is not None and level <= 50)
    # before the first word only the pre-roll got through: the last 12 packets of the
    # lead-in, none of the digital silence
    assert first_voiced == preroll
    assert all(level is not None and 50 < level <= 65 for level in levels[:first_voiced]), levels[
        :first_voiced
    ]
    # the kernel dropped digital silence twice (before the lead-in, after the first chirp)
    assert kernel_attaches == 2 or not kernel_filter.SUPPORTED
    # 2 s of silence and the start of the lead-in before the first utterance, 1.5 s
    # minus the 400 ms hangover after it
    assert skipped >= (100 - preroll) + (75 - preroll), skipped
    assert listener.audio.stream_restarts == 0
    assert listener.audio.decode_errors == 0
    # once the receiver was up, audio went around aiortc's receive chain
    assert handed_on == len(listener.packets) and handed_on - fast <= connected_at
    decoded = np.concatenate(listener.frames)
    assert best_correlation(chirp(24_000, 1.5), decoded, max_lag=24 * 240 + 2_400) > 0.8  # after the pre-roll
    # RTP went around aioice's STUN parser; STUN (connectivity checks) went through it.
    # (The publisher, in this process too, still parses the RTCP it receives.)
    assert any(head[0] < 4 for head in parsed_as_stun)
    rtp = [head for head in parsed_as_stun if 127 < head[0] < 192 and not 192 <= head[1] <= 223]
    assert rtp == []


async def test_skipped_silence_keeps_the_connection_alive() -> None:
    clock = ManualClock()
    listener = Listener()
    peer = listener.peer(clock=clock, disconnect_timeout=20.0, gate=listener.audio)
    async with peer:
        publisher = await connect(peer, WaveTrack(silence(0.0)))  # silence forever
        try:
            async with asyncio.timeout(DEADLINE):
                await until(lambda: peer.connected and peer.packets_skipped > 0)
                handed_on = len(listener.packets)  # before the receiver knew its payload types
                waiter = asyncio.ensure_future(peer.wait_closed())
                await clock.wait_for_sleepers(1)
                await clock.advance(19.0)
                seen = peer.packets_skipped
                await until(lambda: peer.packets_skipped > seen)  # arrived "at" 19 s
                await clock.advance(19.0)
                assert not waiter.done()  # 38 s since the start, 19 s since a packet
                assert len(listener.packets) == handed_on  # none of it was decrypted and handed on
        finally:
            await publisher.close()
    assert await waiter == "closed"
