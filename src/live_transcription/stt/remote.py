"""The stream driver shared by the remote Kyutai engines (Modal, moshi-server).

One driver task per stream owns all of the stream's state; ``push`` and
``end_of_speech`` only append to bounded buffers and wake it, and a receive
task per connection only forwards raw messages. The protocol itself
(``WireProtocol``) is pure.

Connection policy (the reasons):

* **Lazy connect, idle close.** A connection holds a GPU batch slot (Modal) or
  a channel (moshi-server, which answers ``no free channels`` when all are
  taken), and both servers close an idle socket (30 s / 20 s). Streaming
  silence to keep it open would hold that capacity and cost GPU time for
  nobody. So after a flushed pause plus ``idle_close_seconds`` (shorter than
  the server's timeout) the stream closes the socket itself, and reopens on the
  next pushed frame. Frames pushed meanwhile wait in the bounded buffer and
  are sent first, so the start of the next utterance is not lost.
* **Replay.** Frames sent since the last flushed pause are kept (bounded by
  ``replay_seconds``). If the connection drops with audio not yet flushed, the
  stream reconnects (first at once, then with exponential backoff on the
  injected clock) and sends those frames again; ``ReplayDeduper`` drops the
  words the server recognises a second time.
* **Cold starts.** The handshake may take 20-90 s while a container starts:
  the stream logs it once after ``handshake_warn_seconds`` and keeps
  buffering (bounded: the oldest frames go, counted in ``frames_dropped``).
* **Bad credentials** (HTTP 401/403 at the handshake) end the stream with a
  fatal ``StreamError(reason="auth")``; the engine then refuses new streams
  for ``auth_retry_seconds`` instead of hammering the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from live_transcription.audio.ring import DropOldestRing
from live_transcription.clock import Clock, MonotonicClock, TimerHandle
from live_transcription.stt.base import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    Frame,
    Language,
    Pause,
    StreamError,
    SttEngine,
    SttEvent,
    SttStream,
    Word,
)
from live_transcription.stt.replay import ConnectionTimeline, EventChannel, ReplayDeduper
from live_transcription.stt.wire import (
    Ignored,
    Padding,
    SendMarker,
    ServerError,
    ServerEvent,
    ServerMarker,
    ServerPause,
    ServerProgress,
    ServerReady,
    ServerWord,
    WireProtocol,
)

log = logging.getLogger(__name__)

KYUTAI_LANGUAGES = {
    "en": Language("en", "English"),
    "fr": Language("fr", "Français"),
}
"""``kyutai/stt-1b-en_fr``: English and French, detected by the model itself."""

_SILENCE: Frame = np.zeros(FRAME_SAMPLES, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """Timing and bounds of a remote stream (seconds unless said otherwise)."""

    flush_quiet_seconds: float = 1.0
    """Quiet-period flush: no word for this long after the padding = done."""
    flush_max_seconds: float = 5.0
    """Give up waiting for the flush after this long (the Pause still comes)."""
    idle_close_seconds: float = 15.0
    """Close the socket this long after a flushed pause with no new audio."""
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    backoff_jitter: float = 0.1
    buffer_seconds: float = 15.0
    """Frames waiting to be sent (cold start, reconnect): the bound."""
    replay_seconds: float = 15.0
    """Frames kept for replay since the last flushed pause: the bound."""
    handshake_warn_seconds: float = 5.0
    open_timeout_seconds: float = 120.0
    close_grace_seconds: float = 15.0
    """On close, how long to keep trying to flush unsent audio."""
    auth_retry_seconds: float = 60.0
    """After a 401, how long the engine refuses new streams."""
    max_message_bytes: int = 1 << 20


class _Flush(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"
    WAITING = "waiting"


_CLOSED = object()


class RemoteStream(SttStream):
    """A stream to a remote Kyutai server; see the module docstring."""

    def __init__(
        self,
        engine: RemoteEngine,
        protocol: WireProtocol,
        group: asyncio.TaskGroup,
    ) -> None:
        self._engine = engine
        self._protocol = protocol
        self._group = group
        self._options = engine.options
        self._clock = engine.clock
        buffer_frames = max(1, round(self._options.buffer_seconds / FRAME_SECONDS))
        self._ring: DropOldestRing[tuple[int, Frame]] = DropOldestRing(buffer_frames)
        self._replay: deque[tuple[int, Frame]] = deque()
        replay_frames = max(1, round(self._options.replay_seconds / FRAME_SECONDS))
        self._unacked: deque[tuple[int, Frame]] = deque(maxlen=replay_frames)
        self._pushed = 0
        self._events = EventChannel()
        self._wake = asyncio.Event()
        self._deduper = ReplayDeduper()
        self._inbox: deque[tuple[int, object]] = deque(maxlen=4096)
        self._flush = _Flush.IDLE
        self._flush_started = 0.0
        self._last_word_at = 0.0
        self._marker_id = 0
        self._words_since_pause = False
        self._last_was_pause = False
        self._server_paused = False
        self._closing = False
        self._close_deadline = 0.0
        self._finished = False
        self._ws: ClientConnection | None = None
        self._connection_id = 0
        self._ready = False
        self._timeline = ConnectionTimeline()
        self._failures = 0
        self._retry_at = 0.0
        self._last_audio_sent_at = 0.0
        self._timers: list[TimerHandle] = []
        self._logged_reasons: set[str] = set()
        # counters (read by metrics and tests)
        self.inbox_dropped = 0
        self.reconnects = 0
        self.frames_replayed = 0

    # --- SttStream ---------------------------------------------------------------
    def push(self, frame: Frame) -> None:
        if self._finished:
            return
        self._ring.push((self._pushed, frame))
        self._pushed += 1
        self._wake.set()

    def end_of_speech(self) -> None:
        if self._finished or self._flush is not _Flush.IDLE:
            return
        if self._ring or self._unacked or self._replay:
            self._flush = _Flush.REQUESTED
            self._wake.set()

    def events(self) -> AsyncIterator[SttEvent]:
        return self._events.__aiter__()

    @property
    def frames_dropped(self) -> int:
        return self._ring.dropped

    @property
    def duplicates_dropped(self) -> int:
        return self._deduper.duplicates_dropped

    @property
    def events_dropped(self) -> int:
        return self._events.dropped

    # --- lifecycle ---------------------------------------------------------------
    def request_close(self) -> None:
        if not self._closing:
            self._closing = True
            self._close_deadline = self._clock.now() + self._options.close_grace_seconds
            self._arm(self._options.close_grace_seconds)
            self.end_of_speech()
            self._wake.set()

    def fail(self, reason: str, message: str) -> None:
        """End the stream at once with a fatal error (used before any I/O)."""
        self._events.put(StreamError(message, fatal=True, reason=reason))
        self._finished = True
        self._wake.set()

    async def run(self) -> None:
        try:
            while not self._finished:
                self._wake.clear()
                self._process_inbox()
                if self._finished:
                    break
                await self._step()
                if self._finished:
                    break
                if not self._wake.is_set():
                    await self._wake.wait()
        except Exception as exc:
            log.exception("stt stream failed")
            self._events.put(StreamError(f"internal error: {exc}", fatal=True, reason="internal"))
        finally:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            await self._disconnect(graceful=True)
            self._events.close()

    # --- driver --------------------------------------------------------------------
    def _arm(self, delay: float) -> None:
        self._timers = self._timers[-16:]
        self._timers.append(self._clock.call_later(delay, self._wake.set))

    def _has_unflushed_audio(self) -> bool:
        return bool(self._ring or self._replay or self._unacked)

    async def _step(self) -> None:
        now = self._clock.now()
        if self._closing and now >= self._close_deadline:
            if self._has_unflushed_audio():
                log.warning("stt stream closed before its last audio was flushed")
            self._finished = True
            return
        if self._ws is None:
            if self._has_unflushed_audio():
                if now < self._retry_at:
                    self._arm(self._retry_at - now)
                    return
                await self._connect()
            elif self._closing:
                self._finished = True
            return
        if not self._ready:
            return
        await self._send_pending()
        if self._ws is None:
            return
        now = self._clock.now()
        if self._flush is _Flush.REQUESTED and not self._ring and not self._replay:
            await self._send_flush()
            return
        if self._flush is _Flush.WAITING:
            self._check_flush(now)
        if self._flush is _Flush.IDLE and not self._has_unflushed_audio():
            if self._closing:
                self._finished = True
                return
            idle = now - self._last_audio_sent_at
            if idle >= self._options.idle_close_seconds:
                log.debug("stt stream idle: closing the connection until the next speech")
                await self._disconnect(graceful=True)
            else:
                self._arm(self._options.idle_close_seconds - idle)

    async def _send_pending(self) -> None:
        if self._replay or self._ring:
            self._last_audio_sent_at = self._clock.now()
        while self._ws is not None and (self._replay or self._ring):
            if self._replay:
                index, frame = self._replay.popleft()
                self.frames_replayed += 1
            else:
                index, frame = self._ring.pop()
            self._unacked.append((index, frame))
            self._timeline.record_audio(index)
            if not await self._send(self._protocol.encode_audio(frame)):
                return

    async def _send_flush(self) -> None:
        self._marker_id += 1
        anchor = self._pushed
        for step in self._protocol.flush_plan(self._marker_id):
            if isinstance(step, Padding):
                silence = self._protocol.encode_audio(_SILENCE)
                self._timeline.record_padding(anchor, step.frames)
                for _ in range(step.frames):
                    if not await self._send(silence):
                        return
            elif isinstance(step, SendMarker) and not await self._send(
                self._protocol.encode_marker(step.marker_id)
            ):
                return
        now = self._clock.now()
        self._flush = _Flush.WAITING
        self._flush_started = now
        self._last_word_at = now
        self._last_audio_sent_at = now
        self._arm(self._options.flush_max_seconds)
        if not self._protocol.flush_by_marker:
            self._arm(self._options.flush_quiet_seconds)

    def _check_flush(self, now: float) -> None:
        if now - self._flush_started >= self._options.flush_max_seconds:
            log.warning("stt flush timed out; closing the caption line anyway")
            self._complete_flush()
            return
        if self._protocol.flush_by_marker:
            return
        quiet = now - max(self._flush_started, self._last_word_at)
        if quiet >= self._options.flush_quiet_seconds:
            self._complete_flush()
        else:
            self._arm(self._options.flush_quiet_seconds - quiet)

    def _complete_flush(self) -> None:
        self._flush = _Flush.IDLE
        self._unacked.clear()
        self._deduper.acknowledge_all()
        self._failures = 0
        if not self._last_was_pause:  # once per pause: the server may have said it already
            self._emit_pause()
        self._wake.set()

    def _emit_pause(self) -> None:
        self._words_since_pause = False
        self._last_was_pause = True
        self._events.put(Pause(audio_time=self._pushed * FRAME_SECONDS))

    async def _send(self, data: bytes) -> bool:
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(data)
        except ConnectionClosed:
            self._on_connection_lost(self._connection_id, "closed while sending")
            return False
        return True

    # --- connection --------------------------------------------------------------
    async def _connect(self) -> None:
        engine = self._engine
        if engine.auth_blocked():
            self.fail("auth", "the STT server rejected the credentials")
            return
        engine.connection_attempts += 1
        url = engine.url
        warned = False

        def warn() -> None:
            nonlocal warned
            warned = True
            log.warning(
                "stt handshake still pending after %.0f s (a cold start can take 20-90 s);"
                " buffering audio meanwhile",
                self._options.handshake_warn_seconds,
            )

        timer = self._clock.call_later(self._options.handshake_warn_seconds, warn)
        try:
            ws = await connect(
                url,
                additional_headers=dict(engine.headers),
                open_timeout=self._options.open_timeout_seconds,
                max_size=self._options.max_message_bytes,
                ssl=engine.ssl_context if url.startswith("wss://") else None,
                compression=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                engine.record_auth_failure()
                self.fail("auth", f"the STT server rejected the credentials (HTTP {status})")
                return
            self._connect_failed("connection", f"the STT server answered HTTP {status}")
            return
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._connect_failed("connection", f"cannot reach the STT server: {exc!r}")
            return
        finally:
            timer.cancel()
        if warned:
            log.info("stt handshake completed after a slow start")
        self._ws = ws
        self._connection_id += 1
        self._timeline = ConnectionTimeline()
        self._protocol.reset()
        self._ready = not self._protocol.needs_ready
        self._server_paused = False
        if self._unacked:
            self.reconnects += 1
            self._deduper.start_replay(self._unacked[0][0] * FRAME_SECONDS)
            self._replay.extendleft(reversed(self._unacked))
            self._unacked.clear()
        if self._flush is _Flush.WAITING:
            self._flush = _Flush.REQUESTED
        # failures reset only on evidence that the server works (Ready, a word,
        # a completed flush): a server that accepts and drops at once backs off
        self._group.create_task(self._receive(ws, self._connection_id))
        self._wake.set()

    def _connect_failed(self, reason: str, message: str) -> None:
        self._failures += 1
        delay = self._backoff()
        self._retry_at = self._clock.now() + delay
        self._log_once(reason, message)
        self._events.put(StreamError(f"{message}; retrying in {delay:.1f} s", reason=reason))
        self._arm(delay)

    def _backoff(self) -> float:
        options = self._options
        if self._failures <= 0:
            return 0.0
        base = min(
            options.backoff_max_seconds,
            options.backoff_initial_seconds * 2.0 ** min(self._failures - 1, 30),
        )
        return base * (1.0 + options.backoff_jitter * random.random())

    def _drop_connection(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            self._group.create_task(_close_quietly(ws))
        self._ready = False

    def _on_connection_lost(self, connection_id: int, why: str) -> None:
        if connection_id != self._connection_id or self._ws is None:
            return
        self._drop_connection()
        if self._has_unflushed_audio() or self._flush is not _Flush.IDLE:
            # mid-utterance: reconnect at once the first time, then back off
            self._retry_at = self._clock.now() + self._backoff()
            self._failures += 1
            self._events.put(StreamError(f"STT connection lost ({why}); replaying", reason="connection"))
        self._wake.set()

    async def _disconnect(self, graceful: bool) -> None:
        ws, self._ws = self._ws, None
        self._ready = False
        if ws is not None and graceful:
            await _close_quietly(ws)

    async def _receive(self, ws: ClientConnection, connection_id: int) -> None:
        try:
            async for message in ws:
                if len(self._inbox) == self._inbox.maxlen:
                    self.inbox_dropped += 1
                self._inbox.append((connection_id, message))
                self._wake.set()
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("stt receive loop failed")
        finally:
            self._inbox.append((connection_id, _CLOSED))
            self._wake.set()

    # --- server events -------------------------------------------------------------
    def _process_inbox(self) -> None:
        while self._inbox and not self._finished:
            connection_id, message = self._inbox.popleft()
            if connection_id != self._connection_id:
                continue
            if message is _CLOSED:
                self._on_connection_lost(connection_id, "closed by the server")
                continue
            if not isinstance(message, str | bytes):
                continue
            for event in self._protocol.parse(message):
                self._on_server_event(event)

    def _on_server_event(self, event: ServerEvent) -> None:
        if isinstance(event, ServerWord):
            self._on_word(event)
        elif isinstance(event, ServerPause):
            if self._words_since_pause and not self._server_paused:
                self._emit_pause()
            self._server_paused = True
        elif isinstance(event, ServerReady):
            self._ready = True
            self._failures = 0
            self._wake.set()
        elif isinstance(event, ServerMarker):
            if self._flush is _Flush.WAITING and event.marker_id == self._marker_id:
                self._complete_flush()
        elif isinstance(event, ServerError):
            if event.capacity:
                self._log_once("capacity", f"STT server is full: {event.message}")
                self._drop_connection()
                self._failures += 1
                delay = self._backoff()
                self._retry_at = self._clock.now() + delay
                self._events.put(
                    StreamError(f"no free STT channel; retrying in {delay:.1f} s", reason="capacity")
                )
                self._arm(delay)
            else:
                self._log_once("server-error", f"STT server error: {event.message}")
                self._events.put(StreamError(event.message, reason="protocol"))
        elif isinstance(event, ServerProgress):
            pass
        elif isinstance(event, Ignored):
            self._log_once(event.reason, f"ignored an STT server message: {event.reason}")

    def _on_word(self, event: ServerWord) -> None:
        timeline = self._timeline
        estimated_end = (
            timeline.stream_frame_at(timeline.server_frames - self._protocol.delay_frames) * FRAME_SECONDS
        )
        start = None
        if event.start_seconds is not None:
            start = timeline.stream_time_at(event.start_seconds)
        end = max(estimated_end, start) if start is not None else estimated_end
        word = Word(event.text, audio_start=start, audio_end=end, joins_previous=event.joins_previous)
        self._server_paused = False
        self._last_word_at = self._clock.now()
        if self._flush is _Flush.WAITING and not self._protocol.flush_by_marker:
            self._arm(self._options.flush_quiet_seconds)
        self._failures = 0
        if self._deduper.accept(word):
            self._words_since_pause = True
            self._last_was_pause = False
            self._events.put(word)

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged_reasons:
            self._logged_reasons.add(key)
            log.warning("%s", message)


async def _close_quietly(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):  # the socket is going away either way
        await ws.close()


class RemoteEngine(SttEngine):
    """Shared parts of the remote engines: URL, headers, auth cool-off."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        protocol_factory: Callable[[], WireProtocol],
        *,
        options: RemoteOptions | None = None,
        clock: Clock | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.headers = dict(headers)
        self._protocol_factory = protocol_factory
        self.options = options or RemoteOptions()
        self.clock: Clock = clock or MonotonicClock()
        self.ssl_context = ssl_context or ssl.create_default_context()
        self._auth_failed_at: float | None = None
        self.connection_attempts = 0

    def languages(self) -> dict[str, Language]:
        return dict(KYUTAI_LANGUAGES)

    def record_auth_failure(self) -> None:
        self._auth_failed_at = self.clock.now()

    def failure(self) -> str | None:
        if self.auth_blocked():
            return "the STT server rejected the credentials"
        return None

    def auth_blocked(self) -> bool:
        failed = self._auth_failed_at
        if failed is None:
            return False
        return self.clock.now() - failed < self.options.auth_retry_seconds

    def open_stream(self, language: str) -> AbstractAsyncContextManager[SttStream]:
        return self._open(language)

    @asynccontextmanager
    async def _open(self, language: str) -> AsyncIterator[SttStream]:
        async with asyncio.TaskGroup() as group:
            stream = RemoteStream(self, self._protocol_factory(), group)
            if language not in KYUTAI_LANGUAGES:
                stream.fail("language", f"language {language!r} is not supported by Kyutai STT")
            elif self.auth_blocked():
                stream.fail("auth", "the STT server rejected the credentials recently")
            group.create_task(stream.run())
            try:
                yield stream
            finally:
                stream.request_close()
