"""Translated captions through the HPB emulator: the real HPB link, rooms and
translation workers, the Task Processing stand-in as Nextcloud, and speakers
that say exactly the finals a test wants."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import REGISTRY

from live_transcription.hpb.connection import HpbLinkFactory
from live_transcription.hpb.ice import app_api_headers
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import Manager
from live_transcription.rooms.room import Room
from live_transcription.sim.client import SimClient
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.stt.base import Language
from live_transcription.translation.ocs import TaskProcessingClient
from live_transcription.translation.room import TranslationSetup
from live_transcription.translation.translator import Translator
from tests.fake_link import FakeSpeaker, SpeakerFactory
from tests.fakes.nextcloud_taskprocessing import FakeTaskProcessing
from tests.integration.conftest import HPB_BACKEND, HPB_SECRET
from tests.waiting import until

ROOM = "translateroom"
SECRET = "flow-app-secret"
LANGS = {code: Language(code, code.upper()) for code in ("en", "fr", "de")}


class OfferBridge:
    """Media for the speaker: an offer the fake speaker never needs to answer."""

    async def request_offer(self, subscriber: str, publisher: str) -> tuple[str, str]:
        return f"sid-{publisher}", f"v=0 offer of {publisher}"

    async def answer(self, subscriber: str, publisher: str, sid: str, sdp: str) -> None:
        pass

    async def candidate(
        self, subscriber: str, publisher: str, sid: str, candidate: dict[str, object]
    ) -> None:
        pass

    async def close_subscriber(self, subscriber: str) -> None:
        pass


@dataclass
class World:
    hpb: HpbEmulator
    fake: FakeTaskProcessing
    manager: Manager
    speakers: SpeakerFactory

    def room(self) -> Room:
        room = self.manager.room(ROOM)
        assert room is not None
        return room

    async def alice(self) -> FakeSpeaker:
        await until(lambda: bool(self.speakers.by_session("alice")), deadline=30)
        return self.speakers.by_session("alice")[-1]

    async def viewers_ready(self) -> None:
        """Every target's HPB session is known: captions can reach them."""
        await until(lambda: not self.room().pending_targets, deadline=30)


@pytest.fixture
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    timeout = float(getattr(request, "param", 20.0))  # the time bound of a translation
    headers = app_api_headers(app_id="live_transcription", app_version="0.1.0", app_secret=SECRET)
    async with (
        HpbEmulator(HPB_SECRET, HPB_BACKEND, bridge=OfferBridge()) as hpb,
        FakeTaskProcessing(app_secret=SECRET) as fake,
        TaskProcessingClient(fake.url, headers, app_id="live_transcription") as nextcloud,
        Translator(nextcloud, max_tasks=4) as translator,
    ):
        await hpb.add_participant(ROOM, session_id="alice", nextcloud_session_id="talk-alice", in_call=7)
        speakers = SpeakerFactory()
        manager = Manager(
            link_factory=HpbLinkFactory(ws_url=hpb.url, internal_secret=HPB_SECRET, backend_url=HPB_BACKEND),
            speaker_factory=speakers,
            languages=LANGS,
            admission=Admission(max_speakers=10, max_speakers_per_room=5),
            translation=TranslationSetup(translator, timeout=timeout, max_jobs=8),
        )
        async with manager:
            await translator.languages()
            yield World(hpb, fake, manager, speakers)


def finals(client: SimClient) -> list[tuple[str, str]]:
    return [(m["langId"], m["message"]) for m in client.transcripts() if m["final"]]


def well_formed(messages: list[dict[str, Any]]) -> None:
    for message in messages:
        assert message["type"] == "transcript" and message["speakerSessionId"] == "alice"


async def test_one_translation_per_language_each_to_its_readers_only(world: World) -> None:
    async with (
        SimClient(world.hpb.url, ROOM, "talk-fr-1") as fr1,
        SimClient(world.hpb.url, ROOM, "talk-fr-2") as fr2,
        SimClient(world.hpb.url, ROOM, "talk-de") as de,
        SimClient(world.hpb.url, ROOM, "talk-plain") as plain,
    ):
        for client in (fr1, fr2, de, plain):
            await world.manager.transcribe(ROOM, client.nextcloud_session_id, True, "en")
        await world.manager.set_target_language(ROOM, "talk-fr-1", "fr")
        await world.manager.set_target_language(ROOM, "talk-fr-2", "fr")
        await world.manager.set_target_language(ROOM, "talk-de", "de")
        await world.viewers_ready()
        alice = await world.alice()

        alice.say("good", False)
        alice.say("good morning", True)
        alice.say("see you", True)
        for client in (fr1, fr2):
            await client.wait_for(lambda c=client: len(finals(c)) == 2)  # type: ignore[misc]
            assert finals(client) == [("fr", "[fr] good morning"), ("fr", "[fr] see you")]
        await de.wait_for(lambda: len(finals(de)) == 2)
        assert finals(de) == [("de", "[de] good morning"), ("de", "[de] see you")]
        await plain.wait_for(lambda: len(finals(plain)) == 2)
        assert finals(plain) == [("en", "good morning"), ("en", "see you")]

        # readers of a translation get no partials and no originals
        assert [m["final"] for m in plain.transcripts()] == [False, True, True]
        for client in (fr1, fr2, de, plain):
            well_formed(client.transcripts())
        for client in (fr1, fr2, de):
            assert all(m["final"] for m in client.transcripts())
        # one task per final and language, however many read it
        assert sorted((t["target_language"], t["input"]) for t in world.fake.scheduled()) == [
            ("de", "good morning"),
            ("de", "see you"),
            ("fr", "good morning"),
            ("fr", "see you"),
        ]
        assert {t["origin_language"] for t in world.fake.scheduled()} == {"en"}


async def test_a_translation_that_finishes_early_waits_for_the_earlier_one(world: World) -> None:
    world.fake.hold_when = lambda text: text == "first"
    async with SimClient(world.hpb.url, ROOM, "talk-fr") as reader:
        await world.manager.transcribe(ROOM, "talk-fr", True, "en")
        await world.manager.set_target_language(ROOM, "talk-fr", "fr")
        await world.viewers_ready()
        alice = await world.alice()
        alice.say("first", True)
        alice.say("second", True)
        translations = world.room().translations
        assert translations is not None
        await until(lambda: translations.held_back == 1, deadline=30)  # "second" is back, "first" is not
        assert finals(reader) == []
        world.fake.release()
        await reader.wait_for(lambda: len(finals(reader)) == 2)
        assert finals(reader) == [("fr", "[fr] first"), ("fr", "[fr] second")]


@pytest.mark.parametrize("world", [1.0], indirect=True)
async def test_a_late_translation_is_dropped_never_delivered_out_of_order(world: World) -> None:
    world.fake.hold_when = lambda text: text == "stuck"
    async with SimClient(world.hpb.url, ROOM, "talk-fr") as reader:
        await world.manager.transcribe(ROOM, "talk-fr", True, "en")
        await world.manager.set_target_language(ROOM, "talk-fr", "fr")
        await world.viewers_ready()
        translations = world.room().translations
        assert translations is not None
        alice = await world.alice()
        alice.say("stuck", True)
        alice.say("next", True)
        await reader.wait_for(lambda: len(finals(reader)) == 1)
        assert finals(reader) == [("fr", "[fr] next")]
        assert translations.stats.dropped == 1 and translations.stats.delivered == 1
        world.fake.release()
        alice.say("last", True)
        await reader.wait_for(lambda: len(finals(reader)) == 2)
        assert finals(reader) == [("fr", "[fr] next"), ("fr", "[fr] last")]


async def test_turning_translation_off_stops_it_at_once_and_brings_back_the_originals(world: World) -> None:
    world.fake.hold_when = lambda text: text == "in flight"
    async with SimClient(world.hpb.url, ROOM, "talk-fr") as reader:
        await world.manager.transcribe(ROOM, "talk-fr", True, "en")
        await world.manager.set_target_language(ROOM, "talk-fr", "fr")
        await world.viewers_ready()
        alice = await world.alice()
        alice.say("in flight", True)
        await world.fake.wait_for(lambda: len(world.fake.tasks) == 1)
        await world.manager.set_target_language(ROOM, "talk-fr", None)
        world.fake.release()
        translations = world.room().translations
        assert translations is not None
        await until(lambda: translations.stats.dropped == 1, deadline=30)  # nobody reads fr any more
        alice.say("after", True)
        await reader.wait_for(lambda: len(finals(reader)) == 1)
        assert finals(reader) == [("en", "after")]
        assert len(world.fake.tasks) == 1


async def test_a_new_room_language_retargets_translations(world: World) -> None:
    async with (
        SimClient(world.hpb.url, ROOM, "talk-fr") as fr,
        SimClient(world.hpb.url, ROOM, "talk-de") as de,
    ):
        await world.manager.transcribe(ROOM, "talk-fr", True, "en")
        await world.manager.transcribe(ROOM, "talk-de", True, "en")
        await world.manager.set_target_language(ROOM, "talk-fr", "fr")
        await world.manager.set_target_language(ROOM, "talk-de", "de")
        await world.viewers_ready()
        alice = await world.alice()

        await world.manager.set_language(ROOM, "fr")
        await until(lambda: world.room().language == "fr")
        alice.say("bonjour", True)
        await fr.wait_for(lambda: len(finals(fr)) == 1)
        await de.wait_for(lambda: len(finals(de)) == 1)
        assert finals(fr) == [("fr", "bonjour")]  # the call is in their language now: originals
        assert finals(de) == [("de", "[de] bonjour")]
        # French is not an origin of the provider: it detects the language itself
        assert [(t["origin_language"], t["target_language"]) for t in world.fake.scheduled()] == [
            ("detect_language", "de")
        ]

        await world.manager.set_language(ROOM, "en")
        await until(lambda: world.room().language == "en")
        alice.say("hello again", True)
        await fr.wait_for(lambda: len(finals(fr)) == 2)
        assert finals(fr)[-1] == ("fr", "[fr] hello again")  # their choice held
        assert world.room().translation_languages == {"fr", "de"}


async def test_translations_unfinished_when_the_room_closes_are_counted(world: World) -> None:
    world.fake.hold_when = lambda text: True
    dropped = REGISTRY.get_sample_value(
        "live_transcription_translations_dropped_total", {"reason": "shutdown"}
    )
    async with SimClient(world.hpb.url, ROOM, "talk-fr") as reader:
        await world.manager.transcribe(ROOM, "talk-fr", True, "en")
        await world.manager.set_target_language(ROOM, "talk-fr", "fr")
        await world.viewers_ready()
        alice = await world.alice()
        alice.say("never back", True)
        await world.fake.wait_for(lambda: len(world.fake.tasks) == 1)
        await world.manager.leave(ROOM)
        await until(lambda: world.manager.room(ROOM) is None, deadline=30)
        after = REGISTRY.get_sample_value(
            "live_transcription_translations_dropped_total", {"reason": "shutdown"}
        )
        assert after == (dropped or 0) + 1
        assert finals(reader) == []
