"""The HTTP server's limits against slow and hostile clients.

uvicorn (0.54, h11) gives us the idle keep-alive timeout, the header size
limit (h11's 16 KiB) and a bounded graceful shutdown; it has no deadline on
receiving a request's headers or body, and its ``limit_concurrency`` answers
503 only after a request is parsed, to every route (the health check too),
while connections that never finish their headers hold file descriptors for
ever. So ``GuardedH11Protocol`` adds, per connection, the smallest layer on
top of uvicorn's own protocol:

- a deadline for the request headers, from the connection's start or the end
  of the previous response (partial bytes do not reset it);
- a deadline for the request body, from the end of the headers (408, closed);
- a bound on open connections: beyond ``max_connections`` a connection is
  served the operations routes only (everything else gets 503 and is closed),
  and beyond ``max_connections + operations_slots`` the connection that has
  waited longest for its request (headers or body) is closed to make room, so
  the health check (a complete request at once) is always answered and file
  descriptors never run out;
- malformed HTTP gets a JSON 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from live_transcription import metrics
from live_transcription.api.appapi import send_json
from live_transcription.config import Settings

log = logging.getLogger(__name__)

OPERATIONS_SLOTS = 32
"""Connections kept beyond ``max_connections`` for the operations routes."""

_CLOSED = {
    reason: metrics.http_connections_closed.labels(reason)
    for reason in ("header-timeout", "body-timeout", "evicted", "refused")
}


@dataclass(frozen=True, slots=True)
class FrontLimits:
    max_connections: int
    header_timeout: float
    body_timeout: float
    open_paths: frozenset[str]
    operations_slots: int = OPERATIONS_SLOTS

    @classmethod
    def from_settings(cls, settings: Settings, open_paths: Iterable[str]) -> FrontLimits:
        limits = cls(
            max_connections=settings.http_max_connections,
            header_timeout=settings.http_header_timeout,
            body_timeout=settings.http_body_timeout,
            open_paths=frozenset(open_paths),
        )
        return limits.within_descriptors(resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    def within_descriptors(self, soft_limit: int) -> FrontLimits:
        """Half the process's file descriptors at most go to HTTP connections;
        the other half is for calls (HPB sockets, WebRTC, STT streams)."""
        if soft_limit == resource.RLIM_INFINITY:
            return self
        budget = soft_limit // 2
        slots = min(self.operations_slots, max(1, budget // 4))
        if self.max_connections + slots <= budget:
            return self
        lowered = max(1, budget - slots)
        log.warning(
            "LT_HTTP_MAX_CONNECTIONS lowered from %d to %d: the process may open %d files",
            self.max_connections,
            lowered,
            soft_limit,
        )
        return FrontLimits(lowered, self.header_timeout, self.body_timeout, self.open_paths, slots)


class HttpFront:
    """The connections of one server, shared by their protocol instances (all
    on the event loop's thread, so plain dicts: no awaits in between)."""

    def __init__(self, limits: FrontLimits) -> None:
        self.limits = limits
        self.connections: dict[GuardedH11Protocol, None] = {}
        self.receiving: dict[GuardedH11Protocol, None] = {}
        """Connections whose request has not fully arrived, oldest first: the
        eviction order when the bound is reached."""

    def protocol_class(self) -> type[GuardedH11Protocol]:
        front = self

        class Protocol(GuardedH11Protocol):
            _front: ClassVar[HttpFront] = front

        return Protocol

    def opened(self, connection: GuardedH11Protocol) -> bool:
        """Count a new connection; False when it is beyond the bound (it may
        then use the operations routes only)."""
        self.connections[connection] = None
        metrics.http_connections.set(len(self.connections))
        if len(self.connections) > self.limits.max_connections + self.limits.operations_slots:
            self._make_room(connection)
        return len(self.connections) <= self.limits.max_connections

    def forget(self, connection: GuardedH11Protocol) -> None:
        self.connections.pop(connection, None)
        self.receiving.pop(connection, None)
        metrics.http_connections.set(len(self.connections))

    def _make_room(self, newcomer: GuardedH11Protocol) -> None:
        victim = next(iter(self.receiving), newcomer)
        reason = "evicted" if victim is not newcomer else "refused"
        _CLOSED[reason].inc()
        log.warning(
            "HTTP connection bound of %d reached: closed the connection that waited longest for its request",
            self.limits.max_connections + self.limits.operations_slots,
            extra={"event": "http-bound"},
        )
        victim.close_now()

    def abort_all(self) -> int:
        """Shutdown: cut every connection still open (after the grace)."""
        left = list(self.connections)
        for connection in left:
            connection.close_now(abort=True)
        return len(left)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines and bound above (one per connection)."""

    _front: ClassVar[HttpFront]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None  # headers | body | app
        self._deadline: asyncio.TimerHandle | None = None

    # --- uvicorn's protocol, wrapped ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if not self._front.opened(self):
            self.app = _operations_only(self.app, self._front.limits.open_paths)
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._front.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (uvicorn logged it): a JSON error like every other answer."""
        self._write_json_error(400, b"Bad Request", "malformed HTTP request")
        self.transport.close()

    def _write_json_error(self, status: int, reason: bytes, message: str) -> None:
        """A whole ``{"error": ...}`` answer, then the connection closes."""
        payload = json.dumps({"error": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=status, headers=headers, reason=reason),
                h11.Data(data=payload),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # a response was already under way: just close

    # --- deadlines ----------------------------------------------------------------------------
    def _follow(self) -> None:
        """Arm the deadline of the phase the request is in now."""
        if self.transport is None or self.transport.is_closing():
            self._cancel_deadline()
            return
        state = self.conn.their_state
        phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else "app"
        if phase == self._phase:
            return
        self._phase = phase
        self._cancel_deadline()
        limits = self._front.limits
        if phase != "body":  # a body keeps its place: its wait began with the headers
            self._front.receiving.pop(self, None)
        if phase == "headers":
            self._front.receiving[self] = None
            self._deadline = self.loop.call_later(limits.header_timeout, self._headers_too_slow)
        elif phase == "body":
            self._deadline = self.loop.call_later(limits.body_timeout, self._body_too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        _CLOSED["header-timeout"].inc()
        log.warning(
            "closed an HTTP connection that sent no complete request within %.1f s",
            self._front.limits.header_timeout,
            extra={"event": "http-header-timeout"},
        )
        self.close_now()

    def _body_too_slow(self) -> None:
        self._deadline = None
        _CLOSED["body-timeout"].inc()
        log.warning(
            "closed an HTTP connection whose request body did not arrive within %.1f s",
            self._front.limits.body_timeout,
            extra={"event": "http-body-timeout"},
        )
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self._write_json_error(408, b"Request Timeout", "request body not received in time")
        self.close_now()

    def close_now(self, *, abort: bool = False) -> None:
        """Close at once; the request's task (if any) sees a disconnect."""
        self._cancel_deadline()
        self._front.forget(self)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if self.transport is not None and not self.transport.is_closing():
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        elif abort and self.transport is not None:
            self.transport.abort()


def _operations_only(app: Any, open_paths: frozenset[str]) -> Any:
    """The app for a connection beyond the bound: the operations routes are
    served, anything else gets 503 and the connection is closed."""

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in open_paths:
            await app(scope, receive, send)
            return
        _CLOSED["refused"].inc()
        log.warning("too many HTTP connections: request refused", extra={"event": "http-refused"})
        await send_json(send, 503, {"error": "too many connections: try again later"}, close=True)

    return guarded
