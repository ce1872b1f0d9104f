"""A VideoRoom publisher that sends audio only (Opus) from a WAV file.

`WavAudioTrack` is an aiortc track that plays 16-bit PCM from memory in
20 ms frames at 48 kHz, paced by the event loop clock: silence for
`start_delay_s` (or until `play()` when `autoplay` is off), then the file
once or in a loop, then silence (a browser in a call keeps sending packets
too). aiortc adds the RFC 6464 audio-level
header extension to what it sends.

`Publisher` joins a room as `ptype: publisher` on an existing Janus session,
sends the offer with `configure`, applies Janus' answer and waits for
`webrtcup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import wave
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import soxr
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .janus import JanusClient, JanusError, JanusHandle

log = logging.getLogger(__name__)

SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms, what browsers send
Pcm = npt.NDArray[np.int16]


def load_wav(path: Path) -> Pcm:
    """Mono 16-bit samples at 48 kHz from a PCM WAV file (mixed down, resampled)."""
    with wave.open(str(path), "rb") as wav:
        width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    if width != 2:
        raise ValueError(f"{path}: only 16-bit PCM WAV is supported, got {8 * width}-bit")
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE)
    out: Pcm = np.clip(np.round(samples), -32768, 32767).astype(np.int16)
    return out


def write_wav(path: Path, samples: Pcm, rate: int = SAMPLE_RATE) -> None:
    """Write mono 16-bit PCM (for fixtures made at test time)."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())


def frame_at(pcm: Pcm, index: int, *, content_start: int | None, loop: bool) -> Pcm:
    """Samples of the 20 ms frame number `index` when the file starts at frame
    `content_start` (None: not yet) (pure)."""
    silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)
    if content_start is None or index < content_start or len(pcm) == 0:
        return silence
    start = (index - content_start) * FRAME_SAMPLES
    if loop:
        start %= len(pcm)
        chunk = pcm[start : start + FRAME_SAMPLES]
        while len(chunk) < FRAME_SAMPLES:  # wrap around the end of the file
            chunk = np.concatenate([chunk, pcm[: FRAME_SAMPLES - len(chunk)]])
        return chunk
    chunk = pcm[start : start + FRAME_SAMPLES]
    if len(chunk) < FRAME_SAMPLES:
        chunk = np.concatenate([chunk, silence[: FRAME_SAMPLES - len(chunk)]])
    return chunk


class WavAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(
        self, pcm: Pcm, *, loop: bool = False, start_delay_s: float = 0.0, autoplay: bool = True
    ) -> None:
        super().__init__()
        self._pcm = pcm
        self._looping = loop
        self._delay_frames = round(start_delay_s * SAMPLE_RATE / FRAME_SAMPLES)
        self._content_start: int | None = self._delay_frames if autoplay else None
        self._content_frames = -(-len(pcm) // FRAME_SAMPLES)
        self._index = 0
        self._start: float | None = None
        self.finished = asyncio.Event()  # set when a play-once file has been sent
        self.frames_sent = 0

    def play(self) -> None:
        """Start the file `start_delay_s` after the next frame (autoplay off)."""
        if self._content_start is None:
            self._content_start = self._index + self._delay_frames

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        clock = asyncio.get_running_loop()
        if self._start is None:
            self._start = clock.time()
        else:
            # Real-time pacing of the media clock, as a microphone would.
            due = self._start + self._index * FRAME_SAMPLES / SAMPLE_RATE
            await asyncio.sleep(max(0.0, due - clock.time()))
        samples = frame_at(self._pcm, self._index, content_start=self._content_start, loop=self._looping)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._index * FRAME_SAMPLES
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._index += 1
        self.frames_sent = self._index
        start = self._content_start
        if not self._looping and start is not None and self._index >= start + self._content_frames:
            self.finished.set()
        return frame


class Publisher:
    """An audio-only VideoRoom publisher; `feed_id` is its Janus feed."""

    def __init__(
        self,
        janus: JanusClient,
        room: int,
        wav: Path,
        *,
        display: str = "",
        loop: bool = False,
        start_delay_s: float = 0.0,
        autoplay: bool = True,
        connect_deadline_s: float = 30.0,
    ) -> None:
        self._janus = janus
        self.room = room
        self.display = display
        self.track = WavAudioTrack(load_wav(wav), loop=loop, start_delay_s=start_delay_s, autoplay=autoplay)
        self._connect_deadline_s = connect_deadline_s
        self._pc: RTCPeerConnection | None = None
        self._handle: JanusHandle | None = None
        self.feed_id = 0

    @property
    def handle(self) -> JanusHandle | None:
        return self._handle

    async def __aenter__(self) -> Publisher:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Join, publish, and return once Janus reports the PeerConnection up."""
        self._handle = handle = await self._janus.attach()
        joined = await handle.message(
            {"request": "join", "room": self.room, "ptype": "publisher", "display": self.display}
        )
        self.feed_id = int(joined.data["id"])
        self._pc = pc = RTCPeerConnection()
        pc.addTransceiver(self.track, direction="sendonly")
        # aiortc gathers every candidate inside setLocalDescription: no trickle needed.
        await pc.setLocalDescription(await pc.createOffer())
        reply = await handle.message(
            {"request": "configure", "audio": True, "video": False},
            jsep={"type": "offer", "sdp": pc.localDescription.sdp},
        )
        if reply.jsep is None:
            raise JanusError(0, f"configure answered without jsep: {reply.data}")
        await pc.setRemoteDescription(RTCSessionDescription(reply.jsep["sdp"], reply.jsep["type"]))
        async with asyncio.timeout(self._connect_deadline_s):
            await handle.webrtcup.wait()
        log.info("publisher %r feed %d is up in room %d", self.display, self.feed_id, self.room)

    async def stop(self) -> None:
        handle, pc = self._handle, self._pc
        self._handle = self._pc = None
        try:
            if handle is not None and not self._janus.closed.is_set():
                with contextlib.suppress(JanusError, ConnectionError, TimeoutError):
                    await handle.detach()  # Janus unpublishes and leaves for us
        finally:
            self.track.stop()
            if pc is not None:
                await pc.close()


async def create_room(janus: JanusHandle, *, max_publishers: int = 100, description: str = "") -> int:
    """A fresh, audio-only-friendly VideoRoom room; its id."""
    body: dict[str, Any] = {
        "request": "create",
        "publishers": max_publishers,
        "audiocodec": "opus",
        "audiolevel_ext": True,
        "description": description or "live-transcription sim",
    }
    reply = await janus.message(body)
    return int(reply.data["room"])
