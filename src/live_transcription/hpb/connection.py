"""``HpbLink``: one room's WebSocket to the HPB, implementing ``CallLink``.

Entering connects, says hello (internal auth), sets in-call, joins the room.
Inside, a reader and a writer run in a task group owned by the link. A lost
connection is resumed with the ``resumeid`` (no re-join); when the server has
forgotten the session (``no_such_session``) the link starts a new session:
everything the old session knew is dropped (every speaker leaves, queued
control messages go, ``SessionReset`` tells the room its Talk -> HPB mapping
is void), then it re-joins, and the participant list that follows rebuilds
speakers and mapping from scratch (the room asks fresh offers). Attempts
back off exponentially with jitter, without limit while the link is open.
Leaving sends ``bye`` and closes the socket.

Every outgoing message goes through the ``Outbox`` (bounded, control first,
partials throttled); only the writer sends (the handshake sends before the
writer starts). Leaving gives the writer up to ``drain_seconds`` to send
what is still queued (the last finals of a closing room), then says ``bye``.

A caption is only written while both its target and its speaker are in the
room as the HPB last reported it: nothing is sent to, or names, a session the
HPB no longer has (a target that left, the sessions before an HPB restart,
an old speaker's last final racing a new session).

Metrics: captions are counted by kind when the writer has sent them; drops
(superseded partials, overflow while the HPB is gone, left unsent at close)
are added from the outbox's counters when captions are queued and at close;
reconnection attempts are counted by outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from live_transcription import metrics
from live_transcription.clock import Clock, MonotonicClock
from live_transcription.config import Settings
from live_transcription.hpb import protocol
from live_transcription.hpb.failures import FailureCause, describe_failure
from live_transcription.hpb.outbox import Message, Outbox, backoff_delay
from live_transcription.hpb.participants import ParticipantsState
from live_transcription.logs import fields, short_token
from live_transcription.rooms.ports import (
    CallEvent,
    CandidateReceived,
    HpbUnavailable,
    LinkState,
    LocalCandidate,
    OfferFailed,
    OfferReceived,
    ReconnectFailed,
    SessionReset,
    SpeakerLeft,
)

log = logging.getLogger(__name__)

NOT_FATAL_ERRORS = frozenset({"client_not_found", "processing_failed"})
_OFFER_REQUESTS_KEPT = 256

_SENT = {kind: metrics.captions_sent.labels(kind) for kind in ("partial", "final")}
_DROPPED_SUPERSEDED = metrics.captions_dropped.labels("throttled-superseded")
_DROPPED_OVERFLOW = metrics.captions_dropped.labels("hpb-down-overflow")
_DROPPED_UNSENT = metrics.captions_dropped.labels("unsent-at-close")
_DROPPED_SESSION_GONE = metrics.captions_dropped.labels("session-gone")
_RECONNECTS = {
    outcome: metrics.hpb_reconnects.labels(outcome) for outcome in ("resumed", "new-session", "failed")
}


@dataclass(frozen=True)
class HpbLinkFactory:
    """``CallLinkFactory``: ``factory(room_token)`` -> an ``HpbLink`` to enter."""

    ws_url: str
    internal_secret: str = field(repr=False)
    backend_url: str
    verify_tls: bool = True
    clock: Clock = field(default_factory=MonotonicClock)
    rng: random.Random = field(default_factory=random.Random)
    hello_version: str = "2.0"
    nick: str = "Live transcription"
    partial_interval: float = 0.3
    reply_timeout: float = 10.0
    resume_window: float = 30.0
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    too_many_requests_penalty: int = 3  # extra doublings of the backoff
    control_limit: int = 1024
    transcript_limit: int = 512
    event_limit: int = 1024
    drain_seconds: float = 2.0
    participants_state: Callable[[], ParticipantsState] = ParticipantsState
    """Who is in the room, per HPB session of ours (a seam for tests)."""

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> HpbLinkFactory:
        return cls(
            ws_url=settings.hpb_ws_url,
            internal_secret=settings.internal_secret.get_secret_value(),
            backend_url=settings.backend_url,
            verify_tls=not settings.skip_cert_verify,
            partial_interval=settings.partial_interval_ms / 1000,
            **overrides,
        )

    def __call__(self, room_token: str) -> HpbLink:
        return HpbLink(room_token, self)


class _ConnectionLost(Exception):
    pass


class _TooManyRequests(Exception):
    pass


class HpbLink:
    def __init__(self, room: str, config: HpbLinkFactory) -> None:
        self.room = room
        self._short = short_token(room)
        self._fields = fields(room)
        self._cfg = config
        self._clock = config.clock
        self._ids = itertools.count(1)
        self._state = config.participants_state()
        self._outbox = Outbox(
            self._build_transcript,
            control_limit=config.control_limit,
            transcript_limit=config.transcript_limit,
            partial_interval=config.partial_interval,
        )
        self._events: asyncio.Queue[CallEvent | None] = asyncio.Queue(config.event_limit)
        self._requested: set[str] = set()  # speakers we asked offers from
        self._offer_requests: dict[str, str] = {}  # requestoffer message id -> speaker
        self._ws: ClientConnection | None = None
        self._session_id: str | None = None
        self._resume_id: str | None = None
        self._wake = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._timer_due = 0.0
        self._closed = False
        self._progress = asyncio.Event()  # the writer sent something
        self._reported_superseded = 0
        self._reported_overflow = 0
        # counters (health, metrics, tests)
        self.malformed_frames = 0
        self.resumes = 0
        self.session_resets = 0
        self.skipped_media = 0
        self.captions_to_gone_sessions = 0

    # --- CallLink -------------------------------------------------------------------
    @property
    def session_id(self) -> str | None:
        return self._session_id if self._ws is not None else None

    @property
    def transcripts_dropped(self) -> int:
        return self._outbox.transcripts_dropped

    @property
    def control_refused(self) -> int:
        return self._outbox.control_refused

    async def events(self) -> AsyncIterator[CallEvent]:
        while not (self._closed and self._events.empty()):
            event = await self._events.get()
            if event is None:
                return
            yield event

    def request_offer(self, speaker: str) -> None:
        self._requested.add(speaker)
        msg_id = self._next_id()
        # a refusal echoes the id; success sends no reply, so keep only the latest few
        self._offer_requests[msg_id] = speaker
        while len(self._offer_requests) > _OFFER_REQUESTS_KEPT:
            self._offer_requests.pop(next(iter(self._offer_requests)))
        self._control(protocol.request_offer(msg_id, speaker))

    def send_answer(self, speaker: str, sid: str, sdp: str) -> None:
        self._control(protocol.answer(self._next_id(), speaker, sid, sdp, self._cfg.nick))

    def send_candidate(self, speaker: str, sid: str, candidate: LocalCandidate) -> None:
        self._control(
            protocol.candidate(
                self._next_id(),
                speaker,
                sid,
                candidate_line=candidate.candidate,
                sdp_mid=candidate.sdp_mid,
                sdp_mline_index=candidate.sdp_mline_index,
            )
        )

    def send_transcript(
        self, targets: Collection[str], speaker: str, text: str, final: bool, language: str
    ) -> None:
        if self._closed or not targets:
            return
        self._outbox.add_transcript(targets, speaker, text, final, language, now=self._clock.now())
        self._report_drops()
        self._wake.set()
        self._arm_timer()

    # --- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> HpbLink:
        ws = await self._connect()
        try:
            await self._hello(ws)
            await self._join(ws)
        except (ConnectionClosed, TimeoutError, OSError, _TooManyRequests) as exc:
            ws.transport.abort()
            raise HpbUnavailable(f"HPB handshake failed: {exc!r}") from exc
        except BaseException:
            ws.transport.abort()
            raise
        self._ws = ws
        await self._emit(LinkState("connected"))
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._runner = self._tasks.create_task(self._run(ws), name=f"hpb-link-{self.room}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closed = True
        try:
            await self._drain()
        finally:
            for task in (self._runner, self._timer):
                if task is not None:
                    task.cancel()
            try:
                if self._tasks is not None:
                    await self._tasks.__aexit__(None, None, None)
            finally:
                # a finished task keeps its exception, whose traceback holds
                # this link's frames: no cycle left behind
                self._runner = self._timer = None
                self._tasks = None
                ws, self._ws = self._ws, None
                if ws is not None:
                    await self._say_bye(ws)
                self._report_drops()
                unsent = self._outbox.clear_transcripts()
                if unsent:
                    _DROPPED_UNSENT.inc(unsent)
                    log.warning(
                        "room %s: %d caption message(s) left unsent at close",
                        self._short,
                        unsent,
                        extra=self._fields,
                    )
                for item in (LinkState("closed"), None):
                    with contextlib.suppress(asyncio.QueueFull):
                        self._events.put_nowait(item)

    async def _drain(self) -> None:
        """Let the writer send what is queued (bounded by ``drain_seconds``)."""
        runner = self._runner
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._cfg.drain_seconds):
                while self._outbox.peek() is not None and runner is not None and not runner.done():
                    self._progress.clear()
                    await self._progress.wait()

    async def _say_bye(self, ws: ClientConnection) -> None:
        """Best effort: the session is released at once instead of lingering."""
        with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
            async with asyncio.timeout(2):
                await ws.send(protocol.encode(protocol.bye(self._next_id())))
        with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
            await ws.close()
        ws.transport.abort()

    # --- connection and handshake -------------------------------------------------------
    async def _connect(self) -> ClientConnection:
        url = self._cfg.ws_url
        options: dict[str, Any] = {}
        if url.startswith("wss://"):
            context = ssl.create_default_context()
            if not self._cfg.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            options["ssl"] = context
        try:
            return await connect(
                url,
                open_timeout=self._cfg.reply_timeout,
                ping_interval=self._cfg.ping_interval,
                ping_timeout=self._cfg.ping_timeout,
                close_timeout=2,
                max_size=4 * protocol.MAX_FRAME_BYTES,
                compression=None,
                **options,
            )
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise HpbUnavailable(f"cannot connect to the HPB: {exc!r}") from exc

    async def _request(self, ws: ClientConnection, message: Message) -> protocol.ServerEvent:
        """Send ``message`` and read until its reply; other frames are handled."""
        await ws.send(protocol.encode(message))
        async with asyncio.timeout(self._cfg.reply_timeout):
            while True:
                event = protocol.parse(await ws.recv())
                replies = (protocol.HelloOk, protocol.RoomJoined, protocol.Error)
                if isinstance(event, replies) and event.id in (message["id"], None):
                    return event
                await self._on_event(event)

    def _refused(self, what: str, error: protocol.Error) -> Exception:
        if error.code == "too_many_requests":
            return _TooManyRequests(what)
        return HpbUnavailable(f"{what} refused by the HPB: {error.code} {error.message}")

    async def _hello(self, ws: ClientConnection, level: int = logging.INFO) -> None:
        message = protocol.hello(
            self._next_id(),
            secret=self._cfg.internal_secret,
            backend=self._cfg.backend_url,
            version=self._cfg.hello_version,
        )
        reply = await self._request(ws, message)
        if isinstance(reply, protocol.Error):
            raise self._refused("hello", reply)
        assert isinstance(reply, protocol.HelloOk)
        self._session_id = reply.session_id
        self._resume_id = reply.resume_id
        self._state.own_session_id = reply.session_id
        log.log(level, "HPB session started for room %s", self._short, extra=self._fields)

    async def _resume(self, ws: ClientConnection) -> bool:
        """True when the old session lives on (still in the room)."""
        assert self._resume_id is not None
        message = protocol.resume(self._next_id(), self._resume_id, version=self._cfg.hello_version)
        reply = await self._request(ws, message)
        if isinstance(reply, protocol.HelloOk) and reply.session_id == self._session_id:
            if reply.resume_id:
                self._resume_id = reply.resume_id
            return True
        if isinstance(reply, protocol.Error) and reply.code != "no_such_session":
            raise self._refused("resume", reply)
        self._resume_id = None
        return False

    async def _join(self, ws: ClientConnection) -> None:
        # in call without audio first, then the room: browsers never ask us for offers
        await ws.send(protocol.encode(protocol.incall(self._next_id())))
        assert self._session_id is not None
        reply = await self._request(ws, protocol.join_room(self._next_id(), self.room, self._session_id))
        if isinstance(reply, protocol.Error) and reply.code != "already_joined":
            raise self._refused("room join", reply)

    # --- running -----------------------------------------------------------------------
    async def _run(self, ws: ClientConnection) -> None:
        while True:
            await self._serve(ws)
            self._ws = None
            await self._emit(LinkState("reconnecting"))
            ws = await self._reconnect()
            self._ws = ws
            await self._emit(LinkState("connected"))

    async def _serve(self, ws: ClientConnection) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._read(ws))
                tasks.create_task(self._write(ws))
        except* _ConnectionLost:
            # told at INFO once the link is back (or as part of the process's outage line)
            log.debug("HPB connection of room %s lost", self._short, extra=self._fields)
            ws.transport.abort()

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                await self._on_event(protocol.parse(frame))
        raise _ConnectionLost

    async def _write(self, ws: ClientConnection) -> None:
        while True:
            self._wake.clear()
            message = self._outbox.peek()
            if message is None:
                await self._wake.wait()
                continue
            if self._to_gone_session(message):
                self._outbox.sent(message)  # dropped: never written
                self.captions_to_gone_sessions += 1
                _DROPPED_SESSION_GONE.inc()
                continue
            try:
                await ws.send(protocol.encode(message))
            except ConnectionClosed:
                raise _ConnectionLost from None
            counter = _SENT.get(self._outbox.sent(message) or "")
            if counter is not None:
                counter.inc()
            self._progress.set()

    async def _reconnect(self) -> ClientConnection:
        """Reconnect until it works. Each failed attempt goes to the room as
        ``ReconnectFailed`` (the process logs an HPB outage once, not per room
        and attempt): this room's own lines are DEBUG then, and INFO only for
        a loss that no failed attempt reported (a blip)."""
        lost_at = self._clock.now()
        attempt = 0
        failed = 0
        while True:
            if attempt:  # the first attempt is immediate: most drops are blips
                await self._clock.sleep(
                    backoff_delay(
                        attempt - 1,
                        self._cfg.rng,
                        base=self._cfg.backoff_base,
                        cap=self._cfg.backoff_cap,
                    )
                )
            attempt += 1
            began = self._clock.now()
            try:
                ws = await self._connect()
            except HpbUnavailable as exc:
                failed += 1
                await self._attempt_failed(attempt, began, exc, describe_failure(exc))
                continue
            level = logging.INFO if failed == 0 else logging.DEBUG
            try:
                resumable = self._clock.now() - lost_at < self._cfg.resume_window
                if self._resume_id and resumable and await self._resume(ws):
                    self.resumes += 1
                    _RECONNECTS["resumed"].inc()
                    log.log(
                        level,
                        "HPB connection of room %s lost, then resumed after %.1f s",
                        self._short,
                        self._clock.now() - lost_at,
                        extra=self._fields | {"event": "hpb-link", "state": "resumed"},
                    )
                    return ws
                await self._hello(ws, level)
                await self._session_reset(level)
                await self._join(ws)
                _RECONNECTS["new-session"].inc()
                return ws
            except _TooManyRequests as exc:
                failed += 1
                too_many = FailureCause("refused-by-hpb", "too many requests")
                await self._attempt_failed(attempt, began, exc, too_many)
                attempt += self._cfg.too_many_requests_penalty  # back off longer
            except (HpbUnavailable, ConnectionClosed, TimeoutError, OSError) as exc:
                failed += 1
                await self._attempt_failed(attempt, began, exc, describe_failure(exc))
            except BaseException:
                ws.transport.abort()
                raise
            ws.transport.abort()

    async def _attempt_failed(
        self, attempt: int, began: float, error: BaseException, cause: FailureCause
    ) -> None:
        _RECONNECTS["failed"].inc()
        log.debug(
            "HPB reconnect %d of room %s failed (%s): %r",
            attempt,
            self._short,
            cause.words,
            error,
            extra=self._fields,
        )
        await self._emit(ReconnectFailed(cause, began))

    async def _session_reset(self, level: int) -> None:
        """Forget what belonged to the old session, before the new one joins."""
        self.session_resets += 1
        stale = self._outbox.clear_control()
        self._offer_requests.clear()
        log.log(
            level,
            "HPB session of room %s was replaced (the HPB had forgotten it); "
            "%d queued control messages dropped",
            self._short,
            stale,
            extra=self._fields | {"event": "hpb-link", "state": "replaced"},
        )
        await self._emit_all(self._state.reset(self._session_id))
        self._requested.clear()
        await self._emit(SessionReset())

    # --- incoming -----------------------------------------------------------------------
    async def _on_event(self, event: protocol.ServerEvent) -> None:
        match event:
            case protocol.ParticipantsUpdate():
                if event.room_id in (None, self.room):
                    await self._emit_all(self._state.apply(event))
            case protocol.RoomEvent(kind="leave"):
                await self._emit_all(self._state.leave(event.session_ids))
            case protocol.Offer():
                if event.sender in self._requested:
                    await self._emit(OfferReceived(event.sender, event.sid, event.sdp))
                else:
                    self._skip_media("offer", event.sender)
            case protocol.Candidate():
                if event.sender in self._requested:
                    await self._emit(
                        CandidateReceived(
                            event.sender,
                            event.sid,
                            event.candidate,
                            event.sdp_mid,
                            event.sdp_mline_index,
                        )
                    )
                else:
                    self._skip_media("candidate", event.sender)
            case protocol.Error(code=code) if code in NOT_FATAL_ERRORS:
                log.info("HPB error in room %s: %s %s", self._short, code, event.message, extra=self._fields)
                speaker = self._offer_requests.pop(event.id, None) if event.id else None
                if speaker is not None:
                    await self._emit(OfferFailed(speaker, code))
            case protocol.Error():
                log.warning(
                    "HPB error in room %s: %s %s", self._short, event.code, event.message, extra=self._fields
                )
            case protocol.RoomJoined(room_id=room_id) if room_id != self.room:
                log.warning(
                    "the HPB moved room %s's session to %s",
                    self._short,
                    short_token(room_id or ""),
                    extra=self._fields,
                )
            case protocol.Malformed():
                self.malformed_frames += 1
                if self.malformed_frames == 1 or self.malformed_frames % 100 == 0:
                    log.warning(
                        "skipped %d malformed HPB frame(s) in room %s: %s",
                        self.malformed_frames,
                        self._short,
                        event.reason,
                        extra=self._fields,
                    )
            case _:
                log.debug("HPB event ignored: %s", type(event).__name__, extra=self._fields)

    def _to_gone_session(self, message: Message) -> bool:
        """A transcript whose target or speaker the HPB no longer reports."""
        if message.get("type") != "message":
            return False
        body = message["message"]
        data = body["data"]
        if data.get("type") != "transcript":
            return False
        target = body["recipient"]["sessionid"]
        return not (self._state.has(target) and self._state.has(data["speakerSessionId"]))

    def _skip_media(self, what: str, sender: str) -> None:
        self.skipped_media += 1
        log.info("skipped %s from unrequested session %s", what, sender, extra=self._fields)

    async def _emit_all(self, events: list[CallEvent]) -> None:
        for event in events:
            if isinstance(event, SpeakerLeft):
                self._requested.discard(event.session_id)
                self._outbox.forget_speaker(event.session_id)
            await self._emit(event)

    async def _emit(self, event: CallEvent) -> None:
        await self._events.put(event)  # full queue = back pressure on the reader

    # --- outgoing -------------------------------------------------------------------------
    def _next_id(self) -> str:
        return str(next(self._ids))

    def _build_transcript(self, target: str, speaker: str, text: str, final: bool, language: str) -> Message:
        return protocol.transcript(
            self._next_id(), target, speaker=speaker, text=text, final=final, language=language
        )

    def _report_drops(self) -> None:
        """Add the outbox's drop counts to the metrics (cheap: two int compares)."""
        superseded = self._outbox.partials_superseded
        if superseded != self._reported_superseded:
            _DROPPED_SUPERSEDED.inc(superseded - self._reported_superseded)
            self._reported_superseded = superseded
        overflow = self._outbox.transcripts_dropped
        if overflow != self._reported_overflow:
            _DROPPED_OVERFLOW.inc(overflow - self._reported_overflow)
            self._reported_overflow = overflow

    def _control(self, message: Message) -> None:
        if self._closed:
            log.debug("link of room %s closed: %s not sent", self._short, message["type"], extra=self._fields)
            return
        if not self._outbox.add_control(message):
            log.error(
                "outgoing control queue of room %s full: %s dropped (%d so far)",
                self._short,
                message["type"],
                self._outbox.control_refused,
                extra=self._fields,
            )
        self._wake.set()

    def _arm_timer(self) -> None:
        """Make sure a timer releases the earliest pending partial when due."""
        due = self._outbox.next_due()
        if due is None or self._tasks is None or self._closed:
            return
        if self._timer is not None and not self._timer.done():
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._tasks.create_task(self._release_at(due))

    async def _release_at(self, due: float) -> None:
        await self._clock.sleep(due - self._clock.now())
        self._timer = None
        self._outbox.release_due(self._clock.now())
        self._wake.set()
        self._arm_timer()
