"""A fake of moshi-server's ``/api/asr-streaming`` (PROTOCOLS.md section 4).

* ``kyutai-api-key`` header (or ``?auth_id=``) checked before the upgrade: 401.
* ``Ready`` first, or ``Error`` "no free channels" then close when all
  ``channels`` are taken (``channels`` may be changed while running).
* msgpack ``Audio`` in; per frame a ``Step`` (``prs[2]`` = 1.0 while the
  input has been silent for ``delay + pause_frames`` frames after a word),
  ``Word`` (``start_time``) ``delay_frames`` after the word's first frame,
  ``EndWord`` (``stop_time``) ``delay_frames`` after its last.
* ``Marker`` echoed once ``delay_frames`` more frames have been processed.
* Closes after ``idle_close_seconds`` with nothing received; no flush on close.
* ``drop_after_frames`` aborts the first connection mid-stream;
  ``silent_connections`` (connection numbers, from 1) are read but never
  answered after ``Ready`` (no step, word or marker): a hung engine.
* Observations for tests: per connection, the code of every audio frame
  received (0 silence, word id + 1) and the words sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgpack
import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.fakes import FRAME_SECONDS, VOCABULARY, Recogniser, decode_frame


class FakeMoshiServer:
    def __init__(
        self,
        vocabulary: Sequence[str] = VOCABULARY,
        *,
        api_key: str | None = "test-key",
        delay_frames: int = 6,
        channels: int = 8,
        idle_close_seconds: float = 20.0,
        drop_after_frames: int | None = None,
        pause_frames: int = 4,
        silent_connections: frozenset[int] = frozenset(),
    ) -> None:
        self.vocabulary = list(vocabulary)
        self.api_key = api_key
        self.delay_frames = delay_frames
        self.channels = channels
        self.idle_close_seconds = idle_close_seconds
        self.drop_after_frames = drop_after_frames
        self.pause_frames = pause_frames
        self.silent_connections = silent_connections
        # observations
        self.handshakes = 0
        self.rejected = 0
        self.connections = 0
        self.active = 0
        self.refused_full = 0
        self.frames_received = 0
        self.words_sent: list[str] = []
        self.markers_echoed = 0
        self.frames_by_connection: dict[int, list[int]] = {}
        self.words_by_connection: dict[int, list[str]] = {}
        self.idle_closes = 0
        self.drops = 0
        self.client_closes = 0
        self.client_closed = asyncio.Event()
        self.idle_closed = asyncio.Event()
        self.refused = asyncio.Event()
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/api/asr-streaming"

    async def __aenter__(self) -> FakeMoshiServer:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._process_request)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes += 1
        if self.api_key is None:
            return None
        query = parse_qs(urlsplit(request.path).query)
        if request.headers.get("kyutai-api-key") == self.api_key or query.get("auth_id") == [self.api_key]:
            return None
        self.rejected += 1
        return connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")

    @staticmethod
    async def _send(ws: ServerConnection, message: dict[str, Any]) -> None:
        await ws.send(msgpack.packb(message))

    async def _handle(self, ws: ServerConnection) -> None:
        if self.active >= self.channels:
            self.refused_full += 1
            self.refused.set()
            await self._send(ws, {"type": "Error", "message": "no free channels"})
            await ws.close()
            return
        self.active += 1
        self.connections += 1
        try:
            await self._serve(ws, self.connections)
        except ConnectionClosed:
            self.client_closes += 1
            self.client_closed.set()
        finally:
            self.active -= 1

    async def _serve(self, ws: ServerConnection, connection_number: int) -> None:
        await self._send(ws, {"type": "Ready"})
        model = Recogniser()
        codes = self.frames_by_connection.setdefault(connection_number, [])
        sent = self.words_by_connection.setdefault(connection_number, [])
        words: list[tuple[int, int]] = []  # (due, word id)
        ends: list[tuple[int, int]] = []  # (due, end index)
        markers: list[tuple[int, int]] = []  # (due, id)
        seen_word = False
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), self.idle_close_seconds)
            except TimeoutError:
                self.idle_closes += 1
                self.idle_closed.set()
                await ws.close(1000, "idle")
                return
            try:
                message = msgpack.unpackb(raw) if isinstance(raw, bytes) else None
            except Exception:
                message = None
            if not isinstance(message, dict):
                continue
            if message.get("type") == "Marker":
                markers.append((model.received + self.delay_frames, int(message["id"])))
                continue
            if message.get("type") != "Audio":
                continue
            samples = np.asarray(message.get("pcm", []), dtype=np.float32)
            self.frames_received += 1
            code = decode_frame(samples)
            codes.append(code)
            if connection_number in self.silent_connections:
                continue
            started, ended = model.feed(code)
            if started is not None:
                words.append((started[0] + self.delay_frames, started[1]))
                seen_word = True
            if ended is not None:
                ends.append((ended[0] + self.delay_frames, ended[0]))
            while words and words[0][0] <= model.received:
                due, word_id = words.pop(0)
                text = self.vocabulary[word_id % len(self.vocabulary)]
                self.words_sent.append(text)
                sent.append(text)
                start = (due - self.delay_frames) * FRAME_SECONDS
                await self._send(ws, {"type": "Word", "text": text, "start_time": start})
            while ends and ends[0][0] <= model.received:
                _, end_index = ends.pop(0)
                await self._send(ws, {"type": "EndWord", "stop_time": end_index * FRAME_SECONDS})
            paused = seen_word and model.silence_run >= self.delay_frames + self.pause_frames
            await self._send(
                ws,
                {
                    "type": "Step",
                    "step_idx": model.received - 1,
                    "prs": [0.0, 0.0, 1.0 if paused else 0.0, 0.0],
                    "buffered_pcm": 0,
                },
            )
            while markers and markers[0][0] <= model.received:
                _, marker_id = markers.pop(0)
                self.markers_echoed += 1
                await self._send(ws, {"type": "Marker", "id": marker_id})
            if (
                self.drop_after_frames is not None
                and connection_number == 1
                and model.received >= self.drop_after_frames
            ):
                self.drops += 1
                ws.transport.abort()
                return
