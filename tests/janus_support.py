"""Helpers for tests that need a real Janus (Debian package `janus`).

- `janus_fixture` (fixture name `janus`): a private `JanusProcess` per test;
  `bridge_fixture` (name `janus_bridge`): a `JanusBridge` on it. Import them
  into a test module (`from tests.janus_support import bridge_fixture, janus_fixture  # noqa: F401`).
- `running_janus()`: the same as an async context manager.
- When Janus is not installed, both skip LOUDLY (reason on stderr and in the
  skip reason), never pass silently.
- `receive_audio`: subscribe through a bridge with a plain aiortc peer
  (receive-only audio) and return the decoded samples.
- Signal helpers: `chirp`, `ncc_peak` (normalised cross-correlation peak).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from live_transcription.sim.bridge import JanusBridge
from live_transcription.sim.janus import JanusClient
from live_transcription.sim.janus_process import JanusProcess, janus_available
from live_transcription.sim.publisher import SAMPLE_RATE, write_wav

Samples = npt.NDArray[np.float64]
CANDIDATE_LINE = re.compile(r"^a=(candidate:.*)$")


def skip_unless_janus() -> None:
    """pytest.skip with a loud reason when Janus cannot run here."""
    reason = janus_available()
    if reason is None:
        return
    banner = f"JANUS TESTS SKIPPED: {reason}. Install it with `apt-get install janus`."
    print(f"\n{'!' * 78}\n{banner}\n{'!' * 78}", file=sys.stderr)
    pytest.skip(banner)


@asynccontextmanager
async def running_janus() -> AsyncIterator[JanusProcess]:
    skip_unless_janus()
    async with JanusProcess() as janus:
        yield janus


@pytest.fixture(name="janus")
async def janus_fixture() -> AsyncIterator[JanusProcess]:
    async with running_janus() as janus:
        yield janus


@pytest.fixture(name="janus_bridge")
async def bridge_fixture(janus: JanusProcess) -> AsyncIterator[JanusBridge]:
    async with JanusBridge(janus.ws_url) as bridge:
        yield bridge


# ------------------------------------------------------------------ signals


def chirp(f_start: float, f_end: float, seconds: float = 0.5, amplitude: float = 0.4) -> Samples:
    """A linear chirp in [-1, 1] at 48 kHz, Hann-tapered to avoid clicks."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * (f_start * t + (f_end - f_start) * t * t / (2 * seconds))
    out: Samples = amplitude * np.sin(phase) * np.hanning(len(t))
    return out


def chirp_wav(path: Path, f_start: float, f_end: float) -> Samples:
    """Write a WAV of one chirp followed by as much silence; return the chirp."""
    sweep = chirp(f_start, f_end)
    pattern = np.concatenate([sweep, np.zeros_like(sweep)])
    write_wav(path, np.round(pattern * 32767).astype(np.int16))
    return sweep


def ncc_peak(signal: Samples, template: Samples) -> float:
    """Highest normalised cross-correlation of `template` over `signal` (0..1)."""
    n = len(template)
    if len(signal) < n:
        return 0.0
    tpl = template - template.mean()
    tpl = tpl / np.linalg.norm(tpl)
    size = 1 << int(np.ceil(np.log2(len(signal) + n)))
    corr = np.fft.irfft(np.fft.rfft(signal, size) * np.conj(np.fft.rfft(tpl, size)), size)
    corr = corr[: len(signal) - n + 1]
    energy = np.cumsum(np.concatenate([[0.0], signal * signal]))
    window = energy[n:] - energy[:-n]
    usable = window > 1e-6 * n
    if not usable.any():
        return 0.0
    return float(np.max(np.abs(corr[usable]) / np.sqrt(window[usable])))


# ---------------------------------------------------------------- receiving


def split_candidates(sdp: str) -> tuple[str, list[str]]:
    """The SDP without its candidate lines, and those candidates (no `a=`)."""
    kept: list[str] = []
    found: list[str] = []
    for line in sdp.splitlines():
        match = CANDIDATE_LINE.match(line)
        if match:
            found.append(match.group(1))
        elif line != "a=end-of-candidates":
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", found


async def receive_audio(
    bridge: JanusBridge,
    subscriber: str,
    publisher: str,
    *,
    seconds: float,
    skip_seconds: float = 0.2,
    trickle: bool = False,
    on_first_frame: Callable[[], None] | None = None,
    deadline_s: float = 30.0,
) -> Samples:
    """Subscribe `subscriber` to `publisher` and return `seconds` of its audio
    (mono, [-1, 1], 48 kHz) after dropping the first `skip_seconds`."""
    sid, offer = await bridge.request_offer(subscriber, publisher)
    pc = RTCPeerConnection()
    loop = asyncio.get_running_loop()
    arrived: asyncio.Future[MediaStreamTrack] = loop.create_future()

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not arrived.done():
            arrived.set_result(track)

    try:
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = pc.localDescription.sdp
        if trickle:
            answer, candidates = split_candidates(answer)
            assert candidates, "aiortc put no candidate into its answer"
            await bridge.answer(subscriber, publisher, sid, answer)
            for cand in candidates:
                await bridge.candidate(
                    subscriber,
                    publisher,
                    sid,
                    {"candidate": cand, "sdpMid": "0", "sdpMLineIndex": 0},
                )
            await bridge.candidate(subscriber, publisher, sid, {"completed": True})
        else:
            await bridge.answer(subscriber, publisher, sid, answer)
        chunks: list[Samples] = []
        wanted = int((seconds + skip_seconds) * SAMPLE_RATE)
        have = 0
        async with asyncio.timeout(deadline_s):
            track = await arrived
            while have < wanted:
                frame = await track.recv()
                assert isinstance(frame, av.AudioFrame)
                if have == 0 and on_first_frame is not None:
                    on_first_frame()
                raw = frame.to_ndarray()
                channels = len(frame.layout.channels)
                pcm = raw[0] if frame.format.is_planar else raw.reshape(-1, channels)[:, 0]
                chunks.append(pcm.astype(np.float64) / 32768.0)
                have += len(pcm)
        audio = np.concatenate(chunks)
        out: Samples = audio[int(skip_seconds * SAMPLE_RATE) : wanted]
        return out
    finally:
        await pc.close()


async def wait_closed(client: JanusClient, deadline_s: float = 30.0) -> None:
    async with asyncio.timeout(deadline_s):
        await client.closed.wait()
