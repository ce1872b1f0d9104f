"""One receive-only WebRTC connection per speaker, audio only.

aiortc does ICE, DTLS and SRTP; the audio is taken as Opus packets straight
from RTP (``lean_receiver``) and handed to ``on_rtp`` inline on the event
loop. The offer is cut to its one Opus audio section (``sdp``); every other
section is rejected in the answer.

Lifecycle::

    async with ReceivePeer(ice_servers=..., on_rtp=audio.feed, on_candidate=send) as peer:
        answer = await peer.accept_offer(offer_sdp)
        ...                                  # send the answer, relay candidates
        reason = await peer.wait_closed()    # "ice-failed", "disconnected-timeout", ...

The connect and inactivity watchdogs run inside ``wait_closed`` (no task of
their own): the owner awaits it in its task group. aiortc has no ICE
"disconnected" state, so a connection counts as disconnected when no RTP has
arrived for ``disconnect_timeout`` (a muted browser keeps sending comfort
packets; a gone one does not). aiortc gathers all its candidates before the
answer: they are in the answer SDP and also passed to ``on_candidate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from live_transcription import metrics
from live_transcription.clock import Clock, MonotonicClock
from live_transcription.media import lean_receiver
from live_transcription.media.packet import OpusRtp
from live_transcription.media.sdp import OfferPlan, UnsupportedOffer, build_answer, plan_offer
from live_transcription.media.silence_skip import SilenceGate, SilenceSkipper
from live_transcription.rooms.ports import LocalCandidate

logger = logging.getLogger(__name__)

__all__ = ["OpusRtp", "ReceivePeer", "UnsupportedOffer"]

_MAX_PENDING_CANDIDATES = 32


class ReceivePeer:
    """A receive-only peer connection for one speaker's audio. Single owner."""

    def __init__(
        self,
        *,
        ice_servers: Sequence[RTCIceServer],
        on_rtp: Callable[[OpusRtp], None],
        on_candidate: Callable[[LocalCandidate], None],
        label: str = "",
        clock: Clock | None = None,
        connect_timeout: float = 30.0,
        disconnect_timeout: float = 20.0,
        gate: SilenceGate | None = None,
    ) -> None:
        lean_receiver.ensure_audio_level_extension()
        self._clock: Clock = clock or MonotonicClock()
        self._on_rtp = on_rtp
        self._on_candidate = on_candidate
        self.label = label
        self._connect_timeout = connect_timeout
        self._disconnect_timeout = disconnect_timeout
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers)))
        metrics.track_peer_connection(self._pc)
        transceiver = self._pc.addTransceiver("audio", direction="recvonly")
        capabilities = RTCRtpReceiver.getCapabilities("audio")
        assert capabilities is not None
        transceiver.setCodecPreferences(
            [c for c in capabilities.codecs if c.mimeType.lower() == "audio/opus"]
        )
        self._receiver = transceiver.receiver
        # with the audio path's gate, silent packets are skipped before decryption
        self._skipper = None if gate is None else SilenceSkipper(gate, now=self._clock.now)
        self._tap = lean_receiver.install(self._receiver, self._handle_rtp, self._clock.now, self._skipper)
        self._pc.on("connectionstatechange", self._on_connection_state)
        self._plan: OfferPlan | None = None
        self._pending: list[tuple[str, str | None, int | None]] = []
        self._connected = False
        self._deadline_start = self._clock.now()
        self._last_rtp = self._deadline_start
        self._failure: str | None = None
        self._reason: str | None = None
        self._closing = False
        self._close_done = asyncio.Event()
        self._wake = asyncio.Event()
        self._warned_candidate = False
        self.candidates_dropped = 0
        self.candidates_bad = 0

    # --- what the owner calls ------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._reason is not None

    @property
    def connected(self) -> bool:
        return self._connected and self._reason is None

    @property
    def packets(self) -> int:
        """RTP packets handed to ``on_rtp``."""
        return self._tap.packets

    @property
    def packets_fast_path(self) -> int:
        """Packets of ``packets`` decrypted and handed on by the audio fast path."""
        return self._tap.fast_packets

    @property
    def packets_skipped(self) -> int:
        """Silent packets dropped before decryption (never handed to ``on_rtp``)."""
        return 0 if self._skipper is None else self._skipper.skipped

    @property
    def kernel_filter_attaches(self) -> int:
        """How often the kernel took over dropping this peer's silence."""
        return 0 if self._skipper is None else self._skipper.kernel_filter_attaches

    @property
    def receiver(self) -> RTCRtpReceiver:
        return self._receiver

    async def accept_offer(self, sdp: str) -> str:
        """Answer the SFU's offer: Opus audio accepted, every other m-line
        rejected (port 0). Raises ``UnsupportedOffer`` (a ``ValueError``) and
        closes the connection when there is nothing to receive."""
        if self._reason is not None:
            raise RuntimeError(f"peer {self.label} is closed ({self._reason})")
        if self._plan is not None:
            raise RuntimeError(f"peer {self.label} already answered an offer")
        try:
            plan = plan_offer(sdp)
            await self._pc.setRemoteDescription(RTCSessionDescription(plan.offer, "offer"))
            await self._pc.setLocalDescription(await self._pc.createAnswer())
            if self._skipper is not None:
                lean_receiver.bypass_stun_parsing(self._receiver, self._skipper)
        except UnsupportedOffer:
            await self._shutdown("unsupported-offer")
            raise
        except Exception as exc:
            # aiortc's own refusals (bad fingerprint, no rtcp-mux, no common codec)
            await self._shutdown("unsupported-offer")
            raise UnsupportedOffer(f"offer refused: {exc}") from exc
        self._plan = plan
        local = self._pc.localDescription
        answer = build_answer(plan, local.sdp)
        self._deadline_start = self._clock.now()
        for candidate, mid, index in self._pending:
            await self.add_remote_candidate(candidate, mid, index)
        self._pending.clear()
        for line in local.sdp.splitlines():
            if line.startswith("a=candidate:"):
                self._send_candidate(LocalCandidate(line[2:], plan.audio_mid, plan.audio_index))
        self._wake.set()
        return answer

    async def add_remote_candidate(
        self, candidate: str, sdp_mid: str | None, sdp_mline_index: int | None
    ) -> None:
        """A trickled candidate of the SFU (``candidate:...``, no ``a=``);
        empty means end of candidates. Bad candidates are logged and skipped."""
        if self._reason is not None:
            return
        if self._plan is None:
            if len(self._pending) >= _MAX_PENDING_CANDIDATES:
                self.candidates_dropped += 1
                return
            self._pending.append((candidate, sdp_mid, sdp_mline_index))
            return
        text = candidate.strip().removeprefix("a=")
        try:
            if not text:
                await self._pc.addIceCandidate(None)
                return
            parsed = candidate_from_sdp(text.removeprefix("candidate:"))
            # one transport carries the audio: every candidate applies to it
            parsed.sdpMid = self._plan.audio_mid
            parsed.sdpMLineIndex = 0
            await self._pc.addIceCandidate(parsed)
        except Exception as exc:
            self.candidates_bad += 1
            if not self._warned_candidate:
                self._warned_candidate = True
                logger.warning("peer %s: remote candidate skipped: %s", self.label, exc)

    async def wait_closed(self) -> str:
        """Run the watchdogs until the connection ends; returns why:
        ``ice-failed``, ``dtls-failed``, ``remote-closed``, ``connect-timeout``,
        ``disconnected-timeout``, ``unsupported-offer`` or ``closed`` (aclose)."""
        while True:
            if self._reason is not None:
                await self._close_done.wait()
                return self._reason
            if self._failure is not None:
                await self._shutdown(self._failure)
                continue
            now = self._clock.now()
            if self._connected:
                last_rtp = self._last_rtp
                if self._skipper is not None:
                    last_rtp = max(last_rtp, self._skipper.last_arrival)  # silence is alive too
                deadline = last_rtp + self._disconnect_timeout
                expired = "disconnected-timeout"
            else:
                deadline = self._deadline_start + self._connect_timeout
                expired = "connect-timeout"
            if now >= deadline:
                await self._shutdown(expired)
                continue
            await self._sleep_or_wake(deadline - now)

    async def aclose(self) -> None:
        """Close the connection (idempotent; waits until it is closed)."""
        await self._shutdown("closed")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- internals -------------------------------------------------------------------

    def _handle_rtp(self, packet: OpusRtp) -> None:
        self._last_rtp = packet.arrival_time
        self._on_rtp(packet)

    def _send_candidate(self, candidate: LocalCandidate) -> None:
        try:
            self._on_candidate(candidate)
        except Exception:
            logger.exception("peer %s: on_candidate failed", self.label)

    def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        if state == "connected" and not self._connected:
            self._connected = True
            self._last_rtp = self._clock.now()
        elif state == "failed" and self._failure is None:
            ice_failed = self._pc.iceConnectionState == "failed"
            self._failure = "ice-failed" if ice_failed else "dtls-failed"
        elif state == "closed" and self._failure is None:
            self._failure = "remote-closed"
        self._wake.set()

    async def _sleep_or_wake(self, seconds: float) -> None:
        self._wake.clear()
        woken = asyncio.ensure_future(self._wake.wait())
        slept = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({woken, slept}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            slept.cancel()
            await asyncio.gather(woken, slept, return_exceptions=True)

    async def _shutdown(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
            # the far end hanging up (the SFU ending a subscription, e.g. when the
            # HPB forgot our session) is an orderly end, not a media failure
            log = logger.info if reason in ("closed", "remote-closed") else logger.warning
            log("peer %s closing: %s", self.label, reason)
        if self._closing:
            await self._close_done.wait()
            return
        self._closing = True
        closing: asyncio.Future[None] | None = None
        try:
            self._tap.detach()
            # shielded: aiortc may be closing itself already (a failed
            # transport), and a watchdog cancelled meanwhile must not cancel
            # that close. Whoever waits for the close (aclose, the owner's
            # exit) waits for _close_done, which the close itself sets.
            closing = asyncio.ensure_future(self._pc.close())
            closing.add_done_callback(self._closed)
            with contextlib.suppress(Exception):  # logged by _closed
                await asyncio.shield(closing)
        finally:
            if closing is None:
                self._close_done.set()
            self._wake.set()

    def _closed(self, closing: asyncio.Future[None]) -> None:
        try:
            if not closing.cancelled() and (exc := closing.exception()) is not None:
                logger.error("peer %s: error while closing", self.label, exc_info=exc)
            lean_receiver.release_closed(self._pc)
        finally:
            self._close_done.set()
            self._wake.set()
