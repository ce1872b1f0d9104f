"""A media bridge without an SFU: each subscription is a direct aiortc peer
connection that sends a publisher's WAV. A development tool for machines
without Janus (the demo falls back to it); the end-to-end tests use Janus.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from live_transcription.sim.publisher import Pcm, WavAudioTrack, load_wav


@dataclass
class DirectPublisher:
    pcm: Pcm
    loop: bool
    start_delay_s: float
    autoplay: bool
    tracks: list[WavAudioTrack]

    def play(self) -> None:
        for track in self.tracks:
            track.play()


class DirectBridge:
    """Implements the emulator's ``MediaBridge`` with one sending peer per
    subscription. Each subscription plays the publisher's file from its start."""

    def __init__(self) -> None:
        self.publishers: dict[str, DirectPublisher] = {}
        self._peers: dict[tuple[str, str], tuple[str, RTCPeerConnection]] = {}
        self._sids = itertools.count(1)

    def add_publisher(
        self,
        session_id: str,
        wav: Path,
        *,
        loop: bool = False,
        start_delay_s: float = 0.0,
        autoplay: bool = True,
    ) -> DirectPublisher:
        publisher = DirectPublisher(load_wav(wav), loop, start_delay_s, autoplay, [])
        self.publishers[session_id] = publisher
        return publisher

    async def request_offer(self, subscriber: str, publisher: str) -> tuple[str, str]:
        source = self.publishers.get(publisher)
        if source is None:
            raise LookupError(f"{publisher} publishes no media")
        await self._close((subscriber, publisher))
        track = WavAudioTrack(
            source.pcm, loop=source.loop, start_delay_s=source.start_delay_s, autoplay=source.autoplay
        )
        source.tracks.append(track)
        pc = RTCPeerConnection()
        pc.addTransceiver(track, direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        sid = f"direct-{next(self._sids)}"
        self._peers[(subscriber, publisher)] = (sid, pc)
        return sid, pc.localDescription.sdp

    async def answer(self, subscriber: str, publisher: str, sid: str, sdp: str) -> None:
        pc = self._find(subscriber, publisher, sid)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def candidate(
        self, subscriber: str, publisher: str, sid: str, candidate: dict[str, object]
    ) -> None:
        pc = self._find(subscriber, publisher, sid)
        line = candidate.get("candidate")
        if not isinstance(line, str) or not line:
            return
        parsed = candidate_from_sdp(line.removeprefix("candidate:"))
        mid = candidate.get("sdpMid")
        index = candidate.get("sdpMLineIndex")
        parsed.sdpMid = mid if isinstance(mid, str) else None
        parsed.sdpMLineIndex = index if isinstance(index, int) else None
        await pc.addIceCandidate(parsed)

    async def close_subscriber(self, subscriber: str) -> None:
        for key in [key for key in self._peers if key[0] == subscriber]:
            await self._close(key)

    async def aclose(self) -> None:
        for key in list(self._peers):
            await self._close(key)

    def _find(self, subscriber: str, publisher: str, sid: str) -> RTCPeerConnection:
        entry = self._peers.get((subscriber, publisher))
        if entry is None or entry[0] != sid:
            raise LookupError(f"no subscription {sid}")
        return entry[1]

    async def _close(self, key: tuple[str, str]) -> None:
        entry = self._peers.pop(key, None)
        if entry is not None:
            await entry[1].close()
