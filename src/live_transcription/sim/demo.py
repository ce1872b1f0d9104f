"""``live-transcription demo``: the whole service on one machine, no Nextcloud.

It starts the HPB emulator and (when installed) a private Janus, publishes
speakers reading recorded speech, runs the real service (HTTP API, HPB link,
WebRTC, the configured STT engine: embedded unless a remote one is set) and
asks it to caption the call exactly as Talk does. A viewer connected to the
emulator prints the captions as a Talk participant would see them: each
speaker's line grows with partials and is frozen by its final.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TextIO

import httpx

from live_transcription.api.server import run_server
from live_transcription.config import load_settings
from live_transcription.hpb.protocol import Relayed
from live_transcription.sim.client import SimClient
from live_transcription.sim.direct_bridge import DirectBridge
from live_transcription.sim.emulator import HpbEmulator, MediaBridge
from live_transcription.sim.janus_process import janus_available
from live_transcription.sim.taskprocessing import FakeTaskProcessing

ROOM = "demoroom"
BACKEND = "http://127.0.0.1:9/nextcloud"


@dataclass(frozen=True)
class DemoSpeaker:
    name: str
    wav: Path
    start_delay_s: float


def bundled_speech() -> list[Path]:
    folder = resources.files("live_transcription.sim") / "assets"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".wav"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Playable(Protocol):
    def play(self) -> None: ...


@dataclass
class Caption:
    speaker: str
    text: str
    final: bool
    at: float


@dataclass
class DemoResult:
    captions: list[Caption] = field(default_factory=list)
    translations: list[Caption] = field(default_factory=list)
    """Finals the translation reader received (``--translate-to``)."""
    sfu: str = ""

    def finals(self, speaker: str | None = None) -> list[str]:
        return [c.text for c in self.captions if c.final and (speaker is None or c.speaker == speaker)]


class CaptionPrinter:
    """Prints captions like Talk shows them: a partial rewrites its speaker's
    current line (on a terminal), a final freezes it."""

    def __init__(self, out: TextIO, names: dict[str, str]) -> None:
        self.out = out
        self.names = names
        self.tty = out.isatty()
        self._open = False

    def show_translation(self, caption: Caption, language: str) -> None:
        name = self.names.get(caption.speaker, caption.speaker)
        self.out.write(("\r\x1b[K" if self._open else "") + f"  ->{language} {name}: {caption.text}\n")
        self._open = False
        self.out.flush()

    def show(self, caption: Caption) -> None:
        name = self.names.get(caption.speaker, caption.speaker)
        if caption.final:
            line = f"{name}: {caption.text}"
            self.out.write(("\r\x1b[K" if self._open else "") + line + "\n")
            self._open = False
        elif self.tty:
            self.out.write(f"\r\x1b[K{name} … {caption.text}")
            self._open = True
        else:
            self.out.write(f"  {name} … {caption.text}\n")
        self.out.flush()


@asynccontextmanager
async def _media(use_janus: bool | None, out: TextIO) -> AsyncIterator[tuple[Any, str]]:
    reason = janus_available()
    if use_janus is None:
        use_janus = reason is None
    if use_janus:
        if reason is not None:
            raise RuntimeError(f"Janus cannot run here: {reason}")
        from live_transcription.sim.bridge import JanusBridge  # noqa: PLC0415
        from live_transcription.sim.janus_process import JanusProcess  # noqa: PLC0415

        async with JanusProcess() as janus, JanusBridge(janus.ws_url) as janus_bridge:
            yield janus_bridge, "Janus (private instance)"
        return
    out.write(f"(Janus not available: {reason}; speakers connect directly)\n")
    direct = DirectBridge()
    try:
        yield direct, "direct WebRTC (no SFU)"
    finally:
        await direct.aclose()


async def run_demo(
    *,
    speakers: list[DemoSpeaker] | None = None,
    use_janus: bool | None = None,
    language: str = "en",
    tail_seconds: float = 12.0,
    deadline_seconds: float = 240.0,
    out: TextIO = sys.stdout,
    log_level: str = "ERROR",
    translate_to: str | None = None,
) -> DemoResult:
    """Run the demo; returns every caption the viewer received (and, with
    ``translate_to``, every translated final a second viewer received)."""
    if speakers is None:
        wavs = bundled_speech()
        if not wavs:
            raise RuntimeError("no bundled speech found in live_transcription/sim/assets")
        names = ("Alice", "Bob", "Carol", "Dave")
        speakers = [
            DemoSpeaker(names[i % len(names)], wav, start_delay_s=1.0 + 1.5 * i) for i, wav in enumerate(wavs)
        ]
    internal_secret = secrets.token_hex(16)
    app_secret = secrets.token_hex(16)
    result = DemoResult()
    async with AsyncExitStack() as stack:
        bridge, result.sfu = await stack.enter_async_context(_media(use_janus, out))
        hpb = await stack.enter_async_context(
            HpbEmulator(internal_secret, BACKEND, bridge=_as_bridge(bridge))
        )
        session_names: dict[str, str] = {}
        tracks: list[Any] = []
        for index, speaker in enumerate(speakers):
            session_id = f"speaker-{index + 1}"
            published = await _publish(bridge, session_id, speaker)
            tracks.append(published)
            session_names[session_id] = speaker.name
            await hpb.add_participant(
                ROOM,
                session_id=session_id,
                nextcloud_session_id=f"talk-{session_id}",
                in_call=7,
                user_id=speaker.name.lower(),
            )
        viewer = await stack.enter_async_context(SimClient(hpb.url, ROOM, "talk-viewer", user_id="viewer"))
        await hpb.set_in_call(viewer.session_id, 1)
        reader: SimClient | None = None
        nextcloud_url = ""
        if translate_to is None:
            out.write(
                "live translation: off (no translation provider configured; "
                "--translate-to LANG shows it, see docs/operations.md)\n"
            )
        else:
            nextcloud_url, app_secret = await _translation_provider(stack, app_secret, out)
            reader = await stack.enter_async_context(
                SimClient(hpb.url, ROOM, "talk-reader", user_id="reader")
            )
            await hpb.set_in_call(reader.session_id, 1)
        port = free_port()
        settings = load_settings(
            NEXTCLOUD_URL=nextcloud_url,
            APP_SECRET=app_secret,
            APP_HOST="127.0.0.1",
            APP_PORT=port,
            LT_HPB_BACKEND_URL=BACKEND,  # no NEXTCLOUD_URL: no TURN lookup, host candidates
            LT_HPB_URL=hpb.url,
            LT_INTERNAL_SECRET=internal_secret,
            LT_LOG_LEVEL=log_level,
        )
        out.write(
            f"live_transcription demo: {len(speakers)} speakers, engine {settings.engine}, SFU {result.sfu}\n"
        )
        started, stop = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(run_server(settings, started=started, stop=stop))
        try:
            async with asyncio.timeout(deadline_seconds):
                await _wait_started(started, server)
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", headers=_appapi(app_secret), timeout=60
                ) as api:
                    response = await api.post(
                        "/api/v1/call/transcribe",
                        json={
                            "roomToken": ROOM,
                            "ncSessionId": "talk-viewer",
                            "enable": True,
                            "langId": language,
                        },
                    )
                    if response.status_code != 200:
                        raise RuntimeError(f"transcribe refused: {response.status_code} {response.text}")
                    if reader is not None:
                        await _enable_translation(api, language, translate_to or "", out)
                    await _until_speakers(api, len(speakers))
                    out.write("captions (as a Talk participant sees them):\n")
                    for track in tracks:
                        track.play()
                    printer = CaptionPrinter(out, session_names)
                    await _follow(viewer, printer, result, tracks, tail_seconds, reader=reader)
                    await api.post("/api/v1/call/leave", json={"roomToken": ROOM})
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await server
    out.write(f"done: {len(result.finals())} final captions.\n")
    if translate_to is not None:
        out.write(f"translated finals read in {translate_to}: {len(result.translations)}\n")
    return result


async def _translation_provider(stack: AsyncExitStack, app_secret: str, out: TextIO) -> tuple[str, str]:
    """(NEXTCLOUD_URL, APP_SECRET) of the provider to translate through: a
    real Nextcloud when both are in the environment (this app registered
    there), else the stand-in server, said out loud."""
    url, secret = os.environ.get("NEXTCLOUD_URL", ""), os.environ.get("APP_SECRET", "")
    if url and secret:
        out.write(f"live translation: through Nextcloud Task Processing at {url}\n")
        return url, secret
    stand_in = await stack.enter_async_context(FakeTaskProcessing(app_secret=app_secret))
    out.write(
        "live translation: STAND-IN provider (no Nextcloud configured): it marks each line with the "
        "target language instead of translating it. Set NEXTCLOUD_URL and APP_SECRET for a real one.\n"
    )
    return stand_in.url, app_secret


async def _enable_translation(api: httpx.AsyncClient, language: str, target: str, out: TextIO) -> None:
    """A second viewer asks for captions translated into ``target``, as Talk does."""
    response = await api.post(
        "/api/v1/call/transcribe",
        json={
            "roomToken": ROOM,
            "ncSessionId": "talk-reader",
            "enable": True,
            "langId": language,
            "translationTargetLangId": target,
        },
    )
    if response.status_code != 200:
        raise RuntimeError(f"translation refused: {response.status_code} {response.text}")
    out.write(f"a second viewer reads the captions in {target} (finals only, marked ->{target}).\n")


def _as_bridge(bridge: Any) -> MediaBridge:
    return bridge  # type: ignore[no-any-return]


async def _publish(bridge: Any, session_id: str, speaker: DemoSpeaker) -> _Playable:
    if isinstance(bridge, DirectBridge):
        return bridge.add_publisher(
            session_id, speaker.wav, start_delay_s=speaker.start_delay_s, autoplay=False
        )
    publisher = await bridge.add_publisher(
        session_id, speaker.wav, start_delay_s=speaker.start_delay_s, autoplay=False
    )
    return publisher.track  # type: ignore[no-any-return]


def _appapi(secret: str) -> dict[str, str]:
    return {
        "EX-APP-ID": "live_transcription",
        "EX-APP-VERSION": "0.1.0",
        "AA-VERSION": "3.0.0",
        "AUTHORIZATION-APP-API": base64.b64encode(f"demo:{secret}".encode()).decode(),
    }


async def _wait_started(started: asyncio.Event, server: asyncio.Task[None]) -> None:
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait((waiter, server), return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if server.done():
        server.result()  # raises what stopped it
        raise RuntimeError("the service stopped before it started")


async def _until_speakers(api: httpx.AsyncClient, count: int) -> None:
    """Wait until the service receives every speaker's audio (speech sent
    before a speaker's media connection is up would be lost)."""
    while (await api.get("/healthz")).json().get("speakers_connected", 0) < count:  # noqa: ASYNC110
        await asyncio.sleep(0.2)


async def _follow(
    viewer: SimClient,
    printer: CaptionPrinter,
    result: DemoResult,
    tracks: list[Any],
    tail_seconds: float,
    *,
    reader: SimClient | None = None,
) -> None:
    """Print captions until every speaker finished and ``tail_seconds`` passed
    without a new caption."""
    seen = 0
    read = 0
    last_caption = time.monotonic()
    while True:
        if reader is not None:
            translated = [m for m in reader.transcripts() if m.get("final")]
            for message in translated[read:]:
                caption = Caption(
                    speaker=str(message.get("speakerSessionId", "?")),
                    text=str(message.get("message", "")),
                    final=True,
                    at=time.monotonic(),
                )
                result.translations.append(caption)
                printer.show_translation(caption, str(message.get("langId", "?")))
                last_caption = caption.at
            read = len(translated)
        events = list(viewer.events)
        for event in events[seen:]:
            if isinstance(event, Relayed) and event.data.get("type") == "transcript":
                caption = Caption(
                    speaker=str(event.data.get("speakerSessionId", "?")),
                    text=str(event.data.get("message", "")),
                    final=bool(event.data.get("final", True)),
                    at=time.monotonic(),
                )
                result.captions.append(caption)
                printer.show(caption)
                last_caption = caption.at
        seen = len(events)
        finished = all(_finished(track) for track in tracks)
        if finished and time.monotonic() - last_caption > tail_seconds:
            return
        count = seen
        with contextlib.suppress(TimeoutError):
            await viewer.wait_for(lambda: len(viewer.events) > count, deadline=0.5)  # noqa: B023


def _finished(track: Any) -> bool:
    direct = getattr(track, "tracks", None)
    if direct is not None:
        return bool(direct) and all(t.finished.is_set() for t in direct)
    return bool(track.finished.is_set())
