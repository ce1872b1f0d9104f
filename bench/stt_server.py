"""The fake Kyutai STT servers of the tests, served over TLS in their own
process for the benchmark: ``python -m bench.stt_server --engine modal``.

The protocol side (authentication before the upgrade, wire formats, idle
close, no flush on close; moshi's ``Ready``, ``Step``, ``Word``/``EndWord``,
``Marker`` echo and ``no free channels``) is the tests' fakes
(``tests.fakes``). What changes is the "model": the tests' fakes recognise
synthetic code frames, which do not survive Opus; here a word comes out every
``frames_per_word`` voiced frames of real (decoded) audio since the last
silent frame (``EnergyWords`` of ``tests.fakes.energy``, the Modal fake's
``model="energy"``), ``delay_frames`` frames later (0: the
zero-delay server that isolates the service's own latency; 6 is Kyutai
stt-1b's 0.48 s).

The server counts what the STT load figures need, measured from outside the
service: audio-seconds received (voiced and silent), streams open now and
their time integral, connections opened, words sent. Driven over
stdin/stdout with JSON lines like the load generator: it prints
``{"ready": true, "url": ..., "pid": ...}``, answers ``{"cmd": "stats",
"reset": bool}`` and stops on ``{"cmd": "quit"}``, end of input or
``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from tests.fakes.energy import EnergyWords, Samples
from tests.fakes.modal_kyutai import FakeModalKyutai
from tests.fakes.moshi_server import FakeMoshiServer
from websockets.asyncio.server import Server, ServerConnection, serve

log = logging.getLogger("bench.stt_server")

SAMPLE_RATE = 24_000
FRAME_SECONDS = 0.08
Json = dict[str, Any]


@dataclass
class Load:
    """What the server saw; one owner (the server's loop)."""

    audio_seconds: float = 0.0
    voiced_seconds: float = 0.0
    silent_seconds: float = 0.0
    frames: int = 0
    words: int = 0
    words_total: int = 0
    """Words sent since the start (never reset)."""
    connections_opened: int = 0
    connections_closed: int = 0
    refused_full: int = 0
    open_now: int = 0
    open_max: int = 0
    stream_seconds: float = 0.0
    """Time integral of the open streams (mean open = stream_seconds / window)."""
    busy_now: int = 0
    """Streams that received audio within the last ``busy_seconds``."""
    _since: float = 0.0

    def _advance(self, now: float) -> None:
        self.stream_seconds += self.open_now * max(0.0, now - self._since)
        self._since = now

    def opened(self, now: float) -> None:
        self._advance(now)
        self.connections_opened += 1
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)

    def closed(self, now: float) -> None:
        self._advance(now)
        self.connections_closed += 1
        self.open_now -= 1

    def audio(self, seconds: float, voiced: bool) -> None:
        self.frames += 1
        self.audio_seconds += seconds
        if voiced:
            self.voiced_seconds += seconds
        else:
            self.silent_seconds += seconds

    def snapshot(self, now: float, *, reset: bool) -> Json:
        self._advance(now)
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        if reset:
            open_now, busy, words_total = self.open_now, self.busy_now, self.words_total
            for name, value in asdict(Load()).items():
                setattr(self, name, value)
            self.open_now = self.open_max = open_now
            self.busy_now = busy
            self.words_total = words_total
            self._since = now
        return out


class _Streams:
    """Last-audio times per connection, for the 'busy now' count."""

    def __init__(self, busy_seconds: float) -> None:
        self.busy_seconds = busy_seconds
        self.last_audio: dict[int, float] = {}

    def busy(self, now: float) -> int:
        return sum(1 for t in self.last_audio.values() if now - t <= self.busy_seconds)


class BenchModalServer(FakeModalKyutai):
    """The Modal fake with the energy model, counting the load (no per-word log)."""

    def __init__(self, load: Load, streams: _Streams, *, frames_per_word: int, **kwargs: Any) -> None:
        super().__init__(model="energy", frames_per_word=frames_per_word, keep_log=False, **kwargs)
        self.load = load
        self.streams = streams

    def _on_open(self, ws: ServerConnection) -> None:
        self.load.opened(time.monotonic())

    def _on_audio(self, ws: ServerConnection, samples: Samples) -> None:
        self.streams.last_audio[id(ws)] = time.monotonic()
        self.load.audio(samples.size / SAMPLE_RATE, EnergyWords.voiced(samples))

    def _on_close(self, ws: ServerConnection) -> None:
        self.streams.last_audio.pop(id(ws), None)
        self.load.closed(time.monotonic())

    async def _send_word(self, ws: ServerConnection, text: str, connection_number: int) -> None:
        self.load.words += 1
        self.load.words_total += 1
        await super()._send_word(ws, text, connection_number)


class BenchMoshiServer(FakeMoshiServer):
    """The moshi-server fake with the energy model, counting the load."""

    def __init__(self, load: Load, streams: _Streams, *, frames_per_word: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.load = load
        self.streams = streams
        self.frames_per_word = frames_per_word

    async def _handle(self, ws: ServerConnection) -> None:
        if self.active >= self.channels:
            self.load.refused_full += 1
        await super()._handle(ws)

    async def _serve(self, ws: ServerConnection, connection_number: int) -> None:
        self.load.opened(time.monotonic())
        key = id(ws)
        try:
            await self._serve_energy(ws, key)
        finally:
            self.streams.last_audio.pop(key, None)
            self.load.closed(time.monotonic())

    async def _serve_energy(self, ws: ServerConnection, key: int) -> None:
        await self._send(ws, {"type": "Ready"})
        model = EnergyWords(self.frames_per_word, self.delay_frames)
        markers: list[tuple[int, int]] = []  # (due frame count, id)
        seen_word = False
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), self.idle_close_seconds)
            except TimeoutError:
                self.idle_closes += 1
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
            self.streams.last_audio[key] = time.monotonic()
            self.load.audio(samples.size / SAMPLE_RATE, EnergyWords.voiced(samples))
            for text, start, end in model.feed(samples):
                seen_word = True
                self.load.words += 1
                self.load.words_total += 1
                await self._send(ws, {"type": "Word", "text": text, "start_time": start * FRAME_SECONDS})
                await self._send(ws, {"type": "EndWord", "stop_time": end * FRAME_SECONDS})
            paused = (
                seen_word
                and model.pending == 0
                and model.silence_run >= self.delay_frames + self.pause_frames
            )
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


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@dataclass
class Running:
    """A serving fake: its server, the fake (protocol state) and the counts."""

    server: Server
    fake: BenchModalServer | BenchMoshiServer
    load: Load
    streams: _Streams
    url: str


async def open_server(
    engine: str,
    context: ssl.SSLContext,
    *,
    port: int = 0,
    key: str = "bench-key",
    secret: str = "bench-secret",
    delay_frames: int = 0,
    frames_per_word: int = 4,
    channels: int = 100_000,
    idle_close_seconds: float = 30.0,
    busy_seconds: float = 0.5,
) -> Running:
    """Serve the ``engine``'s fake over TLS on 127.0.0.1 (close ``server``)."""
    load = Load(_since=time.monotonic())
    streams = _Streams(busy_seconds)
    fake: BenchModalServer | BenchMoshiServer
    if engine == "modal":
        fake = BenchModalServer(
            load,
            streams,
            frames_per_word=frames_per_word,
            key=key,
            secret=secret,
            delay_frames=delay_frames,
            idle_close_seconds=idle_close_seconds,
        )
        path = "/v1/stream"
    else:
        fake = BenchMoshiServer(
            load,
            streams,
            frames_per_word=frames_per_word,
            api_key=key,
            delay_frames=delay_frames,
            channels=channels,
            idle_close_seconds=idle_close_seconds,
        )
        path = "/api/asr-streaming"
    server = await serve(
        fake._handle,
        "127.0.0.1",
        port,
        process_request=fake._process_request,
        ssl=context,
        compression=None,
        max_size=2**22,
    )
    bound = server.sockets[0].getsockname()[1]
    return Running(server, fake, load, streams, f"wss://127.0.0.1:{bound}{path}")


async def _serve(args: argparse.Namespace) -> None:
    running = await open_server(
        args.engine,
        server_tls(args.cert, args.cert_key),
        port=args.port,
        key=args.key,
        secret=args.secret,
        delay_frames=args.delay_frames,
        frames_per_word=args.frames_per_word,
        channels=args.channels,
        idle_close_seconds=args.idle_close_seconds,
        busy_seconds=args.busy_seconds,
    )
    server, fake, load, streams = running.server, running.fake, running.load, running.streams
    _emit({"ready": True, "url": running.url, "pid": os.getpid()})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        async with asyncio.timeout(args.max_seconds):
            while line := await reader.readline():
                try:
                    command = json.loads(line)
                except ValueError:
                    _emit({"error": "bad command"})
                    continue
                if not isinstance(command, dict):
                    _emit({"error": "bad command"})
                    continue
                reply: Json = {"id": command.get("id")}
                if command.get("cmd") == "quit":
                    _emit(reply | {"ok": True})
                    break
                if command.get("cmd") == "stats":
                    now = time.monotonic()
                    reply |= load.snapshot(now, reset=bool(command.get("reset")))
                    reply["busy_now"] = streams.busy(now)
                    reply["handshakes"] = fake.handshakes
                    reply["rejected"] = fake.rejected
                    reply["idle_closes"] = fake.idle_closes
                else:
                    reply["error"] = f"unknown command {command.get('cmd')!r}"
                _emit(reply)
    except TimeoutError:
        log.warning("--max-seconds reached, stopping")
    finally:
        server.close()
        await server.wait_closed()


def _emit(message: Json) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stt_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("modal", "moshi"), default="modal")
    parser.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--cert-key", type=Path, required=True, help="its private key (PEM)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="bench-key", help="Modal-Key / kyutai-api-key expected")
    parser.add_argument("--secret", default="bench-secret", help="Modal-Secret expected")
    parser.add_argument("--delay-frames", type=int, default=0, help="model delay in 80 ms frames (0: none)")
    parser.add_argument("--frames-per-word", type=int, default=4)
    parser.add_argument(
        "--channels", type=int, default=100_000, help="moshi: streams before 'no free channels'"
    )
    parser.add_argument("--idle-close-seconds", type=float, default=30.0)
    parser.add_argument(
        "--busy-seconds", type=float, default=0.5, help="a stream is busy if audio came this recently"
    )
    parser.add_argument("--max-seconds", type=float, default=3 * 3600)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
