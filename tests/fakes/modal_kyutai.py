"""A fake of Kyutai STT on Modal (PROTOCOLS.md section 3) over real WebSockets.

* ``Modal-Key``/``Modal-Secret`` checked before the upgrade: HTTP 401 if wrong.
* Binary frames of float32 LE PCM (length must be a multiple of 4).
* ``{"type":"token","text":WORD}`` once ``delay_frames`` more frames have
  arrived after the word's last frame; the current format sends whole words
  without a leading space, ``legacy=True`` sends pieces with a leading space
  plus ``vad_end`` and ``ping``.
* The "model": ``model="codes"`` (the default) recognises the exact
  synthetic code frames of ``tests.fakes``, for tests that need exact words;
  ``model="energy"`` makes a word of every ``frames_per_word`` voiced frames
  of real audio (``tests.fakes.energy``), for audio that went through Opus.
* Closes after ``idle_close_seconds`` without a binary frame; never flushes
  words still inside the delay when a connection ends.
* Knobs: ``cold_start_seconds`` / ``handshake_gate`` hold the handshake,
  ``drop_after_frames`` aborts the first connection mid-stream,
  ``silent_connections`` (connection numbers, from 1) are read but never
  answered: an engine that stops answering without closing.
  ``max_sessions`` answers HTTP 429 to a handshake while that many sessions
  are open (a capped deployment). While serving: ``drop_open_connections()``
  aborts every open connection (no close frame), ``silence_open_connections()``
  makes every open one stop answering (new ones answer), ``key`` can change.
* Observations for tests: per connection, the code of every frame received
  (0 silence, word id + 1; code model only) and the words sent, so a test
  can tell which audio went where and which words came back on which
  connection (``keep_log=False`` for long runs keeps none).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from http import HTTPStatus
from types import TracebackType
from typing import Literal, Protocol

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.fakes import VOCABULARY, Recogniser, decode_frame
from tests.fakes.energy import EnergyWords, Samples

ModelName = Literal["codes", "energy"]


class WordModel(Protocol):
    """One connection's model: frames in, the words due after each out."""

    @property
    def silence_run(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def mid_word(self) -> bool: ...
    def feed(self, samples: Samples) -> list[str]: ...


class CodeWords:
    """The exact model: word runs of code frames, named from the vocabulary."""

    def __init__(self, vocabulary: Sequence[str], delay_frames: int, codes: list[int] | None) -> None:
        self._vocabulary = vocabulary
        self._delay = delay_frames
        self._codes = codes
        self._recogniser = Recogniser()
        self._pending: list[tuple[int, int]] = []  # (due received count, word id)

    @property
    def silence_run(self) -> int:
        return self._recogniser.silence_run

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def mid_word(self) -> bool:
        return self._recogniser.current > 0

    def feed(self, samples: Samples) -> list[str]:
        code = decode_frame(samples)
        if self._codes is not None:
            self._codes.append(code)
        _, ended = self._recogniser.feed(code)
        if ended is not None:
            self._pending.append((ended[0] + self._delay, ended[1]))
        due = []
        while self._pending and self._pending[0][0] <= self._recogniser.received:
            _, word_id = self._pending.pop(0)
            due.append(self._vocabulary[word_id % len(self._vocabulary)])
        return due


class EnergyModel:
    """``EnergyWords`` behind the same face as ``CodeWords``."""

    def __init__(self, frames_per_word: int, delay_frames: int) -> None:
        self._words = EnergyWords(frames_per_word, delay_frames)

    @property
    def silence_run(self) -> int:
        return self._words.silence_run

    @property
    def pending(self) -> int:
        return self._words.pending

    @property
    def mid_word(self) -> bool:
        return self._words.mid_word

    def feed(self, samples: Samples) -> list[str]:
        return [text for text, _, _ in self._words.feed(samples)]


class FakeModalKyutai:
    def __init__(
        self,
        vocabulary: Sequence[str] = VOCABULARY,
        *,
        key: str | None = "test-key",
        secret: str | None = "test-secret",
        delay_frames: int = 6,
        idle_close_seconds: float = 30.0,
        cold_start_seconds: float = 0.0,
        handshake_gate: asyncio.Event | None = None,
        drop_after_frames: int | None = None,
        legacy: bool = False,
        ping_every_frames: int = 0,
        silent_connections: frozenset[int] = frozenset(),
        max_sessions: int | None = None,
        model: ModelName = "codes",
        frames_per_word: int = 4,
        keep_log: bool = True,
    ) -> None:
        self.vocabulary = list(vocabulary)
        self.key = key
        self.secret = secret
        self.delay_frames = delay_frames
        self.idle_close_seconds = idle_close_seconds
        self.cold_start_seconds = cold_start_seconds
        self.handshake_gate = handshake_gate
        self.drop_after_frames = drop_after_frames
        self.legacy = legacy
        self.ping_every_frames = ping_every_frames
        self.silent_connections = set(silent_connections)
        self.max_sessions = max_sessions
        self.model = model
        self.frames_per_word = frames_per_word
        self.keep_log = keep_log
        self.active = 0
        self.refused_full = 0
        self.frames_by_connection: dict[int, list[int]] = {}
        self.words_by_connection: dict[int, list[str]] = {}
        self._open: dict[int, tuple[ServerConnection, WordModel]] = {}
        # observations
        self.handshakes = 0
        self.rejected = 0
        self.connections = 0
        self.frames_received = 0
        self.words_sent: list[str] = []
        self.words_total = 0
        self.idle_closes = 0
        self.drops = 0
        self.bad_frames = 0
        self.client_closes = 0
        self.client_closed = asyncio.Event()
        self.idle_closed = asyncio.Event()
        self.handshake_started = asyncio.Event()
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/stream"

    async def __aenter__(self) -> FakeModalKyutai:
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

    # --- faults while serving --------------------------------------------------------
    @property
    def open_connections(self) -> list[int]:
        return sorted(self._open)

    def answering_mid_word(self) -> int:
        """Open, answering connections inside a word right now."""
        return sum(
            1
            for number, (_, model) in self._open.items()
            if model.mid_word and number not in self.silent_connections
        )

    def drop_open_connections(self) -> int:
        """Abort every open connection (no close frame, no flush), as a
        network cut or a server crash does; returns how many."""
        dropped = 0
        for ws, _ in self._open.values():
            ws.transport.abort()
            dropped += 1
        self.drops += dropped
        return dropped

    def silence_open_connections(self) -> int:
        """Every open connection keeps reading audio and never answers again
        (a hung engine); connections opened later answer."""
        self.silent_connections |= set(self._open)
        return len(self._open)

    # --- serving -----------------------------------------------------------------------
    def _authorised(self, headers: Headers) -> bool:
        if self.key is not None and headers.get("Modal-Key") != self.key:
            return False
        return not (self.secret is not None and headers.get("Modal-Secret") != self.secret)

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes += 1
        self.handshake_started.set()
        if self.handshake_gate is not None:
            await self.handshake_gate.wait()
        if self.cold_start_seconds:
            await asyncio.sleep(self.cold_start_seconds)  # the knob itself, not a sync
        if not self._authorised(request.headers):
            self.rejected += 1
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
        if self.max_sessions is not None and self.active >= self.max_sessions:
            self.refused_full += 1
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests\n")
        self.active += 1  # counted from the upgrade on, so a racing handshake sees it
        return None

    def _new_model(self, connection_number: int) -> WordModel:
        if self.model == "energy":
            return EnergyModel(self.frames_per_word, self.delay_frames)
        codes = self.frames_by_connection.setdefault(connection_number, []) if self.keep_log else None
        return CodeWords(self.vocabulary, self.delay_frames, codes)

    # hooks for a subclass that counts the load (the benchmark's server)
    def _on_open(self, ws: ServerConnection) -> None:
        pass

    def _on_audio(self, ws: ServerConnection, samples: Samples) -> None:
        pass

    def _on_close(self, ws: ServerConnection) -> None:
        pass

    async def _send_word(self, ws: ServerConnection, text: str, connection_number: int) -> None:
        self.words_total += 1
        if self.keep_log:
            self.words_sent.append(text)
            self.words_by_connection.setdefault(connection_number, []).append(text)
        if not self.legacy:
            await ws.send(json.dumps({"type": "token", "text": text}))
            return
        half = max(1, len(text) // 2) if len(text) >= 4 else len(text)
        await ws.send(json.dumps({"type": "token", "text": " " + text[:half]}))
        if text[half:]:
            await ws.send(json.dumps({"type": "token", "text": text[half:]}))

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            await self._serve(ws)
        finally:
            self.active -= 1

    async def _serve(self, ws: ServerConnection) -> None:
        self.connections += 1
        connection_number = self.connections
        model = self._new_model(connection_number)
        self._open[connection_number] = (ws, model)
        self._on_open(ws)
        vad_armed = False
        received = 0
        try:
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), self.idle_close_seconds)
                except TimeoutError:
                    self.idle_closes += 1
                    self.idle_closed.set()
                    await ws.close(1000, "idle")
                    return
                if isinstance(message, str) or len(message) % 4:
                    self.bad_frames += 1
                    continue
                samples = np.frombuffer(message, dtype="<f4")
                self.frames_received += 1
                received += 1
                self._on_audio(ws, samples)
                due = model.feed(samples)
                if connection_number in self.silent_connections:
                    continue
                for text in due:
                    await self._send_word(ws, text, connection_number)
                    vad_armed = True
                if self.legacy and vad_armed and not model.pending and model.silence_run >= 8:
                    vad_armed = False
                    await ws.send(json.dumps({"type": "vad_end"}))
                if self.ping_every_frames and received % self.ping_every_frames == 0:
                    await ws.send(json.dumps({"type": "ping"}))
                if (
                    self.drop_after_frames is not None
                    and connection_number == 1
                    and received >= self.drop_after_frames
                ):
                    self.drops += 1
                    ws.transport.abort()  # a dropped connection: no close frame, no flush
                    return
        except ConnectionClosed:
            self.client_closes += 1
            self.client_closed.set()
            return
        finally:
            del self._open[connection_number]
            self._on_close(ws)
