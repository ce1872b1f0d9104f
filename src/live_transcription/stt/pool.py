"""Warm connections to a remote Kyutai server, shared by the process' streams.

A connection holds a GPU batch slot (Modal) or a channel (moshi-server) for as
long as it is open, so a stream holds one only while its speaker talks: a
speaker that starts talking *leases* an open, idle connection (no handshake on
the caption path), sends its speech and the flush, and gives the connection
back once the flush has come back. A connection carries one speaker at a time
and is only handed over after the flush, so no word of one speaker can reach
another.

The pool (one task, ``run``, owns its state; streams call the non-blocking
``request``/``give_back``):

* **Headroom.** It keeps ``headroom`` idle connections beyond the ones
  waiting requests need: the configured minimum, or more when speech onsets
  come faster than a connection opens (the onsets expected while one opens,
  from the rate over the last ``onset_window_seconds`` and the measured
  opening time, plus two standard deviations, rounded down). A cold start
  (Modal scaling from zero) is absorbed by idle connections opened ahead of it.
* **Keep-alive.** An idle connection is sent one 80 ms frame of silence every
  ``keepalive_seconds`` (Modal closes after 30 s without a binary frame,
  moshi-server after 20 s with nothing received): the least that keeps it
  open, counted in ``live_transcription_stt_audio_seconds_total{kind="keepalive"}``.
* **Surplus.** An idle connection beyond the headroom is closed after
  ``surplus_seconds`` unused; an idle one the server closed is replaced
  (after a backoff when that keeps happening).
* **Capacity.** At most ``max_connections`` are open. When none is free, or
  the server refuses (moshi ``no free channels``, HTTP 429/503 on connect),
  requests wait in order while their streams keep buffering (bounded); the
  wait and its reason are counted. Refusals back off exponentially.
* **Credentials** rejected (HTTP 401/403) fail every waiting request fatally;
  the engine then refuses new streams for a while instead of hammering.
* **Stalls.** A lessee that finds its connection stopped answering closes it
  (``connection_stalled``); the idle connections not heard from since that
  one went silent are closed with it (they may hang on the same server), so
  the lessee's next lease is a new connection. Logged once per episode.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from live_transcription import metrics
from live_transcription.clock import TimerHandle
from live_transcription.stt.base import FRAME_SAMPLES, FRAME_SECONDS, StreamError
from live_transcription.stt.wire import ServerError, ServerReady, ServerWord, WireProtocol

if TYPE_CHECKING:
    from live_transcription.stt.remote import RemoteEngine

log = logging.getLogger(__name__)

SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.float32)
CLOSED = object()
"""Handed to a lease's sink when its connection has closed."""
CAPACITY_STATUSES = frozenset({429, 503})
STALL_EPISODE_SECONDS = 60.0
"""Stalls closer together than this are one episode: logged once."""


@dataclass(frozen=True, slots=True)
class PoolOptions:
    headroom: int = 1
    """Idle warm connections kept beyond the waiting requests (the minimum)."""
    max_connections: int = 512
    """Open and opening connections, at most (leased ones included)."""
    keepalive_seconds: float = 20.0
    """An idle connection gets one silent frame this often."""
    surplus_seconds: float = 30.0
    """An idle connection beyond the headroom is closed after this long unused."""
    onset_window_seconds: float = 60.0
    """Speech onsets are counted over this window to size the headroom."""

    def __post_init__(self) -> None:
        if self.headroom < 0 or self.max_connections < 1:
            raise ValueError("headroom must be >= 0 and max_connections >= 1")
        if self.keepalive_seconds <= 0 or self.surplus_seconds < 0 or self.onset_window_seconds <= 0:
            raise ValueError("keepalive_seconds and onset_window_seconds must be positive")


class BackoffOptions(Protocol):
    @property
    def backoff_initial_seconds(self) -> float: ...
    @property
    def backoff_max_seconds(self) -> float: ...
    @property
    def backoff_jitter(self) -> float: ...


def backoff_delay(options: BackoffOptions, failures: int) -> float:
    """No wait before the first retry, then exponential with jitter."""
    if failures <= 0:
        return 0.0
    base = min(options.backoff_max_seconds, options.backoff_initial_seconds * 2.0 ** min(failures - 1, 30))
    return base * (1.0 + options.backoff_jitter * random.random())


class State(enum.Enum):
    OPENING = "opening"
    IDLE = "idle"
    LEASED = "leased"


Sink = Callable[["Connection", object], None]


class Connection:
    """One open WebSocket. The pool owns it while idle, the lessee while leased."""

    def __init__(self, number: int, protocol: WireProtocol) -> None:
        self.number = number
        self.protocol = protocol
        self.ws: ClientConnection | None = None
        self.state = State.OPENING
        self.server_frames = 0
        """Frames sent on this connection (speech, flush and keep-alive)."""
        self.last_frame_at = 0.0
        self.idle_since = 0.0
        self.last_heard_at = 0.0
        """When the server last sent anything on it (or accepted it)."""
        self.sink: Sink | None = None
        self.closed = False
        self._markers = itertools.count(1)

    def next_marker(self) -> int:
        return next(self._markers)

    async def send(self, data: bytes) -> bool:
        """False when the connection is gone (its receive loop reports it)."""
        ws = self.ws
        if ws is None or self.closed:
            return False
        try:
            await ws.send(data)
        except ConnectionClosed:
            return False
        return True


class LeaseRequest:
    """A stream's place in the queue. The pool fills in ``connection`` (or
    ``failure``) and calls ``wake``; ``report`` passes non-fatal errors on."""

    __slots__ = ("connection", "failure", "reason", "report", "requested_at", "wake")

    def __init__(self, wake: Callable[[], None], report: Callable[[StreamError], None], now: float) -> None:
        self.wake = wake
        self.report = report
        self.requested_at = now
        self.connection: Connection | None = None
        self.failure: StreamError | None = None
        self.reason: str | None = None
        """Why it had to wait (``cold``, ``capacity``, ``reconnect``), or None."""


class ConnectionPool:
    def __init__(self, engine: RemoteEngine, options: PoolOptions) -> None:
        self._engine = engine
        self.options = options
        self._clock = engine.clock
        self._idle: deque[Connection] = deque()
        self._opening: set[Connection] = set()
        self._leased = 0
        # at most one request per live stream, and streams are bounded by the
        # speakers the service admits: this queue cannot grow past them
        self._waiting: deque[LeaseRequest] = deque()
        self._onsets: deque[float] = deque(maxlen=4096)
        self._open_seconds = 1.0  # moving average of the time a connection takes to open
        self._numbers = itertools.count(1)
        self._proven = False
        self._failures = 0
        self._retry_at = 0.0
        self._capacity_until = 0.0
        self._idle_losses = 0
        self._last_error: StreamError | None = None
        self._wake = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._timers: list[TimerHandle] = []
        self._stopped = False
        self._logged: set[str] = set()
        self._last_stall_at: float | None = None
        self._speech_metric = metrics.stt_audio_seconds.labels("speech")
        self._flush_metric = metrics.stt_audio_seconds.labels("flush")
        self._keepalive_metric = metrics.stt_audio_seconds.labels("keepalive")
        # counters (tests, metrics)
        self.opened = 0
        self.keepalives = 0
        self.surplus_closed = 0
        self.idle_lost = 0
        self.capacity_refusals = 0
        self.stalled = 0
        """Leased connections given up because they stopped answering."""
        self.stale_closed = 0
        """Idle connections closed with a stalled one."""
        self.unattributed = 0
        """Server words that arrived on an idle connection: dropped, never given to a speaker."""

    # --- for streams -------------------------------------------------------------------
    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def opening(self) -> int:
        return len(self._opening)

    @property
    def leased(self) -> int:
        return self._leased

    def request(
        self, wake: Callable[[], None], report: Callable[[StreamError], None], *, onset: bool
    ) -> LeaseRequest:
        """Ask for a connection; granted at once when one is idle. ``onset``:
        the speaker starts talking (counted to size the headroom), not a
        reconnect."""
        now = self._clock.now()
        request = LeaseRequest(wake, report, now)
        if onset:
            self._onsets.append(now)
        if self._engine.auth_blocked():
            request.failure = StreamError(
                "the STT server rejected the credentials", fatal=True, reason="auth"
            )
            return request
        self._waiting.append(request)
        self._grant()
        if request.connection is None:
            request.reason = "capacity" if self._at_capacity(now) else ("cold" if onset else "reconnect")
            if self._last_error is not None and self._failures > 0:
                request.report(self._last_error)
        self._wake.set()
        return request

    def cancel(self, request: LeaseRequest) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(request)
        self._wake.set()

    def give_back(self, connection: Connection, *, reusable: bool) -> None:
        """The lessee is done: the flush came back (``reusable``), or the
        connection failed or the stream ended mid-utterance (it is closed)."""
        if connection.state is State.LEASED:
            self._leased -= 1
        connection.sink = None
        if reusable and not connection.closed and not self._stopped:
            connection.state = State.IDLE
            connection.idle_since = self._clock.now()
            self._idle.append(connection)
            self._idle_losses = 0
            self._grant()
        else:
            self._close(connection)
        self._wake.set()

    def record_audio(self, speech_frames: int, flush_frames: int) -> None:
        """Audio a lessee sent, added per utterance and at the lease's end (not per frame)."""
        if speech_frames:
            self._speech_metric.inc(speech_frames * FRAME_SECONDS)
        if flush_frames:
            self._flush_metric.inc(flush_frames * FRAME_SECONDS)

    def connection_stalled(self, connection: Connection, *, silent_since: float, silent_for: float) -> None:
        """The lessee gives ``connection`` up (it gives it back, not reusable,
        right after): nothing came back for ``silent_for`` seconds."""
        self.stalled += 1
        stale = [c for c in self._idle if c.last_heard_at <= silent_since]
        for idle in stale:
            self._idle.remove(idle)
            self._close(idle)
        self.stale_closed += len(stale)
        now = self._clock.now()
        last, self._last_stall_at = self._last_stall_at, now
        if last is None or now - last >= STALL_EPISODE_SECONDS:
            log.warning(
                "the STT server stopped answering a connection (no answer for %.1f s to the audio sent):"
                " replacing it%s; the speaker's unacknowledged audio is sent again",
                silent_for,
                f" and {len(stale)} idle connection(s) silent since" if stale else "",
            )
        self._wake.set()

    def connection_works(self) -> None:
        """A lessee saw the server work (a word, a flush): failures are over."""
        self._failures = 0
        self._last_error = None

    # --- the pool's task ---------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                while True:
                    self._wake.clear()
                    self._maintain()
                    self._publish_gauges()
                    await self._wake.wait()
        finally:
            self._stopped = True
            for timer in self._timers:
                timer.cancel()
            for connection in [*self._idle, *self._opening]:
                self._close(connection)
            self._idle.clear()
            for request in self._waiting:
                request.failure = StreamError("the STT engine is shutting down", fatal=True, reason="closed")
                request.wake()
            self._waiting.clear()
            for state in State:
                metrics.stt_pool_streams.labels(state.value).set(0)
            metrics.stt_speakers_waiting.set(0)

    def _maintain(self) -> None:
        now = self._clock.now()
        self._grant()
        self._open_as_needed(now)
        self._keep_alive(now)
        self._close_surplus(now)

    def _headroom(self, now: float) -> int:
        window = self.options.onset_window_seconds
        while self._onsets and now - self._onsets[0] > window:
            self._onsets.popleft()
        # onsets expected while one connection opens, plus two standard
        # deviations (Poisson), so a burst of onsets finds warm connections
        expected = len(self._onsets) / window * self._open_seconds
        return max(self.options.headroom, math.floor(expected + 2 * math.sqrt(expected)))

    def _total(self) -> int:
        return len(self._idle) + len(self._opening) + self._leased

    def _at_capacity(self, now: float) -> bool:
        return self._total() >= self.options.max_connections or now < self._capacity_until

    def _open_as_needed(self, now: float) -> None:
        if self._stopped or self._engine.auth_blocked():
            return
        wanted = len(self._waiting) + self._headroom(now) - len(self._idle) - len(self._opening)
        room = self.options.max_connections - self._total()
        if wanted > 0 and room <= 0:
            for request in self._waiting:
                request.reason = "capacity"
        count = min(wanted, room)
        if count <= 0:
            return
        if not self._waiting and self._idle_losses:
            count = 1  # the server keeps closing idle connections: replace them slowly
        if not self._proven or self._failures > 0:
            # probe with one connection until the server is known to answer
            if self._opening:
                return
            count = 1
        if now < self._retry_at:
            self._arm(self._retry_at - now)
            return
        assert self._group is not None
        for _ in range(count):
            connection = Connection(next(self._numbers), self._engine.new_protocol())
            self._opening.add(connection)
            self._group.create_task(self._open(connection))

    def _keep_alive(self, now: float) -> None:
        interval = self.options.keepalive_seconds
        due_next = math.inf
        assert self._group is not None
        for connection in self._idle:
            due = connection.last_frame_at + interval
            if now >= due:
                connection.last_frame_at = now
                self._group.create_task(self._send_keepalive(connection))
                due = now + interval
            due_next = min(due_next, due)
        if due_next < math.inf:
            self._arm(due_next - now)

    async def _send_keepalive(self, connection: Connection) -> None:
        # leased meanwhile: its lessee's audio keeps it open, and an extra frame
        # would shift the lessee's timeline
        if connection.state is not State.IDLE or connection.closed:
            return
        connection.server_frames += 1
        self.keepalives += 1
        self._keepalive_metric.inc(FRAME_SECONDS)
        await connection.send(connection.protocol.encode_audio(SILENCE))

    def _close_surplus(self, now: float) -> None:
        surplus = len(self._idle) - self._headroom(now)
        if surplus <= 0:
            return
        oldest = min(self._idle, key=lambda c: c.idle_since)
        unused = now - oldest.idle_since
        if unused >= self.options.surplus_seconds:
            self._idle.remove(oldest)
            self.surplus_closed += 1
            log.debug("stt pool: closing a surplus idle connection")
            self._close(oldest)
            self._wake.set()
        else:
            self._arm(self.options.surplus_seconds - unused)

    def _grant(self) -> None:
        now = self._clock.now()
        while self._waiting and self._idle:
            connection = self._idle.popleft()
            if connection.closed:
                continue
            request = self._waiting.popleft()
            connection.state = State.LEASED
            self._leased += 1
            request.connection = connection
            waited = now - request.requested_at
            metrics.stt_lease_wait.observe(waited)
            if request.reason is not None:
                metrics.stt_lease_waits.labels(request.reason).inc()
            request.wake()

    def _publish_gauges(self) -> None:
        metrics.stt_pool_streams.labels("leased").set(self._leased)
        metrics.stt_pool_streams.labels("idle").set(len(self._idle))
        metrics.stt_pool_streams.labels("opening").set(len(self._opening))
        metrics.stt_speakers_waiting.set(len(self._waiting))

    def _arm(self, delay: float) -> None:
        self._timers = self._timers[-16:]
        self._timers.append(self._clock.call_later(delay, self._wake.set))

    # --- opening -------------------------------------------------------------------------
    async def _open(self, connection: Connection) -> None:
        engine = self._engine
        options = engine.options
        engine.connection_attempts += 1
        started = self._clock.now()
        warned = False

        def warn() -> None:
            nonlocal warned
            warned = True
            log.warning(
                "stt handshake still pending after %.0f s (a cold start can take 20-90 s);"
                " speakers' audio is buffered meanwhile",
                options.handshake_warn_seconds,
            )

        timer = self._clock.call_later(options.handshake_warn_seconds, warn)
        url = engine.url
        try:
            ws = await connect(
                url,
                additional_headers=dict(engine.headers),
                open_timeout=options.open_timeout_seconds,
                max_size=options.max_message_bytes,
                ssl=engine.ssl_context if url.startswith("wss://") else None,
                compression=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                self._auth_failed(connection, status)
            elif status in CAPACITY_STATUSES:
                self._refused_for_capacity(connection, f"HTTP {status}")
            else:
                self._open_failed(connection, "connection", f"the STT server answered HTTP {status}")
            return
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._open_failed(connection, "connection", f"cannot reach the STT server: {exc!r}")
            return
        finally:
            timer.cancel()
        if warned:
            log.info("stt handshake completed after a slow start")
        elapsed = self._clock.now() - started
        self._open_seconds = 0.8 * self._open_seconds + 0.2 * max(0.0, elapsed)
        connection.ws = ws
        connection.last_frame_at = self._clock.now()
        if self._stopped:
            self._close(connection)
            return
        assert self._group is not None
        self._group.create_task(self._receive(connection))
        if not connection.protocol.needs_ready:
            self._opened(connection)

    def _opened(self, connection: Connection) -> None:
        self._opening.discard(connection)
        connection.last_heard_at = self._clock.now()
        self._proven = True
        # the server answers again (a server that accepts and drops at once is
        # slowed down by the idle-loss count instead)
        self._failures = 0
        self._last_error = None
        self.opened += 1
        connection.state = State.IDLE
        connection.idle_since = self._clock.now()
        self._idle.append(connection)
        self._wake.set()

    def _open_failed(self, connection: Connection, reason: str, message: str) -> None:
        self._opening.discard(connection)
        self._close(connection)
        self._failures += 1
        delay = self._backoff()
        self._retry_at = self._clock.now() + delay
        self._log_once(reason, message)
        error = StreamError(f"{message}; retrying in {delay:.1f} s", reason=reason)
        self._last_error = error
        for request in self._waiting:
            request.report(error)
        self._arm(delay)
        self._wake.set()

    def _refused_for_capacity(self, connection: Connection, detail: str) -> None:
        self.capacity_refusals += 1
        for request in self._waiting:
            request.reason = "capacity"
        self._open_failed(connection, "capacity", f"the STT server is full ({detail})")
        self._capacity_until = self._retry_at

    def _auth_failed(self, connection: Connection, status: int) -> None:
        self._opening.discard(connection)
        self._close(connection)
        self._engine.record_auth_failure()
        message = f"the STT server rejected the credentials (HTTP {status})"
        log.error("%s", message)
        while self._waiting:
            request = self._waiting.popleft()
            request.failure = StreamError(message, fatal=True, reason="auth")
            request.wake()
        self._wake.set()

    def _backoff(self) -> float:
        return backoff_delay(self._engine.options, self._failures)

    # --- receiving -------------------------------------------------------------------------
    async def _receive(self, connection: Connection) -> None:
        ws = connection.ws
        assert ws is not None
        try:
            async for message in ws:
                self._dispatch(connection, message)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("stt receive loop failed")
        finally:
            self._on_closed(connection)

    def _dispatch(self, connection: Connection, message: object) -> None:
        connection.last_heard_at = self._clock.now()
        sink = connection.sink
        if sink is not None:
            sink(connection, message)
            return
        if not isinstance(message, str | bytes):
            return
        for event in connection.protocol.parse(message):
            if connection.state is State.OPENING:
                if isinstance(event, ServerReady):
                    self._opened(connection)
                elif isinstance(event, ServerError) and event.capacity:
                    self._refused_for_capacity(connection, event.message)
                    return
            elif isinstance(event, ServerWord):
                self.unattributed += 1

    def _on_closed(self, connection: Connection) -> None:
        was_closed = connection.closed
        connection.closed = True
        if connection.sink is not None:
            connection.sink(connection, CLOSED)
            return
        if connection.state is State.OPENING and connection in self._opening:
            self._open_failed(connection, "connection", "the STT server closed the connection at once")
        elif connection.state is State.IDLE and connection in self._idle:
            self._idle.remove(connection)
            if not was_closed:
                # the server closed an idle connection (its idle timeout, a restart)
                self.idle_lost += 1
                self._idle_losses += 1
                self._failures = max(self._failures, self._idle_losses - 1)
                self._retry_at = self._clock.now() + self._backoff()
            self._wake.set()

    def _close(self, connection: Connection) -> None:
        connection.closed = True
        connection.sink = None
        ws, connection.ws = connection.ws, None
        if ws is not None and self._group is not None and not self._stopped:
            self._group.create_task(_close_quietly(ws))
        elif ws is not None:
            ws.transport.abort()

    def _log_once(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s", message)


async def _close_quietly(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):  # the socket is going away either way
        await ws.close()
