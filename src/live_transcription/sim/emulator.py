"""An HPB (nextcloud-spreed-signaling) emulator: a development tool.

A WebSocket server on 127.0.0.1 (path ``/spreed``) speaking the signaling
protocol of PROTOCOLS.md section 2 the way the real server does: ``welcome``,
hello 1.0/2.0 with ``internal`` auth checked by the real HMAC and ``client``
auth for browser-like test participants, resume, rooms, participants
``update`` events, ``internal``/``incall``, message relay with ``sender``
filled in, and ``requestoffer`` through a pluggable media bridge.

Tests and the demo drive it like Nextcloud drives the real server: a
backend-style API adds participants (with or without a socket), changes
in-call flags and ends calls. Every message a session sent is recorded
(bounded). Fault knobs: drop sockets, refuse resume, delay replies, send
garbage, stop and restart on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger(__name__)

SERVER_FEATURES = [
    "audio-video-permissions",
    "incall-all",
    "hello-v2",
    "internal-incall",
    "switchto",
    "welcome",
]
Json = dict[str, Any]


class MediaBridge(Protocol):
    async def request_offer(self, subscriber: str, publisher: str) -> tuple[str, str]:
        """Subscribe `subscriber` to `publisher`'s media; return (sid, offer_sdp).
        LookupError if the publisher has no media."""
        ...

    async def answer(self, subscriber: str, publisher: str, sid: str, sdp: str) -> None: ...

    async def candidate(
        self, subscriber: str, publisher: str, sid: str, candidate: dict[str, object]
    ) -> None: ...

    async def close_subscriber(self, subscriber: str) -> None:
        """The subscriber's session left: close its subscriptions."""
        ...


@dataclass(eq=False)
class _Session:
    session_id: str
    user_id: str
    internal: bool = False
    virtual: bool = False
    resume_id: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    ws: ServerConnection | None = None
    backend_only: bool = False  # a participant without a socket (media via the bridge)
    room: str | None = None
    nextcloud_session_id: str | None = None
    in_call: int = 0
    detached_at: float | None = None
    backlog: deque[str] = field(default_factory=lambda: deque(maxlen=200))

    def entry(self) -> Json:
        entry: Json = {
            "sessionId": self.session_id,
            "inCall": self.in_call,
            "lastPing": 0,
            "participantType": 3,
        }
        if self.nextcloud_session_id:
            entry["nextcloudSessionId"] = self.nextcloud_session_id
        if self.user_id and not self.internal:
            entry["userId"] = self.user_id
        if self.internal:
            entry["internal"] = True
        if self.virtual:
            entry["virtual"] = True
        return entry


def _error(msg_id: object, code: str, message: str) -> Json:
    reply: Json = {"type": "error", "error": {"code": code, "message": message}}
    if isinstance(msg_id, str):
        reply["id"] = msg_id
    return reply


class HpbEmulator:
    """``async with HpbEmulator(secret, backend) as hpb: hpb.url``."""

    def __init__(
        self,
        internal_secret: str,
        backend_url: str,
        *,
        bridge: MediaBridge | None = None,
        send_welcome: bool = True,
        resume_window: float = 30.0,
        recording_limit: int = 10_000,
        auto_create_rooms: bool = True,
    ) -> None:
        self.internal_secret = internal_secret
        self.backend_url = backend_url.rstrip("/")
        self.bridge = bridge
        self.send_welcome = send_welcome
        self.resume_window = resume_window
        self.auto_create_rooms = auto_create_rooms
        # fault knobs
        self.refuse_resume = False
        self.hello_error: str | None = None  # e.g. "too_many_requests": refuse every hello
        self.reply_delay = 0.0
        self.accept_clients = True
        self.silent = False  # a hung HPB: every message is recorded, none answered
        self._server: Server | None = None
        self._port = 0
        self._sessions: dict[str, _Session] = {}
        self._rooms: dict[str, set[str]] = {}
        self._subscriptions: set[tuple[str, str]] = set()
        self._connections: set[ServerConnection] = set()
        self._log: deque[tuple[str | None, Json]] = deque(maxlen=recording_limit)
        self._activity = asyncio.Event()
        self._counter = itertools.count(1)

    # --- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> HpbEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen (again on the same port after ``stop``)."""
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            self._port,
            process_request=self._check_path,
            max_size=4 << 20,
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self, *, forget_sessions: bool = True) -> None:
        """Close the server and every socket; a restarted server has lost its
        sessions like a real one (unless ``forget_sessions`` is False)."""
        if self._server is not None:
            for ws in list(self._connections):
                ws.transport.abort()
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if forget_sessions:
            for session in [s for s in self._sessions.values() if not s.backend_only]:
                await self._remove_session(session)
        self._changed()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/spreed"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?")[0] != "/spreed":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        return None

    # --- backend-style API ------------------------------------------------------------
    def create_room(self, token: str) -> None:
        self._rooms.setdefault(token, set())

    async def add_participant(
        self,
        token: str,
        *,
        session_id: str | None = None,
        nextcloud_session_id: str | None = None,
        in_call: int = 0,
        user_id: str = "",
        internal: bool = False,
        virtual: bool = False,
    ) -> str:
        """A participant without a socket (its media comes from the bridge)."""
        self.create_room(token)
        sid = session_id or f"participant-{next(self._counter)}-{secrets.token_hex(4)}"
        session = _Session(
            sid,
            user_id,
            internal=internal,
            virtual=virtual,
            backend_only=True,
            room=token,
            nextcloud_session_id=nextcloud_session_id or f"nc-{sid}",
            in_call=in_call,
        )
        self._sessions[sid] = session
        self._rooms[token].add(sid)
        await self._room_event(token, "join", [self._join_entry(session)], exclude=sid)
        await self._participants_changed(token, [session])
        return sid

    async def set_in_call(self, session_id: str, flags: int) -> None:
        """Change the in-call flags of any participant (with or without a socket)."""
        session = self._sessions[session_id]
        session.in_call = flags
        if session.room is not None:
            await self._participants_changed(session.room, [session])

    async def remove_participant(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            await self._remove_session(session)

    async def end_call(self, token: str) -> None:
        """The call ends for everybody (``all`` with ``incall: 0``)."""
        for sid in self._rooms.get(token, ()):
            self._sessions[sid].in_call = 0
        update = {"roomid": token, "incall": 0, "all": True}
        await self._to_room(token, _participants_event(update))

    def session(self, session_id: str) -> Json | None:
        """A session's participant entry, None when it does not exist."""
        session = self._sessions.get(session_id)
        return None if session is None else session.entry() | {"room": session.room}

    def sessions_in_room(self, token: str, *, internal: bool | None = None) -> list[str]:
        return sorted(
            sid
            for sid in self._rooms.get(token, ())
            if internal is None or self._sessions[sid].internal == internal
        )

    def connected(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        return session is not None and session.ws is not None

    # --- recording ------------------------------------------------------------------
    def received(self, session_id: str | None = None) -> list[Json]:
        """Messages received from ``session_id`` (None: before any session)."""
        return [msg for sid, msg in self._log if sid == session_id]

    def received_all(self) -> list[tuple[str | None, Json]]:
        return list(self._log)

    async def wait_for(self, condition: Callable[[], bool], deadline: float = 30.0) -> None:
        """Wait (on emulator activity, not on time) until ``condition()``."""
        async with asyncio.timeout(deadline):
            while not condition():
                event = self._activity
                await event.wait()

    def _changed(self) -> None:
        self._activity.set()
        self._activity = asyncio.Event()

    # --- fault knobs ---------------------------------------------------------------------
    def drop(self, session_id: str) -> None:
        """Cut a session's socket without a closing handshake (resume stays possible)."""
        session = self._sessions.get(session_id)
        if session is not None and session.ws is not None:
            session.ws.transport.abort()

    def drop_all(self) -> None:
        for ws in list(self._connections):
            ws.transport.abort()

    async def expire(self, session_id: str) -> None:
        """End a session as if its resume window had passed."""
        await self.remove_participant(session_id)

    async def send_raw(self, session_id: str, frame: str | bytes) -> None:
        session = self._sessions[session_id]
        if session.ws is not None:
            await session.ws.send(frame)

    # --- connection handling -------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        self._connections.add(ws)
        self._changed()
        session: _Session | None = None
        try:
            if self.send_welcome:
                await ws.send(
                    json.dumps(
                        {
                            "type": "welcome",
                            "welcome": {"features": SERVER_FEATURES, "version": "emulator"},
                        }
                    )
                )
            async for frame in ws:
                try:
                    msg = json.loads(frame)
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                except ValueError:
                    await ws.send(json.dumps(_error(None, "invalid_format", "bad JSON")))
                    continue
                if self.silent:
                    self._log.append((session.session_id if session else None, msg))
                elif msg.get("type") == "hello":
                    session = await self._hello(ws, session, msg)
                    self._log.append((session.session_id if session else None, msg))
                elif session is None:
                    self._log.append((None, msg))
                    await ws.send(json.dumps(_error(msg.get("id"), "hello_expected", "say hello")))
                else:
                    self._log.append((session.session_id, msg))
                    await self._dispatch(session, msg)
                self._changed()
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(ws)
            if session is not None and session.ws is ws:
                session.ws = None
                session.detached_at = asyncio.get_running_loop().time()
            self._changed()

    async def _send(self, session: _Session, message: Json) -> None:
        text = json.dumps(message)
        if session.ws is None:
            if not session.backend_only:
                session.backlog.append(text)  # delivered on resume, like the real server
            return
        with contextlib.suppress(ConnectionClosed):
            await session.ws.send(text)

    async def _reply(self, ws: ServerConnection, message: Json) -> None:
        if self.reply_delay > 0:
            await asyncio.sleep(self.reply_delay)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(message))

    async def _hello(self, ws: ServerConnection, current: _Session | None, msg: Json) -> _Session | None:
        msg_id = msg.get("id")
        body = msg.get("hello")
        if current is not None:
            await self._reply(ws, _error(msg_id, "already_authenticated", "hello again"))
            return current
        if not isinstance(body, dict):
            await self._reply(ws, _error(msg_id, "invalid_hello", "no hello object"))
            return None
        version = body.get("version")
        if version not in ("1.0", "2.0"):
            await self._reply(ws, _error(msg_id, "invalid_hello_version", "unsupported version"))
            return None
        if self.hello_error is not None:
            await self._reply(ws, _error(msg_id, self.hello_error, "refused by a test knob"))
            return None
        if "resumeid" in body:
            return await self._resume(ws, msg_id, body["resumeid"], version)
        auth = body.get("auth")
        params = auth.get("params") if isinstance(auth, dict) else None
        if not isinstance(auth, dict) or not isinstance(params, dict):
            await self._reply(ws, _error(msg_id, "invalid_hello", "no auth params"))
            return None
        if auth.get("type") == "internal":
            random, token = params.get("random"), params.get("token")
            backend = str(params.get("backend", "")).rstrip("/")
            expected = hmac.new(
                self.internal_secret.encode(), str(random).encode(), hashlib.sha256
            ).hexdigest()
            if not isinstance(random, str) or len(random) < 32 or not isinstance(token, str):
                await self._refuse(ws, msg_id, "invalid_token", "random or token missing")
                return None
            if not hmac.compare_digest(expected, token):
                await self._refuse(ws, msg_id, "invalid_token", "the token is not valid")
                return None
            if backend != self.backend_url:
                await self._refuse(ws, msg_id, "invalid_backend", "backend not allowed")
                return None
            session = _Session(f"internal-{next(self._counter)}-{secrets.token_hex(8)}", "")
            session.internal = True
        elif auth.get("type", "client") == "client":
            if not self.accept_clients:
                await self._refuse(ws, msg_id, "auth-failed", "client refused")
                return None
            user_id = params.get("userid")
            session = _Session(
                f"client-{next(self._counter)}-{secrets.token_hex(8)}",
                user_id if isinstance(user_id, str) else f"user{next(self._counter)}",
            )
        else:
            await self._refuse(ws, msg_id, "invalid_client_type", "unknown client type")
            return None
        session.ws = ws
        self._sessions[session.session_id] = session
        await self._reply(ws, self._hello_reply(msg_id, session, version))
        return session

    async def _refuse(self, ws: ServerConnection, msg_id: object, code: str, text: str) -> None:
        await self._reply(ws, _error(msg_id, code, text))
        await ws.close()

    def _hello_reply(self, msg_id: object, session: _Session, version: str) -> Json:
        reply: Json = {
            "type": "hello",
            "hello": {
                "sessionid": session.session_id,
                "resumeid": session.resume_id,
                "userid": session.user_id,
                "version": version,
                "server": {"version": "emulator", "features": SERVER_FEATURES},
            },
        }
        if isinstance(msg_id, str):
            reply["id"] = msg_id
        return reply

    async def _resume(
        self, ws: ServerConnection, msg_id: object, resume_id: object, version: str
    ) -> _Session | None:
        session = next(
            (s for s in self._sessions.values() if s.resume_id == resume_id and not s.backend_only),
            None,
        )
        now = asyncio.get_running_loop().time()
        expired = (
            session is not None
            and session.detached_at is not None
            and now - session.detached_at > self.resume_window
        )
        if session is None or self.refuse_resume or expired:
            if session is not None:
                await self._remove_session(session)
            await self._reply(ws, _error(msg_id, "no_such_session", "the session is gone"))
            return None
        if session.ws is not None:
            session.ws.transport.abort()  # the old socket is replaced
        session.ws = ws
        session.detached_at = None
        await self._reply(ws, self._hello_reply(msg_id, session, version))
        while session.backlog and session.ws is ws:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(session.backlog.popleft())
        return session

    async def _dispatch(self, session: _Session, msg: Json) -> None:
        msg_id = msg.get("id")
        kind = msg.get("type")
        body = msg.get(kind) if isinstance(kind, str) else None
        if kind == "bye":
            await self._reply_to(session, {"type": "bye", "id": msg_id, "bye": {}})
            ws = session.ws
            await self._remove_session(session)
            if ws is not None:
                await ws.close()
        elif kind == "room" and isinstance(body, dict):
            await self._join(session, msg_id, body)
        elif kind == "internal" and isinstance(body, dict):
            await self._internal(session, msg_id, body)
        elif kind == "message" and isinstance(body, dict):
            await self._message(session, msg_id, body)
        else:
            await self._reply_to(session, _error(msg_id, "invalid_request", f"bad {kind!r}"))

    async def _reply_to(self, session: _Session, message: Json) -> None:
        if session.ws is not None:
            await self._reply(session.ws, {k: v for k, v in message.items() if v is not None})

    async def _join(self, session: _Session, msg_id: object, body: Json) -> None:
        token = body.get("roomid")
        if not isinstance(token, str):
            await self._reply_to(session, _error(msg_id, "invalid_request", "no roomid"))
            return
        if token and token == session.room:
            await self._reply_to(session, _error(msg_id, "already_joined", "already in the room"))
            return
        if token and token not in self._rooms and not self.auto_create_rooms:
            await self._reply_to(session, _error(msg_id, "no_such_room", "unknown room"))
            return
        if session.room is not None:
            await self._leave_room(session)
        if not token:
            await self._reply_to(session, {"type": "room", "id": msg_id, "room": {"roomid": ""}})
            return
        self.create_room(token)
        nc_sid = body.get("sessionid")
        session.nextcloud_session_id = nc_sid if isinstance(nc_sid, str) and nc_sid else None
        session.room = token
        self._rooms[token].add(session.session_id)
        reply = {"type": "room", "id": msg_id, "room": {"roomid": token, "properties": {}}}
        await self._reply_to(session, reply)
        members = [self._sessions[sid] for sid in sorted(self._rooms[token])]
        await self._send(session, _room_event("join", [self._join_entry(m) for m in members]))
        await self._room_event(token, "join", [self._join_entry(session)], exclude=session.session_id)
        users = {"roomid": token, "users": [m.entry() for m in members]}
        await self._send(session, _participants_event(users))
        # Nextcloud tells the room about the new participant (as the real backend does)
        await self._participants_changed(token, [session], exclude=session.session_id)

    async def _internal(self, session: _Session, msg_id: object, body: Json) -> None:
        incall = body.get("incall")
        if not session.internal:
            await self._reply_to(session, _error(msg_id, "invalid_request", "not internal"))
        elif body.get("type") == "incall" and isinstance(incall, dict):
            flags = incall.get("incall")
            session.in_call = flags if isinstance(flags, int) else 0
            if session.room is not None:
                await self._participants_changed(session.room, [session])
        else:
            await self._reply_to(session, _error(msg_id, "invalid_request", "bad internal"))

    async def _message(self, session: _Session, msg_id: object, body: Json) -> None:
        recipient, data = body.get("recipient"), body.get("data")
        if not isinstance(recipient, dict) or not isinstance(data, dict):
            await self._reply_to(session, _error(msg_id, "invalid_request", "bad message"))
            return
        target_id = recipient.get("sessionid")
        target = self._sessions.get(target_id) if isinstance(target_id, str) else None
        kind = data.get("type")
        me = session.session_id
        if self.bridge is not None and target is not None and isinstance(target_id, str):
            if kind == "requestoffer":
                await self._request_offer(session, msg_id, target_id)
                return
            sid = data.get("sid")
            payload = data.get("payload")
            if (me, target_id) in self._subscriptions and isinstance(payload, dict):
                if kind == "answer" and isinstance(payload.get("sdp"), str):
                    await self.bridge.answer(me, target_id, str(sid), payload["sdp"])
                    return
                if kind == "candidate" and isinstance(payload.get("candidate"), dict):
                    await self.bridge.candidate(me, target_id, str(sid), payload["candidate"])
                    return
        if target is None or (kind == "requestoffer" and target.ws is None):
            # unknown session, or media expected from an SFU that is not there
            if kind == "requestoffer":
                await self._reply_to(session, _error(msg_id, "client_not_found", "no such client"))
            return  # like the real server: messages to unknown sessions vanish
        sender: Json = {"type": "session", "sessionid": me}
        if session.user_id:
            sender["userid"] = session.user_id
        await self._send(target, {"type": "message", "message": {"sender": sender, "data": data}})

    async def _request_offer(self, session: _Session, msg_id: object, publisher: str) -> None:
        assert self.bridge is not None
        subscriber = session.session_id
        try:
            sid, sdp = await self.bridge.request_offer(subscriber, publisher)
        except LookupError:
            await self._reply_to(session, _error(msg_id, "client_not_found", "no media"))
            return
        self._subscriptions.add((subscriber, publisher))
        data = {
            "from": publisher,
            "to": subscriber,
            "type": "offer",
            "sid": sid,
            "roomType": "video",
            "payload": {"type": "offer", "sdp": sdp},
        }
        sender = {"type": "session", "sessionid": publisher}
        await self._send(session, {"type": "message", "message": {"sender": sender, "data": data}})

    # --- room bookkeeping ---------------------------------------------------------------
    def _join_entry(self, session: _Session) -> Json:
        return {"sessionid": session.session_id, "userid": session.user_id, "user": {}}

    async def _room_event(
        self, token: str, kind: str, entries: list[Any], exclude: str | None = None
    ) -> None:
        await self._to_room(token, _room_event(kind, entries), exclude=exclude)

    async def _participants_changed(
        self, token: str, changed: list[_Session], exclude: str | None = None
    ) -> None:
        users = [self._sessions[sid].entry() for sid in sorted(self._rooms.get(token, ()))]
        update = {"roomid": token, "changed": [s.entry() for s in changed], "users": users}
        await self._to_room(token, _participants_event(update), exclude=exclude)

    async def _to_room(self, token: str, message: Json, exclude: str | None = None) -> None:
        for sid in sorted(self._rooms.get(token, ())):
            if sid != exclude:
                await self._send(self._sessions[sid], message)
        self._changed()

    async def _leave_room(self, session: _Session) -> None:
        token = session.room
        if token is None:
            return
        self._rooms[token].discard(session.session_id)
        session.room = None
        if self.bridge is not None and any(sub == session.session_id for sub, _ in self._subscriptions):
            await self.bridge.close_subscriber(session.session_id)
        self._subscriptions = {
            (sub, pub) for sub, pub in self._subscriptions if session.session_id not in (sub, pub)
        }
        await self._room_event(token, "leave", [session.session_id])
        users = [self._sessions[sid].entry() for sid in sorted(self._rooms[token])]
        await self._to_room(token, _participants_event({"roomid": token, "users": users}))

    async def _remove_session(self, session: _Session) -> None:
        await self._leave_room(session)
        self._sessions.pop(session.session_id, None)
        self._changed()


def _room_event(kind: str, entries: list[Any]) -> Json:
    return {"type": "event", "event": {"target": "room", "type": kind, kind: entries}}


def _participants_event(update: Json) -> Json:
    return {
        "type": "event",
        "event": {"target": "participants", "type": "update", "update": update},
    }
