"""Through real Janus into the service's own receive path: each publisher's
WAV arrives as 24 kHz frames (ReceivePeer + SpeakerAudio, no decoder thread)
whose content matches that publisher's source, for several speakers at once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import soxr

from live_transcription.audio.pipeline import SpeakerAudio
from live_transcription.media import lean_receiver
from live_transcription.media.peer import ReceivePeer
from live_transcription.sim.bridge import JanusBridge
from live_transcription.stt.base import FRAME_SAMPLES, SAMPLE_RATE
from tests.janus_support import bridge_fixture, chirp_wav, janus_fixture, ncc_peak  # noqa: F401

FRAMES_WANTED = 30  # 2.4 s of voiced audio: several chirps


async def test_published_wavs_arrive_as_matching_24khz_frames(
    janus_bridge: JanusBridge, tmp_path: Path
) -> None:
    sweeps = {
        "alice": chirp_wav(tmp_path / "alice.wav", 300, 2500),
        "bob": chirp_wav(tmp_path / "bob.wav", 2500, 300),
    }
    for name in sweeps:
        await janus_bridge.add_publisher(name, tmp_path / f"{name}.wav", loop=True)
    received: dict[str, list[np.ndarray]] = {name: [] for name in sweeps}
    enough = {name: asyncio.Event() for name in sweeps}
    audios: list[SpeakerAudio] = []
    peers: list[ReceivePeer] = []

    def on_frame_of(name: str):  # type: ignore[no-untyped-def]
        def on_frame(frame: np.ndarray) -> None:
            assert frame.shape == (FRAME_SAMPLES,)
            assert frame.dtype == np.float32
            received[name].append(frame)
            if len(received[name]) >= FRAMES_WANTED:
                enough[name].set()

        return on_frame

    try:
        for name in sweeps:
            audio = SpeakerAudio(on_frame=on_frame_of(name), on_speech_end=lambda: None, label=name)
            audios.append(audio)
            peer = ReceivePeer(ice_servers=[], on_rtp=audio.feed, on_candidate=lambda _: None, label=name)
            peers.append(peer)
            sid, offer = await janus_bridge.request_offer("service", name)
            answer = await peer.accept_offer(offer)
            await janus_bridge.answer("service", name, sid, answer)
        async with asyncio.timeout(60):
            await asyncio.gather(*(event.wait() for event in enough.values()))
        # no thread per speaker: aiortc's receiver decoder threads ("audio-decoder") are
        # not started. Other threads (the loop's default executor, which the publishers'
        # encoders use) come and go and are not ours to count.
        decoders = [t.name for t in threading.enumerate() if t.name.endswith("-decoder")]
        assert decoders == []
        assert not any(lean_receiver.decoder_thread_started(peer.receiver) for peer in peers)
    finally:
        for peer in peers:
            await peer.aclose()
        for audio in audios:
            audio.close()

    for name, sweep in sweeps.items():
        template = soxr.resample(sweep.astype(np.float32), 48_000, SAMPLE_RATE)
        signal = np.concatenate(received[name]).astype(np.float64)
        own = ncc_peak(signal, template)
        other_name = next(n for n in sweeps if n != name)
        other = ncc_peak(signal, soxr.resample(sweeps[other_name].astype(np.float32), 48_000, SAMPLE_RATE))
        assert own > 0.8, f"{name}: correlation with its own source {own:.2f}"
        assert other < own - 0.3, f"{name}: {other:.2f} with the other source vs {own:.2f}"
