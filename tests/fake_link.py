"""In-memory stand-ins for the HPB link and for speakers, to drive rooms in tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from live_transcription.rooms import ports
from live_transcription.rooms.room import SpeakerContext


@dataclass
class Transcript:
    targets: list[str]
    speaker: str
    text: str
    final: bool
    language: str


class FakeLink:
    """Records what the room sends; tests push events with ``emit``."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._events: asyncio.Queue[ports.CallEvent | None] = asyncio.Queue(maxsize=100)
        self.offers_requested: list[str] = []
        self.answers: list[tuple[str, str, str]] = []
        self.candidates: list[tuple[str, str, ports.LocalCandidate]] = []
        self.transcripts: list[Transcript] = []
        self.closed = asyncio.Event()
        self.sent = asyncio.Event()

    async def emit(self, event: ports.CallEvent) -> None:
        await self._events.put(event)

    async def end(self) -> None:
        await self._events.put(None)

    async def events(self) -> AsyncIterator[ports.CallEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    def request_offer(self, speaker: str) -> None:
        self.offers_requested.append(speaker)
        self.sent.set()

    def send_answer(self, speaker: str, sid: str, sdp: str) -> None:
        self.answers.append((speaker, sid, sdp))

    def send_candidate(self, speaker: str, sid: str, candidate: ports.LocalCandidate) -> None:
        self.candidates.append((speaker, sid, candidate))

    def send_transcript(
        self, targets: Collection[str], speaker: str, text: str, final: bool, language: str
    ) -> None:
        self.transcripts.append(Transcript(list(targets), speaker, text, final, language))
        self.sent.set()

    @property
    def session_id(self) -> str | None:
        return "own-session"


@dataclass
class LinkFactory:
    """``CallLinkFactory`` that hands out FakeLinks (or fails / hangs on demand)."""

    fail: bool = False
    error: Exception | None = None
    """What a failing join wraps (the cause a real link would chain)."""
    hang: bool = False
    links: dict[str, FakeLink] = field(default_factory=dict)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    @asynccontextmanager
    async def __call__(self, token: str) -> AsyncIterator[FakeLink]:
        if self.fail:
            raise ports.HpbUnavailable("refused") from self.error
        if self.hang:
            await asyncio.Event().wait()
        link = FakeLink(token)
        self.links[token] = link
        self.opened.set()
        try:
            yield link
        finally:
            link.closed.set()


class FakeSpeaker:
    """A speaker that runs until closed; records language changes."""

    def __init__(self, context: SpeakerContext) -> None:
        self.context = context
        self.languages = [context.language]
        self.candidates: list[ports.CandidateReceived] = []
        self._stop = asyncio.Event()
        self.running = asyncio.Event()
        self.finished = asyncio.Event()

    async def run(self) -> None:
        self.running.set()
        try:
            await self._stop.wait()
        finally:
            self.finished.set()

    def add_candidate(self, candidate: ports.CandidateReceived) -> None:
        self.candidates.append(candidate)

    def set_language(self, language: str) -> None:
        self.languages.append(language)

    def close(self) -> None:
        self._stop.set()

    def say(self, text: str, final: bool) -> None:
        self.context.publish(self.context.session_id, text, final)


class SpeakerFactory:
    def __init__(self) -> None:
        self.speakers: list[FakeSpeaker] = []
        self.started = asyncio.Event()

    def __call__(self, context: SpeakerContext) -> FakeSpeaker:
        speaker = FakeSpeaker(context)
        self.speakers.append(speaker)
        self.started.set()
        return speaker

    def by_session(self, session_id: str) -> list[FakeSpeaker]:
        return [s for s in self.speakers if s.context.session_id == session_id]
