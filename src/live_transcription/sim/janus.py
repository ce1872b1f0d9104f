"""A small async client for the Janus WebSocket API (subprotocol `janus-protocol`).

Pure part: `build_request` makes the JSON of a request, `parse_message`
turns a received frame into a typed `JanusMessage`, `plugin_result` pulls the
plugin's answer (or its error) out of a reply. The I/O part is thin:
`JanusClient` owns one WebSocket and one Janus session, a reader task that
resolves transactions and hands asynchronous events to their handle, and a
keepalive task (Janus drops a session after 60 s of silence). Both tasks
live in the client's TaskGroup and end with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import websockets
from websockets.asyncio.client import ClientConnection

log = logging.getLogger(__name__)

SUBPROTOCOL = "janus-protocol"
VIDEOROOM = "janus.plugin.videoroom"
DEFAULT_KEEPALIVE_S = 25.0  # Janus' default session timeout is 60 s
HANDLE_EVENT_QUEUE = 64

JsonObject = dict[str, Any]
# Reply kinds that complete a request; "ack" completes only trickle/keepalive.
Completion = Literal["ack", "result"]
ASYNC_EVENT_KINDS = frozenset(
    {"event", "webrtcup", "hangup", "media", "detached", "slowlink", "trickle", "timeout"}
)


class JanusError(Exception):
    """Janus (core or plugin) refused a request."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"janus error {code}: {reason}")
        self.code = code
        self.reason = reason


class JanusClosed(ConnectionError):
    """The WebSocket to Janus is gone."""


# ---------------------------------------------------------------- pure part


def build_request(
    kind: str,
    transaction: str,
    *,
    session_id: int | None = None,
    handle_id: int | None = None,
    **fields: Any,
) -> JsonObject:
    """One Janus API request; `fields` are added as they are (body, jsep, plugin...)."""
    msg: JsonObject = {"janus": kind, "transaction": transaction}
    if session_id is not None:
        msg["session_id"] = session_id
    if handle_id is not None:
        msg["handle_id"] = handle_id
    msg.update({k: v for k, v in fields.items() if v is not None})
    return msg


@dataclass(frozen=True, slots=True)
class JanusMessage:
    """A message from Janus, reduced to what the client routes on."""

    kind: str
    transaction: str | None
    session_id: int | None
    sender: int | None
    raw: JsonObject

    @property
    def plugin_data(self) -> JsonObject | None:
        pd = self.raw.get("plugindata")
        if isinstance(pd, dict):
            data = pd.get("data")
            if isinstance(data, dict):
                return data
        return None

    @property
    def jsep(self) -> JsonObject | None:
        jsep = self.raw.get("jsep")
        return jsep if isinstance(jsep, dict) else None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_message(frame: str | bytes) -> JanusMessage | None:
    """A typed message, or None when the frame is not a Janus message."""
    try:
        obj = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("janus"), str):
        return None
    tx = obj.get("transaction")
    return JanusMessage(
        kind=obj["janus"],
        transaction=tx if isinstance(tx, str) else None,
        session_id=_int_or_none(obj.get("session_id")),
        sender=_int_or_none(obj.get("sender")),
        raw=obj,
    )


def core_error(msg: JanusMessage) -> JanusError | None:
    """The error of a `{"janus": "error"}` reply, else None."""
    if msg.kind != "error":
        return None
    err = msg.raw.get("error")
    if isinstance(err, dict):
        return JanusError(int(err.get("code", 0)), str(err.get("reason", "")))
    return JanusError(0, "malformed error reply")


def plugin_result(msg: JanusMessage) -> JsonObject:
    """The plugin's answer in a `success`/`event` reply; JanusError if it reports one."""
    err = core_error(msg)
    if err is not None:
        raise err
    data = msg.plugin_data
    if data is None:
        if msg.kind == "success":
            return {}
        raise JanusError(0, f"reply without plugin data: {msg.kind}")
    if "error_code" in data or "error" in data:
        raise JanusError(int(data.get("error_code", 0)), str(data.get("error", "")))
    return data


def success_id(msg: JanusMessage) -> int:
    """The `data.id` of a `create`/`attach` success."""
    err = core_error(msg)
    if err is not None:
        raise err
    data = msg.raw.get("data")
    ident = _int_or_none(data.get("id")) if isinstance(data, dict) else None
    if msg.kind != "success" or ident is None:
        raise JanusError(0, f"unexpected reply {msg.kind}")
    return ident


def completes(msg: JanusMessage, wanted: Completion) -> bool:
    """Whether `msg` is the final reply to a request waiting for `wanted`."""
    if msg.kind in ("error", "success"):
        return True
    if msg.kind == "ack":
        return wanted == "ack"
    return msg.kind == "event" and wanted == "result"


# ------------------------------------------------------------------ I/O part


@dataclass(frozen=True, slots=True)
class PluginReply:
    data: JsonObject
    jsep: JsonObject | None


@dataclass(slots=True)
class JanusHandle:
    """One plugin handle. Events not answering a request land in `events`."""

    client: JanusClient
    handle_id: int
    plugin: str
    events: asyncio.Queue[JanusMessage] = field(
        default_factory=lambda: asyncio.Queue(maxsize=HANDLE_EVENT_QUEUE)
    )
    webrtcup: asyncio.Event = field(default_factory=asyncio.Event)
    hangup: asyncio.Event = field(default_factory=asyncio.Event)
    detached: asyncio.Event = field(default_factory=asyncio.Event)
    events_dropped: int = 0

    def deliver(self, msg: JanusMessage) -> None:
        if msg.kind == "webrtcup":
            self.webrtcup.set()
        elif msg.kind == "hangup":
            self.hangup.set()
        elif msg.kind == "detached":
            self.detached.set()
        if self.events.full():  # drop the oldest: recent state matters most
            self.events.get_nowait()
            self.events_dropped += 1
        self.events.put_nowait(msg)

    async def message(self, body: Mapping[str, Any], jsep: Mapping[str, Any] | None = None) -> PluginReply:
        """Send a plugin request; wait for its synchronous or asynchronous answer."""
        reply = await self.client.request(
            "message",
            handle_id=self.handle_id,
            completion="result",
            body=dict(body),
            jsep=dict(jsep) if jsep is not None else None,
        )
        return PluginReply(plugin_result(reply), reply.jsep)

    async def trickle(self, candidate: Mapping[str, Any]) -> None:
        """Send one candidate (`candidate`, `sdpMid`, `sdpMLineIndex`) or `{"completed": true}`."""
        reply = await self.client.request(
            "trickle", handle_id=self.handle_id, completion="ack", candidate=dict(candidate)
        )
        err = core_error(reply)
        if err is not None:
            raise err

    async def detach(self) -> None:
        try:
            reply = await self.client.request("detach", handle_id=self.handle_id, completion="result")
            err = core_error(reply)
            if err is not None:
                raise err
        finally:
            self.client.forget_handle(self.handle_id)
            self.detached.set()


class JanusClient:
    """`async with JanusClient(url) as janus:` -> one Janus session on one WebSocket."""

    def __init__(
        self,
        url: str,
        *,
        keepalive_interval_s: float = DEFAULT_KEEPALIVE_S,
        request_deadline_s: float = 30.0,
    ) -> None:
        self._url = url
        self._keepalive_interval_s = keepalive_interval_s
        self._request_deadline_s = request_deadline_s
        self._ws: ClientConnection | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._transactions = (f"t{n}" for n in itertools.count(1))
        self._pending: dict[str, tuple[asyncio.Future[JanusMessage], Completion]] = {}
        self._handles: dict[int, JanusHandle] = {}
        self._keepalive_task: asyncio.Task[None] | None = None
        self.session_id = 0
        self.closed = asyncio.Event()
        self.keepalives_acked = 0
        self.frames_skipped = 0
        self.unrouted_events = 0

    @property
    def handles(self) -> Mapping[int, JanusHandle]:
        return self._handles

    async def __aenter__(self) -> JanusClient:
        self._ws = await websockets.connect(
            self._url, subprotocols=[websockets.Subprotocol(SUBPROTOCOL)], max_size=2**22
        )
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        try:
            self._tasks.create_task(self._read_loop(self._ws), name="janus-reader")
            self.session_id = success_id(await self.request("create", session=False))
            self._keepalive_task = self._tasks.create_task(self._keepalive_loop(), name="janus-keepalive")
        except BaseException as exc:
            await self._shutdown(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown(exc_type, exc, tb)

    async def _shutdown(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ws, tasks = self._ws, self._tasks
        self._ws = self._tasks = None
        try:
            if ws is not None and self.session_id and not self.closed.is_set():
                with contextlib.suppress(JanusError, JanusClosed, TimeoutError):
                    async with asyncio.timeout(5):
                        await self.request("destroy", completion="result")
        finally:
            if ws is not None:
                await ws.close()  # ends the reader
            if self._keepalive_task is not None:
                self._keepalive_task.cancel()
            if tasks is not None:
                # Our tasks end on their own now; the caller's exception is not theirs.
                await tasks.__aexit__(None, None, None)

    async def attach(self, plugin: str = VIDEOROOM) -> JanusHandle:
        handle_id = success_id(await self.request("attach", completion="result", plugin=plugin))
        handle = JanusHandle(self, handle_id, plugin)
        self._handles[handle_id] = handle
        return handle

    def forget_handle(self, handle_id: int) -> None:
        self._handles.pop(handle_id, None)

    async def request(
        self,
        kind: str,
        *,
        handle_id: int | None = None,
        completion: Completion = "result",
        session: bool = True,
        **fields: Any,
    ) -> JanusMessage:
        """Send one request; the reply that completes it (errors are returned, not raised)."""
        ws = self._ws
        if ws is None or self.closed.is_set():
            raise JanusClosed("not connected to Janus")
        tx = next(self._transactions)
        msg = build_request(
            kind,
            tx,
            session_id=self.session_id if session else None,
            handle_id=handle_id,
            **fields,
        )
        future: asyncio.Future[JanusMessage] = asyncio.get_running_loop().create_future()
        self._pending[tx] = (future, completion)
        try:
            await ws.send(json.dumps(msg))
            async with asyncio.timeout(self._request_deadline_s):
                return await future
        except websockets.ConnectionClosed as exc:
            raise JanusClosed("Janus closed the WebSocket") from exc
        finally:
            self._pending.pop(tx, None)

    def _route(self, msg: JanusMessage) -> None:
        if msg.transaction is not None and msg.transaction in self._pending:
            future, wanted = self._pending[msg.transaction]
            if completes(msg, wanted):
                if not future.done():
                    future.set_result(msg)
                return
            if msg.kind == "ack":
                return  # an async request acknowledged: its event follows
        if msg.kind not in ASYNC_EVENT_KINDS:
            return
        handle = self._handles.get(msg.sender) if msg.sender is not None else None
        if handle is None:
            self.unrouted_events += 1
            return
        handle.deliver(msg)
        if msg.kind == "detached":
            self.forget_handle(handle.handle_id)

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                msg = parse_message(frame)
                if msg is None:
                    if self.frames_skipped == 0:
                        log.warning("skipping a frame that is not a Janus message")
                    self.frames_skipped += 1
                    continue
                self._route(msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            for future, _ in self._pending.values():
                if not future.done():
                    future.set_exception(JanusClosed("Janus closed the WebSocket"))
            if self._keepalive_task is not None:
                self._keepalive_task.cancel()

    async def _keepalive_loop(self) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(self._keepalive_interval_s)
            try:
                reply = await self.request("keepalive", completion="ack")
            except (JanusClosed, TimeoutError):
                return
            if reply.kind == "ack":
                self.keepalives_acked += 1
            else:
                log.warning("keepalive answered with %s", reply.kind)
