"""A room on the real HPB link against the HPB emulator, with scripted speakers
(no media, no STT): what signaling faults do to who gets which caption.

Participants are backend-only emulator sessions (speakers with media from a
bridge that offers anything, viewers that only receive); what the service
sent is read from the emulator's recording, so every caption is checked
against the sessions the HPB had at the time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from live_transcription.clock import ManualClock
from live_transcription.hpb.connection import HpbLinkFactory
from live_transcription.hpb.participants import ParticipantsState
from live_transcription.rooms import ports
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import Manager
from live_transcription.rooms.room import Room, SpeakerContext
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.stt.base import Language

SECRET = "session-fault-secret"
BACKEND = "https://cloud.example.test"
ROOM = "resetroom"
LANGUAGES = {"en": Language("en", "English"), "fr": Language("fr", "French")}


class OfferAnything:
    """A media bridge with media for every participant."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    async def request_offer(self, subscriber: str, publisher: str) -> tuple[str, str]:
        return f"sid-{publisher}", f"v=0 offer of {publisher}"

    async def answer(self, subscriber: str, publisher: str, sid: str, sdp: str) -> None:
        pass

    async def candidate(
        self, subscriber: str, publisher: str, sid: str, candidate: dict[str, object]
    ) -> None:
        pass

    async def close_subscriber(self, subscriber: str) -> None:
        self.closed.append(subscriber)


class ScriptedSpeaker:
    """Captions only when told (``say``); on close it flushes ``last_words``
    as a final, like a real speaker flushing its open line, once ``hold``
    lets it (a test holds it to make the flush late)."""

    def __init__(self, context: SpeakerContext) -> None:
        self.context = context
        self.session_id = context.session_id
        self.languages = [context.language]
        self.last_words: str | None = None
        self.hold = asyncio.Event()
        self.hold.set()
        self._stop = asyncio.Event()
        self.finished = asyncio.Event()

    async def run(self) -> None:
        try:
            await self._stop.wait()
            await self.hold.wait()
            if self.last_words is not None:
                self.say(self.last_words, True)
        finally:
            self.finished.set()

    def add_candidate(self, candidate: ports.CandidateReceived) -> None:
        pass

    def set_language(self, language: str) -> None:
        self.languages.append(language)

    def close(self) -> None:
        self._stop.set()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def say(self, text: str, final: bool = True) -> None:
        self.context.publish(self.session_id, text, final)


@dataclass
class ScriptedSpeakers:
    started: list[ScriptedSpeaker] = field(default_factory=list)
    flush_on_close: bool = False
    """Every speaker has an open line to flush when closed."""

    def __call__(self, context: SpeakerContext) -> ScriptedSpeaker:
        speaker = ScriptedSpeaker(context)
        if self.flush_on_close:
            speaker.last_words = f"last words of {context.session_id}"
        self.started.append(speaker)
        return speaker

    def live(self) -> dict[str, ScriptedSpeaker]:
        """The latest speaker of every session that is not closed."""
        return {s.session_id: s for s in self.started if not s.closed}

    def running(self) -> list[ScriptedSpeaker]:
        return [s for s in self.started if not s.finished.is_set()]


@dataclass
class Env:
    hpb: HpbEmulator
    manager: Manager
    speakers: ScriptedSpeakers
    clock: ManualClock
    bridge: OfferAnything

    @property
    def room(self) -> Room:
        room = self.manager.room(ROOM)
        assert room is not None
        return room

    def ours(self) -> list[str]:
        return self.hpb.sessions_in_room(ROOM, internal=True)

    def transcripts(self, sender: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        """(our session, recipient, data) of every transcript the service sent."""
        out = []
        for session, message in self.hpb.received_all():
            if session is None or (sender is not None and session != sender):
                continue
            if message.get("type") != "message":
                continue
            data = message["message"]["data"]
            if data.get("type") == "transcript":
                out.append((session, message["message"]["recipient"]["sessionid"], data))
        return out


def link_factory(hpb: HpbEmulator, **overrides: Any) -> HpbLinkFactory:
    options: dict[str, Any] = {
        "ws_url": hpb.url,
        "internal_secret": SECRET,
        "backend_url": BACKEND,
        "rng": random.Random(1),
        "backoff_base": 0.02,
        "backoff_cap": 0.1,
        "partial_interval": 0.0,
        "drain_seconds": 0.5,
        "participants_state": ParticipantsState,
    }
    options.update(overrides)
    return HpbLinkFactory(**options)


@asynccontextmanager
async def room_on_emulator(
    emulator: type[HpbEmulator] = HpbEmulator, **link_overrides: Any
) -> AsyncIterator[Env]:
    bridge = OfferAnything()
    clock = ManualClock()
    speakers = ScriptedSpeakers()
    async with emulator(SECRET, BACKEND, bridge=bridge) as hpb:
        hpb.create_room(ROOM)
        manager = Manager(
            link_factory=link_factory(hpb, **link_overrides),
            speaker_factory=speakers,
            languages=LANGUAGES,
            admission=Admission(max_speakers=50, max_speakers_per_room=50),
            linger_seconds=3600,
            clock=clock,
            join_timeout=30,
        )
        async with manager:
            yield Env(hpb, manager, speakers, clock, bridge)


async def restart_hpb_with_new_ids(hpb: HpbEmulator, generation: int) -> dict[str, str]:
    """Restart the HPB: every socket and session of ours is gone, and every
    participant comes back with a new HPB session id and the same Talk
    session id. Returns old -> new session id."""
    await hpb.stop()
    renamed = {}
    for sid in hpb.sessions_in_room(ROOM, internal=False):
        entry = hpb.session(sid)
        assert entry is not None
        await hpb.remove_participant(sid)
        new = f"{sid.split('~')[0]}~{generation}"
        await hpb.add_participant(
            ROOM,
            session_id=new,
            nextcloud_session_id=entry["nextcloudSessionId"],
            in_call=entry["inCall"],
            user_id=entry.get("userId", ""),
        )
        renamed[sid] = new
    await hpb.start()
    return renamed
