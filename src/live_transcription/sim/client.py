"""A browser-like signaling participant for tests and the demo (``client`` auth).

It connects to the HPB (or the emulator), joins a room with a Talk session
id and records every event it receives (bounded), e.g. the transcripts the
service sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from live_transcription.hpb import protocol
from live_transcription.hpb.protocol import HelloOk, Relayed, RoomJoined, ServerEvent

E = TypeVar("E")


class SimClient:
    def __init__(self, url: str, room: str, nextcloud_session_id: str, *, user_id: str = "alice") -> None:
        self.url = url
        self.room = room
        self.nextcloud_session_id = nextcloud_session_id
        self.user_id = user_id
        self.session_id = ""
        self.events: deque[ServerEvent] = deque(maxlen=10_000)
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._ids = itertools.count(1)

    async def __aenter__(self) -> SimClient:
        self._ws = await connect(self.url)
        hello: dict[str, Any] = {
            "type": "hello",
            "id": "1",
            "hello": {
                "version": "2.0",
                "auth": {"type": "client", "params": {"userid": self.user_id}},
            },
        }
        await self._ws.send(protocol.encode(hello))
        reply = await self._until(HelloOk)
        self.session_id = reply.session_id
        await self._ws.send(protocol.encode(protocol.join_room("2", self.room, self.nextcloud_session_id)))
        await self._until(RoomJoined)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()

    async def _until(self, kind: type[E]) -> E:
        """Read until an event of ``kind`` (handshake only); an error raises."""
        assert self._ws is not None
        async with asyncio.timeout(30):
            while True:
                event = protocol.parse(await self._ws.recv())
                if isinstance(event, kind):
                    return event
                if isinstance(event, protocol.Error):
                    raise RuntimeError(f"signaling error {event.code}: {event.message}")
                self._record(event)

    async def _read(self) -> None:
        assert self._ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for frame in self._ws:
                self._record(protocol.parse(frame))

    def _record(self, event: ServerEvent) -> None:
        self.events.append(event)
        self._arrived.set()
        self._arrived = asyncio.Event()

    def transcripts(self) -> list[dict[str, Any]]:
        return [
            dict(e.data) for e in self.events if isinstance(e, Relayed) and e.data.get("type") == "transcript"
        ]

    async def wait_for(self, condition: Callable[[], bool], deadline: float = 30.0) -> None:
        async with asyncio.timeout(deadline):
            while not condition():
                await self._arrived.wait()
