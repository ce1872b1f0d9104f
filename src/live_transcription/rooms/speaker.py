"""One speaker: peer connection -> audio -> STT stream -> captions -> room.

A Speaker owns its peer connection, its audio path, its STT stream and its
caption builder. Everything it starts lives in its own TaskGroup inside
``run()``; leaving ``run()`` (close, peer failure, room closing) flushes the
stream so the last words become a final caption, then closes the peer.

The audio path is synchronous and inline: RTP packet -> ``SpeakerAudio.feed``
-> 80 ms frame -> ``SttStream.push`` (bounded, drops oldest). No queue or
thread between the network and the engine's buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import numpy as np
from aiortc import RTCIceServer

from live_transcription import metrics
from live_transcription.audio.pipeline import GateConfig, Samples, SpeakerAudio
from live_transcription.audio.ring import DropOldestRing
from live_transcription.captions.builder import Caption, CaptionBuilder
from live_transcription.clock import Clock, MonotonicClock
from live_transcription.logs import fields
from live_transcription.media.peer import ReceivePeer, UnsupportedOffer
from live_transcription.rooms import ports
from live_transcription.rooms.room import SpeakerContext
from live_transcription.rooms.speaker_report import SpeakerReport
from live_transcription.stt.base import (
    FRAME_SECONDS,
    Language,
    Pause,
    StreamError,
    SttEngine,
    SttEvent,
    SttStream,
    Word,
)

log = logging.getLogger(__name__)

IceServers = Callable[[], Awaitable[Sequence[RTCIceServer]]]

_ARRIVALS = 1024
"""Frame arrival times kept for latency measurement (~80 s of speech)."""
_IDLE_CHECK_SECONDS = 0.25
"""How often an utterance is checked for packets having stopped (muted, gone)."""
_QUIET_CHECK_SECONDS = 1.0
"""The same outside utterances, where only counters are reported (fewer wake-ups)."""
_REPORT_SECONDS = 10.0
"""Counters of a speaker who stays silent are added to the metrics this often."""
ENGINE_RETRY_SECONDS = 60.0
"""After a fatal stream error, how long a speaker waits before opening a new stream."""
_RECONNECT_REASONS = frozenset({"connection", "capacity", "timeout", "stalled"})
"""Non-fatal stream errors after which the stream is retrying its connection."""


class Speaker:
    """Implements ``rooms.room.SpeakerSession``."""

    def __init__(
        self,
        context: SpeakerContext,
        *,
        engine: SttEngine,
        languages: Mapping[str, Language],
        ice_servers: IceServers,
        max_caption_seconds: float = 10.0,
        gate: GateConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.context = context
        self._engine = engine
        self._languages = languages
        self._ice_servers = ice_servers
        self._max_caption_seconds = max_caption_seconds
        self._gate = gate
        self._clock = clock or MonotonicClock()
        self._language = context.language
        self._stream: SttStream | None = None
        self._stream_frames = 0
        self._arrivals = np.zeros(_ARRIVALS, dtype=np.float64)
        self._candidates: DropOldestRing[ports.CandidateReceived] = DropOldestRing(32)
        self._candidate_ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._stopping = False
        self._pending_word_end: float | None = None
        self._local_candidates: list[ports.LocalCandidate] | None = []  # None once answered
        self._audio: SpeakerAudio | None = None
        self._peer: ReceivePeer | None = None
        self._report = SpeakerReport(self._clock)
        self._words_metric = metrics.words_in.labels(engine.name)
        self._fields = fields(context.room_token, context.session_id)
        self.stt_reconnecting = False
        """The STT stream lost its connection and has recognised nothing since."""
        self.end_reason: str | None = None
        self.engine_failure: str | None = None
        self.words = 0
        self.captions = 0
        self.frames_without_stream = 0

    @property
    def media_connected(self) -> bool:
        """The peer connection is up (ICE and DTLS): the speaker's audio flows."""
        return self._peer is not None and self._peer.connected

    # --- SpeakerSession ------------------------------------------------------------------
    def add_candidate(self, candidate: ports.CandidateReceived) -> None:
        self._candidates.push(candidate)
        self._candidate_ready.set()

    def set_language(self, language: str) -> None:
        if language != self._language:
            self._language = language
            self._changed.set()

    def close(self) -> None:
        self._stopping = True
        self._changed.set()

    async def run(self) -> None:
        label = self.context.session_id
        audio = SpeakerAudio(
            on_frame=self._on_frame, on_speech_end=self._on_speech_end, config=self._gate, label=label
        )
        self._audio = audio
        metrics.speakers_started.inc()
        try:
            ice_servers = await self._ice_servers()
            async with ReceivePeer(
                ice_servers=ice_servers,
                on_rtp=audio.feed,
                on_candidate=self._send_candidate,
                label=label,
                clock=self._clock,
                gate=audio,
            ) as peer:
                self._peer = peer
                try:
                    answer = await peer.accept_offer(self.context.offer.sdp)
                except UnsupportedOffer as exc:
                    self.end_reason = "unsupported-offer"
                    log.warning("speaker %s: offer refused: %s", label, exc, extra=self._fields)
                    return
                self.context.link.send_answer(label, self.context.offer.sid, answer)
                self._report.start_receiving()
                # candidates gathered while answering follow the answer, never precede it
                early, self._local_candidates = self._local_candidates or [], None
                for candidate in early:
                    self._send_candidate(candidate)
                async with asyncio.TaskGroup() as tasks:
                    side = [
                        tasks.create_task(self._apply_candidates(peer)),
                        tasks.create_task(self._watch_peer(peer)),
                        tasks.create_task(self._watch_idle(audio)),
                    ]
                    try:
                        await self._caption_streams()
                    finally:
                        for task in side:
                            task.cancel()
        finally:
            self._report_audio()
            self._report.stop_receiving()
            self._set_reconnecting(False)
            audio.close()
            self._audio = None
            self._peer = None
            self._stream = None
            self.end_reason = self.end_reason or "closed"
            metrics.speakers_ended.labels(self.end_reason).inc()
            log.info("speaker %s ended: %s", label, self.end_reason, extra=self._fields)

    # --- the inline audio path ---------------------------------------------------------
    def _on_frame(self, frame: Samples) -> None:
        stream = self._stream
        if stream is None:
            self.frames_without_stream += 1
            return
        self._arrivals[self._stream_frames % _ARRIVALS] = time.monotonic()
        self._stream_frames += 1
        stream.push(frame)

    def _on_speech_end(self) -> None:
        if self._stream is not None:
            self._stream.end_of_speech()
        self._report_audio()

    def _report_audio(self) -> None:
        """Add the audio path's counters and the time audio was received to
        the metrics: at each speech end and at the speaker's end, never per packet."""
        audio = self._audio
        counters = audio.counters() if audio is not None else {}
        if self._peer is not None:
            counters["packets_skipped"] = self._peer.packets_skipped
        stream = self._stream
        self._report.report(
            counters, self.frames_without_stream, stream.frames_dropped if stream is not None else None
        )

    def _set_reconnecting(self, reconnecting: bool) -> None:
        if reconnecting != self.stt_reconnecting:
            self.stt_reconnecting = reconnecting
            metrics.stt_streams_reconnecting.inc(1 if reconnecting else -1)

    def _send_candidate(self, candidate: ports.LocalCandidate) -> None:
        if self._local_candidates is not None:
            if len(self._local_candidates) < 64:
                self._local_candidates.append(candidate)
            return
        self.context.link.send_candidate(self.context.session_id, self.context.offer.sid, candidate)

    # --- tasks -------------------------------------------------------------------------------
    async def _caption_streams(self) -> None:
        """One STT stream per language in use; reopened on a language change."""
        while not self._stopping:
            self._changed.clear()
            language = self._language
            builder = CaptionBuilder(
                separator=self._separator(language), max_seconds=self._max_caption_seconds
            )
            async with asyncio.TaskGroup() as tasks, self._engine.open_stream(language) as stream:
                metrics.stt_streams.labels(self._engine.name, "open").inc()
                self._stream = stream
                self._stream_frames = 0
                self._report.new_stream()
                reader = tasks.create_task(self._read_events(stream, builder))
                changed = tasks.create_task(self._changed.wait())
                await asyncio.wait((reader, changed), return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                self._report_audio()
                self._stream = None  # leaving the block flushes; the reader gets the rest
            self._publish(builder.flush())
            if self.engine_failure is not None:
                # the engine cannot work now (e.g. rejected credentials): try again
                # rarely (the engine refuses without I/O while it knows), never spin
                changed = asyncio.ensure_future(self._changed.wait())
                retry = asyncio.ensure_future(self._clock.sleep(ENGINE_RETRY_SECONDS))
                try:
                    await asyncio.wait((changed, retry), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    retry.cancel()
                self.engine_failure = None

    async def _read_events(self, stream: SttStream, builder: CaptionBuilder) -> None:
        async for event in stream.events():
            self._on_event(event, builder)

    def _on_event(self, event: SttEvent, builder: CaptionBuilder) -> None:
        if isinstance(event, Word):
            self.words += 1
            self._words_metric.inc()
            self._set_reconnecting(False)
            if event.audio_end is not None:
                self._pending_word_end = event.audio_end
        elif isinstance(event, StreamError):
            if event.fatal:
                self.engine_failure = event.message
                self._set_reconnecting(False)
                log.error(
                    "speaker %s: STT stream failed: %s",
                    self.context.session_id,
                    event.message,
                    extra=self._fields,
                )
                metrics.stt_streams.labels(self._engine.name, f"fatal-{event.reason}").inc()
            else:
                if event.reason in _RECONNECT_REASONS:
                    self._set_reconnecting(True)
                log.info(
                    "speaker %s: STT stream: %s", self.context.session_id, event.message, extra=self._fields
                )
                metrics.stt_streams.labels(self._engine.name, event.reason).inc()
            return
        elif isinstance(event, Pause):
            self._set_reconnecting(False)
        else:
            return
        self._publish(builder.feed(event, self._clock.now()))

    def _publish(self, captions: Sequence[Caption]) -> None:
        for caption in captions:
            self.context.publish(self.context.session_id, caption.text, caption.final)
            self.captions += 1
        if captions and self._pending_word_end is not None:
            self._observe_latency(self._pending_word_end)
            self._pending_word_end = None

    def _observe_latency(self, audio_end: float) -> None:
        """Time from the arrival of the frame that carried the word's end to now."""
        index = max(0, int(audio_end / FRAME_SECONDS + 0.5) - 1)
        if self._stream_frames - index > _ARRIVALS or index >= self._stream_frames:
            return
        arrived = float(self._arrivals[index % _ARRIVALS])
        if arrived > 0:
            metrics.caption_latency.observe(max(0.0, time.monotonic() - arrived))

    async def _apply_candidates(self, peer: ReceivePeer) -> None:
        while True:
            await self._candidate_ready.wait()
            self._candidate_ready.clear()
            for candidate in self._candidates.drain():
                await peer.add_remote_candidate(
                    candidate.candidate, candidate.sdp_mid, candidate.sdp_mline_index
                )

    async def _watch_peer(self, peer: ReceivePeer) -> None:
        reason = await peer.wait_closed()
        if not self._stopping:
            self.end_reason = f"peer-{reason}"
            log.info("speaker %s: connection closed: %s", self.context.session_id, reason, extra=self._fields)
        self.close()

    async def _watch_idle(self, audio: SpeakerAudio) -> None:
        """End the utterance when packets stop altogether (muted, gone); keep
        the metrics of a silent speaker current."""
        reported = self._clock.now()
        while True:
            await self._clock.sleep(_IDLE_CHECK_SECONDS if audio.speaking else _QUIET_CHECK_SECONDS)
            now = self._clock.now()
            if audio.speaking:
                audio.check_idle(now)
            elif now - reported >= _REPORT_SECONDS:
                reported = now
                self._report_audio()

    def _separator(self, language: str) -> str:
        entry = self._languages.get(language)
        return entry.separator if entry is not None else " "
