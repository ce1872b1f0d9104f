"""The stream driver shared by the remote Kyutai engines (Modal, moshi-server).

One driver task per stream owns all of the stream's state; ``push`` and
``end_of_speech`` only append to bounded buffers and wake it. The protocol
itself (``WireProtocol``) is pure; the connections come from the engine's
``ConnectionPool`` (``stt/pool.py``).

Connection policy (the reasons):

* **Only speech is streamed, on a leased connection.** The audio gate hands
  on frames from shortly before speech starts (pre-roll) until its hangover
  ends. The first frame of an utterance leases a warm connection from the
  pool; the stream sends the speech, then the flush the engine needs to emit
  the last words (Modal: >= 1 s of silence, moshi: padding, a ``Marker``,
  padding), and gives the connection back once the flush has come back. The
  flush counts the quiet frames the utterance already ended with (the gate's
  hangover): only the rest is padded. Frames pushed while no connection is
  leased (a cold start, a full server) wait in the bounded buffer (oldest
  dropped, counted) and are sent first, so the start of an utterance is not
  lost.
* **Replay.** Frames sent since the last flushed pause are kept (bounded by
  ``replay_seconds``). If the connection drops with audio not yet flushed,
  the stream leases another (first at once, then with exponential backoff on
  the injected clock) and sends those frames again; ``ReplayDeduper`` drops
  the words the server recognises a second time.
* **A connection that stops answering** (open, reading audio, sending
  nothing back) is left the same way, without waiting for the speaker to
  pause: once audio sent on it has had no answer at all (no word, no
  progress step, no marker) for ``stall_seconds`` beyond the model delay, the
  stream declares it stalled (``StreamError(reason="stalled")``), closes it
  and replays on a new one; the pool closes the idle connections not heard
  from since then too (they may hang with it). Modal answers nothing for
  audio without words, so its quiet-period flush is not trusted either when
  ``stall_voiced_seconds`` of voiced audio got no answer: that audio is
  replayed once on a new connection (a second silence is taken as no words).
* **Bad credentials** (HTTP 401/403 at a handshake) end the stream with a
  fatal ``StreamError(reason="auth")``; the engine then refuses new streams
  for ``auth_retry_seconds`` instead of hammering the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import numpy as np

from live_transcription.clock import Clock, MonotonicClock, TimerHandle
from live_transcription.stt.base import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    Frame,
    Language,
    Pause,
    StreamError,
    SttEngine,
    SttStream,
    Word,
)
from live_transcription.stt.pool import (
    CLOSED,
    Connection,
    ConnectionPool,
    LeaseRequest,
    PoolOptions,
    backoff_delay,
)
from live_transcription.stt.replay import ConnectionTimeline, ReplayDeduper
from live_transcription.stt.stream import DrivenStream, running
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
_QUIET_POWER = 10 ** (-45 / 10) * FRAME_SAMPLES
"""A frame below -45 dBFS (what the audio gate calls silence) already flushes
the model like padding does."""


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """Timing and bounds of a remote stream (seconds unless said otherwise)."""

    flush_quiet_seconds: float = 1.0
    """Quiet-period flush: no word for this long after the padding = done."""
    flush_max_seconds: float = 5.0
    """Give up waiting for the flush after this long (the Pause still comes)."""
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    backoff_jitter: float = 0.1
    buffer_seconds: float = 15.0
    """Frames waiting to be sent (cold start, full server, reconnect): the bound."""
    replay_seconds: float = 15.0
    """Frames kept for replay since the last flushed pause: the bound."""
    handshake_warn_seconds: float = 5.0
    open_timeout_seconds: float = 120.0
    close_grace_seconds: float = 15.0
    """On close, how long to keep trying to flush unsent audio."""
    auth_retry_seconds: float = 60.0
    """After a 401, how long the engine refuses new streams."""
    stall_seconds: float = 4.0
    """A leased connection that has answered nothing for this long beyond the
    model delay, while audio sent on it waits for an answer, is replaced."""
    stall_voiced_seconds: float = 1.0
    """Voiced audio without any answer that makes a quiet-period flush suspect."""
    max_message_bytes: int = 1 << 20


class _Flush(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"
    WAITING = "waiting"


class RemoteStream(DrivenStream):
    """A speaker's stream to a remote Kyutai server; see the module docstring."""

    def __init__(self, engine: RemoteEngine) -> None:
        super().__init__(engine.options.buffer_seconds)
        self._engine = engine
        self._options = engine.options
        self._clock = engine.clock
        self._replay: deque[tuple[int, Frame]] = deque()
        replay_frames = max(1, round(self._options.replay_seconds / FRAME_SECONDS))
        self._unacked: deque[tuple[int, Frame]] = deque(maxlen=replay_frames)
        self._deduper = ReplayDeduper()
        self._inbox: deque[tuple[int, object]] = deque(maxlen=4096)
        self._flush = _Flush.IDLE
        self._flush_started = 0.0
        self._last_sent = -1
        self._flushed_through = -1
        """The last frame (stream index) sent before the flush in flight."""
        self._end_pending = False
        self._last_word_at = 0.0
        self._marker_id = 0
        self._words_since_pause = False
        self._last_was_pause = False
        self._server_paused = False
        self._close_deadline = 0.0
        self._request: LeaseRequest | None = None
        self._connection: Connection | None = None
        self._protocol: WireProtocol | None = None
        self._timeline = ConnectionTimeline()
        self._quiet_tail = 0
        """Quiet frames at the end of what was sent: they already flush."""
        self._failures = 0
        self._retry_at = 0.0
        self._speech_frames = 0
        self._flush_frames = 0
        self._timers: list[TimerHandle] = []
        self._logged_reasons: set[str] = set()
        # audio sent on the leased connection since its last answer
        self._unanswered_since: float | None = None
        self._unanswered_frames = 0
        self._unanswered_voiced = 0
        self._stall_armed = False
        self._stall_retried = False
        """The unacknowledged audio was already replayed after a stall."""
        # counters (read by metrics and tests)
        self.inbox_dropped = 0
        self.reconnects = 0
        self.frames_replayed = 0
        self.leases = 0
        self.stalls = 0

    # --- SttStream ---------------------------------------------------------------
    def end_of_speech(self) -> None:
        if self._finished:
            return
        if self._flush is not _Flush.IDLE:
            # speech came back and ended again while the flush was out: the
            # audio after the flush needs a flush of its own
            self._end_pending = True
            return
        if self._ring or self._unacked or self._replay:
            self._flush = _Flush.REQUESTED
            self._wake.set()

    @property
    def awaiting_flush(self) -> bool:
        """The flush is sent and its words are awaited."""
        return self._flush is _Flush.WAITING

    @property
    def duplicates_dropped(self) -> int:
        return self._deduper.duplicates_dropped

    # --- lifecycle ---------------------------------------------------------------
    def _on_close_requested(self) -> None:
        self._close_deadline = self._clock.now() + self._options.close_grace_seconds
        self._arm(self._options.close_grace_seconds)

    async def _release(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._request is not None and self._connection is None:
            self._engine.pool().cancel(self._request)
            granted = self._request.connection
            if granted is not None:  # granted after the stream ended
                self._engine.pool().give_back(granted, reusable=True)
        # a connection still leased here carries unflushed audio: not reusable
        self._give_back(reusable=False)

    # --- driver --------------------------------------------------------------------
    def _arm(self, delay: float) -> None:
        self._timers = self._timers[-16:]
        self._timers.append(self._clock.call_later(delay, self._wake.set))

    def _has_unflushed_audio(self) -> bool:
        return bool(self._ring or self._replay or self._unacked)

    async def _step(self) -> bool:
        self._process_inbox()
        if self._finished:
            return False
        now = self._clock.now()
        if self._closing and now >= self._close_deadline:
            if self._has_unflushed_audio():
                log.warning("stt stream closed before its last audio was flushed")
            self._finished = True
            return False
        if self._connection is not None and self._stalled(now):
            self._on_stalled(now)
        if self._connection is None:
            if not self._has_unflushed_audio():
                if self._closing:
                    self._finished = True
                return False
            if not self._lease(now):
                return False
        await self._send_pending()
        if self._connection is None:
            return True
        now = self._clock.now()
        if self._flush is _Flush.REQUESTED and not self._ring and not self._replay:
            await self._send_flush()
            return False
        if self._flush is _Flush.WAITING:
            self._check_flush(now)
            if self._connection is None:
                return True  # left as stalled: lease another
        if self._flush is _Flush.IDLE and not self._has_unflushed_audio():
            self._give_back(reusable=True)  # the flush is back: the next speaker may have it
            if self._closing:
                self._finished = True
        return False

    def _lease(self, now: float) -> bool:
        """True once a connection is leased; otherwise the pool wakes us."""
        request = self._request
        if request is None:
            if now < self._retry_at:
                self._arm(self._retry_at - now)
                return False
            onset = not self._unacked
            request = self._engine.pool().request(self._wake.set, self._report, onset=onset)
            self._request = request
        if request.failure is not None:
            self._request = None
            self.fail(request.failure.reason, request.failure.message)
            return False
        connection = request.connection
        if connection is None:
            return False
        self._request = None
        self._attach(connection)
        return True

    def _report(self, error: StreamError) -> None:
        self._events.put(error)

    def _attach(self, connection: Connection) -> None:
        self.leases += 1
        self._connection = connection
        self._protocol = connection.protocol
        connection.sink = self._on_message
        self._timeline = ConnectionTimeline(start_frame=connection.server_frames)
        self._server_paused = False
        self._quiet_tail = 0
        self._answered()
        if self._unacked:
            self.reconnects += 1
            self._deduper.start_replay(self._unacked[0][0] * FRAME_SECONDS)
            self._replay.extendleft(reversed(self._unacked))
            self._unacked.clear()
        if self._flush is _Flush.WAITING:
            self._flush = _Flush.REQUESTED

    def _give_back(self, *, reusable: bool) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        self._protocol = None
        self._answered()
        connection.last_frame_at = self._clock.now()
        self._record_audio()
        self._engine.pool().give_back(connection, reusable=reusable)

    def _record_audio(self) -> None:
        self._engine.pool().record_audio(self._speech_frames, self._flush_frames)
        self._speech_frames = self._flush_frames = 0

    async def _send_pending(self) -> None:
        connection = self._connection
        protocol = self._protocol
        assert connection is not None and protocol is not None
        while self._connection is connection and (self._replay or self._ring):
            if self._replay:
                index, frame = self._replay.popleft()
                self.frames_replayed += 1
            else:
                index, frame = self._ring.pop()
            self._unacked.append((index, frame))
            self._last_sent = index
            self._timeline.record_audio(index)
            connection.server_frames += 1
            self._speech_frames += 1
            quiet = float(np.dot(frame, frame)) < _QUIET_POWER
            self._quiet_tail = self._quiet_tail + 1 if quiet else 0
            self._await_answer(1, voiced=not quiet)
            if not await self._send(protocol.encode_audio(frame)):
                return

    async def _send_flush(self) -> None:
        connection = self._connection
        protocol = self._protocol
        assert connection is not None and protocol is not None
        self._marker_id = connection.next_marker()
        self._flushed_through = self._last_sent
        anchor = self._pushed
        for step in protocol.flush_plan(self._marker_id, quiet_frames=self._quiet_tail):
            if isinstance(step, Padding):
                silence = protocol.encode_audio(_SILENCE)
                self._timeline.record_padding(anchor, step.frames)
                connection.server_frames += step.frames
                self._flush_frames += step.frames
                self._await_answer(step.frames, voiced=False)
                for _ in range(step.frames):
                    if not await self._send(silence):
                        return
            elif isinstance(step, SendMarker) and not await self._send(
                protocol.encode_marker(step.marker_id)
            ):
                return
        self._record_audio()  # per utterance: a speaker may keep its lease for hours
        now = self._clock.now()
        self._flush = _Flush.WAITING
        self._flush_started = now
        self._last_word_at = now
        self._arm(self._options.flush_max_seconds)
        if not protocol.flush_by_marker:
            self._arm(self._options.flush_quiet_seconds)

    def _check_flush(self, now: float) -> None:
        protocol = self._protocol
        assert protocol is not None
        if now - self._flush_started >= self._options.flush_max_seconds:
            log.warning("stt flush timed out; closing the caption line anyway")
            self._complete_flush()
            return
        if protocol.flush_by_marker:
            return
        quiet = now - max(self._flush_started, self._last_word_at)
        if quiet >= self._options.flush_quiet_seconds:
            if self._flush_unanswered():
                self._on_stalled(now)
            else:
                self._complete_flush()
        else:
            self._arm(self._options.flush_quiet_seconds - quiet)

    def _complete_flush(self) -> None:
        self._flush = _Flush.IDLE
        # frames sent after the flush went out are not flushed yet: they keep
        # the connection (their words must not reach the next lessee)
        while self._unacked and self._unacked[0][0] <= self._flushed_through:
            self._unacked.popleft()
        if self._end_pending:
            self._end_pending = False
            if self._has_unflushed_audio():
                self._flush = _Flush.REQUESTED
        self._deduper.acknowledge_all()
        self._stall_retried = False
        self._failures = 0
        self._engine.pool().connection_works()
        if not self._last_was_pause:  # once per pause: the server may have said it already
            self._emit_pause()
        self._wake.set()

    def _emit_pause(self) -> None:
        self._words_since_pause = False
        self._last_was_pause = True
        self._events.put(Pause(audio_time=self._pushed * FRAME_SECONDS))

    async def _send(self, data: bytes) -> bool:
        connection = self._connection
        if connection is None:
            return False
        if not await connection.send(data):
            self._on_connection_lost(connection, "closed while sending")
            return False
        return True

    # --- connection --------------------------------------------------------------
    def _on_message(self, connection: Connection, message: object) -> None:
        """Called by the connection's receive loop: queue it for the driver."""
        if len(self._inbox) == self._inbox.maxlen:
            self.inbox_dropped += 1
        self._inbox.append((connection.number, message))
        self._wake.set()

    def _backoff(self) -> float:
        return backoff_delay(self._options, self._failures)

    def _on_connection_lost(
        self, connection: Connection, why: str, *, what: str = "lost", reason: str = "connection"
    ) -> None:
        if connection is not self._connection:
            return
        connection.sink = None
        self._give_back(reusable=False)
        if self._flush is _Flush.WAITING:
            self._flush = _Flush.REQUESTED  # the flush goes again after the replay
        if self._has_unflushed_audio() or self._flush is not _Flush.IDLE:
            # mid-utterance: lease another at once the first time, then back off
            self._retry_at = self._clock.now() + self._backoff()
            self._failures += 1
            self._events.put(StreamError(f"STT connection {what} ({why}); replaying", reason=reason))
        self._wake.set()

    # --- a connection that stops answering -----------------------------------------
    def _stall_bound(self) -> float:
        delay = self._protocol.delay_frames if self._protocol is not None else 0
        return self._options.stall_seconds + delay * FRAME_SECONDS

    def _await_answer(self, frames: int, *, voiced: bool) -> None:
        """``frames`` more frames went out on the leased connection."""
        if self._unanswered_since is None:
            self._unanswered_since = self._clock.now()
            self._arm_stall(self._stall_bound())
        self._unanswered_frames += frames
        if voiced:
            self._unanswered_voiced += frames

    def _answered(self) -> None:
        """The connection answered (or changed): nothing is awaited."""
        self._unanswered_since = None
        self._unanswered_frames = 0
        self._unanswered_voiced = 0

    def _arm_stall(self, delay: float) -> None:
        if not self._stall_armed:
            self._stall_armed = True
            self._timers = self._timers[-16:]
            self._timers.append(self._clock.call_later(delay, self._stall_due))

    def _stall_due(self) -> None:
        self._stall_armed = False
        self._wake.set()

    def _stalled(self, now: float) -> bool:
        """Audio has waited for any answer longer than the bound, and enough
        of it went out that an answer was due (more than the model delay)."""
        since = self._unanswered_since
        protocol = self._protocol
        if since is None or protocol is None:
            return False
        waited = now - since
        bound = self._stall_bound()
        if waited < bound:
            self._arm_stall(bound - waited)
            return False
        return self._unanswered_frames > protocol.delay_frames

    def _flush_unanswered(self) -> bool:
        """A quiet-period flush ended with voiced audio that got no answer at
        all: a silent connection cannot be told from audio without words, so
        the audio gets one more try on a new connection."""
        voiced = self._unanswered_voiced * FRAME_SECONDS
        return not self._stall_retried and voiced >= self._options.stall_voiced_seconds

    def _on_stalled(self, now: float) -> None:
        connection = self._connection
        assert connection is not None
        since = self._unanswered_since if self._unanswered_since is not None else now
        self.stalls += 1
        self._stall_retried = True
        self._engine.pool().connection_stalled(connection, silent_since=since, silent_for=now - since)
        self._on_connection_lost(
            connection, f"no answer for {now - since:.1f} s", what="stopped answering", reason="stalled"
        )

    # --- server events -------------------------------------------------------------
    def _process_inbox(self) -> None:
        while self._inbox and not self._finished:
            number, message = self._inbox.popleft()
            connection = self._connection
            if connection is None or number != connection.number:
                continue
            if message is CLOSED:
                self._on_connection_lost(connection, "closed by the server")
                continue
            if not isinstance(message, str | bytes) or self._protocol is None:
                continue
            self._answered()
            self._stall_retried = False
            for event in self._protocol.parse(message):
                self._on_server_event(event)

    def _on_server_event(self, event: ServerEvent) -> None:
        if isinstance(event, ServerWord):
            self._on_word(event)
        elif isinstance(event, ServerPause):
            if self._words_since_pause and not self._server_paused:
                self._emit_pause()
            self._server_paused = True
        elif isinstance(event, ServerMarker):
            if self._flush is _Flush.WAITING and event.marker_id == self._marker_id:
                self._complete_flush()
        elif isinstance(event, ServerError):
            self._log_once("server-error", f"STT server error: {event.message}")
            self._events.put(StreamError(event.message, reason="protocol"))
        elif isinstance(event, ServerProgress | ServerReady):
            pass
        elif isinstance(event, Ignored):
            self._log_once(event.reason, f"ignored an STT server message: {event.reason}")

    def _on_word(self, event: ServerWord) -> None:
        timeline = self._timeline
        assert self._protocol is not None
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
        self._engine.pool().connection_works()
        if self._deduper.accept(word):
            self._words_since_pause = True
            self._last_was_pause = False
            self._events.put(word)

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged_reasons:
            self._logged_reasons.add(key)
            log.warning("%s", message)


class RemoteEngine(SttEngine):
    """Shared parts of the remote engines: URL, headers, the connection pool,
    auth cool-off."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        protocol_factory: Callable[[], WireProtocol],
        *,
        options: RemoteOptions | None = None,
        pool: PoolOptions | None = None,
        clock: Clock | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.headers = dict(headers)
        self._protocol_factory = protocol_factory
        self.options = options or RemoteOptions()
        self.pool_options = pool or PoolOptions()
        self.clock: Clock = clock or MonotonicClock()
        self.ssl_context = ssl_context or ssl.create_default_context()
        self._auth_failed_at: float | None = None
        self._pool: ConnectionPool | None = None
        self._pool_task: asyncio.Task[None] | None = None
        self._closed = False
        self.connection_attempts = 0

    def languages(self) -> dict[str, Language]:
        return dict(KYUTAI_LANGUAGES)

    def new_protocol(self) -> WireProtocol:
        return self._protocol_factory()

    def running(self) -> AbstractAsyncContextManager[None]:
        return self._running()

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        async with asyncio.TaskGroup() as group:
            if self._pool is None:
                self._pool = ConnectionPool(self, self.pool_options)
            task = group.create_task(self._pool.run(), name="stt-pool")
            self._pool_task = task
            try:
                yield
            finally:
                task.cancel()

    def pool(self) -> ConnectionPool:
        """The engine's pool. Its task runs inside ``running()`` (the
        service); an engine used without it (tests, tools) starts the task on
        first use and ends it in ``aclose``."""
        if self._pool is None:
            self._pool = ConnectionPool(self, self.pool_options)
        if self._pool_task is None and not self._closed:
            self._pool_task = asyncio.get_running_loop().create_task(self._pool.run(), name="stt-pool")
        return self._pool

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
        stream = RemoteStream(self)
        if language not in KYUTAI_LANGUAGES:
            stream.fail("language", f"language {language!r} is not supported by Kyutai STT")
        elif self.auth_blocked():
            stream.fail("auth", "the STT server rejected the credentials recently")
        else:
            self.pool()  # a speaker joined: warm connections open before anyone talks
        return running(stream)

    async def aclose(self) -> None:
        self._closed = True
        task, self._pool_task = self._pool_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
