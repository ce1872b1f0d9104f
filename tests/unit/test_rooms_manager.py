"""The Manager and Room lifecycle, driven through an in-memory link."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from live_transcription.clock import ManualClock
from live_transcription.hpb.failures import FailureCause
from live_transcription.rooms import ports
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import (
    CapacityReached,
    JoinCancelled,
    Manager,
    NoSuchRoom,
    ProviderFailure,
    UnsupportedLanguage,
)
from live_transcription.stt.base import Language
from tests.fake_link import LinkFactory, SpeakerFactory
from tests.waiting import until, wait_event

LANGS = {"en": Language("en", "English"), "fr": Language("fr", "French")}
TOKEN = "room-token-1"


@dataclass
class Env:
    manager: Manager
    links: LinkFactory
    speakers: SpeakerFactory
    clock: ManualClock
    admission: Admission


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    links = LinkFactory()
    speakers = SpeakerFactory()
    clock = ManualClock()
    admission = Admission(max_speakers=3, max_speakers_per_room=2)
    manager = Manager(
        link_factory=links,
        speaker_factory=speakers,
        languages=LANGS,
        admission=admission,
        linger_seconds=60,
        clock=clock,
        join_timeout=5,
    )
    async with manager:
        yield Env(manager, links, speakers, clock, admission)


async def test_first_enable_joins_and_captions_reach_resolved_targets(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True, "en")
    link = env.links.links[TOKEN]
    room = env.manager.room(TOKEN)
    assert room is not None
    await link.emit(ports.SessionMap(added={"talk-a": "hpb-a", "talk-x": "hpb-x"}))
    await link.emit(ports.SpeakerJoined("hpb-s"))
    await until(lambda: link.offers_requested == ["hpb-s"])
    await link.emit(ports.OfferReceived("hpb-s", "sid-1", "v=0"))
    await wait_event(env.speakers.started)
    speaker = env.speakers.speakers[0]
    await wait_event(speaker.running)
    speaker.say("hello world", False)
    speaker.say("Hello world.", True)
    assert [(t.targets, t.text, t.final, t.language) for t in link.transcripts] == [
        (["hpb-a"], "hello world", False, "en"),
        (["hpb-a"], "Hello world.", True, "en"),
    ]
    assert link.transcripts[0].speaker == "hpb-s"


async def test_target_waits_pending_until_its_mapping_arrives(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-late", True)
    link = env.links.links[TOKEN]
    room = env.manager.room(TOKEN)
    assert room is not None
    await until(lambda: room.pending_targets == {"talk-late"})
    await link.emit(ports.SpeakerJoined("hpb-s"))
    await link.emit(ports.OfferReceived("hpb-s", "sid", "v=0"))
    await wait_event(env.speakers.started)
    env.speakers.speakers[0].say("lost words", True)
    assert link.transcripts == []
    assert room.stats.captions_without_target == 1
    await link.emit(ports.SessionMap(added={"talk-late": "hpb-late"}))
    await until(lambda: not room.pending_targets)
    env.speakers.speakers[0].say("now delivered", True)
    assert [t.targets for t in link.transcripts] == [["hpb-late"]]


async def test_disable_removes_one_target_only(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    await env.manager.transcribe(TOKEN, "talk-b", True)
    link = env.links.links[TOKEN]
    room = env.manager.room(TOKEN)
    assert room is not None
    await link.emit(ports.SessionMap(added={"talk-a": "hpb-a", "talk-b": "hpb-b"}))
    await until(lambda: room.target_count == 2 and not room.pending_targets)
    message = await env.manager.transcribe(TOKEN, "talk-a", False)
    assert "disabled" in message
    await until(lambda: room.target_count == 1)
    assert not link.closed.is_set()
    room._publish("hpb-s", "still here", True)
    assert link.transcripts[-1].targets == ["hpb-b"]


async def test_room_lingers_then_closes_after_last_target(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    await env.manager.transcribe(TOKEN, "talk-a", False)
    await env.clock.wait_for_sleepers(1)
    await env.clock.advance(59)
    assert env.manager.room(TOKEN) is not None
    assert not link.closed.is_set()
    await env.clock.advance(2)
    await wait_event(link.closed)
    await until(lambda: env.manager.room(TOKEN) is None)
    assert env.manager.rooms_closed == 1


async def test_new_target_during_linger_keeps_the_room(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    await env.manager.transcribe(TOKEN, "talk-a", False)
    await env.clock.wait_for_sleepers(1)
    await env.clock.advance(30)
    await env.manager.transcribe(TOKEN, "talk-b", True)
    room = env.manager.room(TOKEN)
    assert room is not None
    await until(lambda: room.target_count == 1)
    await env.clock.advance(120)
    assert not link.closed.is_set()
    assert env.manager.room(TOKEN) is room


async def test_target_leaving_the_room_counts_as_gone(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    room = env.manager.room(TOKEN)
    assert room is not None
    await link.emit(ports.SessionMap(added={"talk-a": "hpb-a"}))
    await link.emit(ports.SessionMap(removed=frozenset({"talk-a"})))
    await until(lambda: room.target_count == 0)
    await env.clock.wait_for_sleepers(1)
    await env.clock.advance(61)
    await wait_event(link.closed)


async def test_leave_closes_at_once_and_closes_speakers(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    await link.emit(ports.SpeakerJoined("hpb-s"))
    await link.emit(ports.OfferReceived("hpb-s", "sid", "v=0"))
    await wait_event(env.speakers.started)
    assert await env.manager.leave(TOKEN)
    await wait_event(link.closed)
    await wait_event(env.speakers.speakers[0].finished)
    await until(lambda: env.manager.room(TOKEN) is None)
    assert env.admission.active == 0
    assert not await env.manager.leave(TOKEN)


async def test_call_end_closes_the_room(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    await link.emit(ports.CallEnded())
    await wait_event(link.closed)
    await until(lambda: env.manager.room(TOKEN) is None)


async def test_link_ending_closes_the_room(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    await link.end()
    await wait_event(link.closed)
    await until(lambda: env.manager.room(TOKEN) is None)


async def test_language_checks_and_changes(env: Env) -> None:
    with pytest.raises(UnsupportedLanguage):
        await env.manager.transcribe(TOKEN, "talk-a", True, "xx")
    assert env.manager.room(TOKEN) is None
    assert env.links.links == {}
    with pytest.raises(NoSuchRoom):
        await env.manager.set_language(TOKEN, "fr")
    await env.manager.transcribe(TOKEN, "talk-a", True, "en")
    link = env.links.links[TOKEN]
    await link.emit(ports.SpeakerJoined("hpb-s"))
    await link.emit(ports.OfferReceived("hpb-s", "sid", "v=0"))
    await wait_event(env.speakers.started)
    with pytest.raises(UnsupportedLanguage):
        await env.manager.set_language(TOKEN, "de")
    await env.manager.set_language(TOKEN, "fr")
    room = env.manager.room(TOKEN)
    assert room is not None
    await until(lambda: room.language == "fr")
    assert env.speakers.speakers[0].languages == ["en", "fr"]
    room._targets.add("t")
    room._targets.apply_mapping({"t": "hpb-t"}, frozenset())
    room._publish("hpb-s", "bonjour", True)
    assert link.transcripts[-1].language == "fr"


async def test_hpb_unavailable_creates_nothing(env: Env) -> None:
    env.links.fail = True
    with pytest.raises(ports.HpbUnavailable):
        await env.manager.transcribe(TOKEN, "talk-a", True)
    await until(lambda: env.manager.room(TOKEN) is None)
    env.links.fail = False
    await env.manager.transcribe(TOKEN, "talk-a", True)
    assert env.manager.room(TOKEN) is not None


async def test_join_timeout_gives_up_and_leaves_nothing() -> None:
    links = LinkFactory(hang=True)
    manager = Manager(
        link_factory=links,
        speaker_factory=SpeakerFactory(),
        languages=LANGS,
        admission=Admission(max_speakers=1, max_speakers_per_room=1),
        join_timeout=0.05,
    )
    async with manager:
        with pytest.raises(ports.HpbUnavailable):
            await manager.transcribe(TOKEN, "talk-a", True)
        await until(lambda: manager.room(TOKEN) is None)
        assert manager.rooms_closed == 1


async def test_provider_failure_refuses_with_reason() -> None:
    manager = Manager(
        link_factory=LinkFactory(),
        speaker_factory=SpeakerFactory(),
        languages=LANGS,
        admission=Admission(max_speakers=1, max_speakers_per_room=1),
        provider_failure=lambda: "STT credentials rejected",
    )
    async with manager:
        with pytest.raises(ProviderFailure, match="credentials"):
            await manager.transcribe(TOKEN, "talk-a", True)
        assert manager.room(TOKEN) is None


async def test_room_cap() -> None:
    manager = Manager(
        link_factory=LinkFactory(),
        speaker_factory=SpeakerFactory(),
        languages=LANGS,
        admission=Admission(max_speakers=1, max_speakers_per_room=1),
        max_rooms=1,
    )
    async with manager:
        await manager.transcribe("one", "talk-a", True)
        with pytest.raises(CapacityReached):
            await manager.transcribe("two", "talk-a", True)


async def test_speaker_caps_refuse_then_admit_when_a_slot_frees(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    room = env.manager.room(TOKEN)
    assert room is not None
    for sid in ("s1", "s2", "s3"):
        await link.emit(ports.SpeakerJoined(sid))
    # no offer is requested beyond the room cap of 2: the slots are held at request time
    await until(lambda: room.stats.speakers_refused >= 1)
    assert link.offers_requested == ["s1", "s2"]
    assert env.admission.active == 2
    assert room.waiting_speakers == {"s3"}
    # an unasked offer beyond the cap is refused too
    await link.emit(ports.OfferReceived("s3", "sid-s3", "v=0"))
    for sid in ("s1", "s2"):
        await link.emit(ports.OfferReceived(sid, "sid-" + sid, "v=0"))
    await until(lambda: room.speaker_ids == {"s1", "s2"} and room.stats.speakers_refused >= 2)
    assert env.admission.active == 2
    await link.emit(ports.SpeakerLeft("s1"))
    await until(lambda: link.offers_requested[2:] == ["s3"])
    await link.emit(ports.OfferReceived("s3", "sid-s3b", "v=0"))
    await until(lambda: room.speaker_ids == {"s2", "s3"})
    assert env.admission.active == 2
    assert room.waiting_speakers == frozenset()


async def test_speaker_leaving_before_its_offer_frees_the_slot(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    room = env.manager.room(TOKEN)
    assert room is not None
    for sid in ("s1", "s2", "s3"):
        await link.emit(ports.SpeakerJoined(sid))
    await until(lambda: link.offers_requested == ["s1", "s2"] and room.waiting_speakers == {"s3"})
    await link.emit(ports.SpeakerLeft("s1"))  # no offer came for s1 yet
    await until(lambda: link.offers_requested == ["s1", "s2", "s3"])
    assert env.admission.active == 2
    await env.manager.leave(TOKEN)
    await until(lambda: env.manager.room(TOKEN) is None)
    assert env.admission.active == 0


async def test_offers_candidates_and_replacement(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    room = env.manager.room(TOKEN)
    assert room is not None
    await link.emit(ports.OfferReceived("stranger", "sid", "v=0"))
    await link.emit(ports.CandidateReceived("hpb-s", "sid", "candidate:1", "0", 0))
    await until(lambda: room.stats.events_skipped == 2)
    await link.emit(ports.SpeakerJoined("hpb-s"))
    await link.emit(ports.OfferReceived("hpb-s", "sid-1", "v=0"))
    await link.emit(ports.CandidateReceived("hpb-s", "sid-1", "candidate:1", "0", 0))
    await until(lambda: len(env.speakers.speakers) == 1 and env.speakers.speakers[0].candidates != [])
    first = env.speakers.speakers[0]
    await link.emit(ports.OfferReceived("hpb-s", "sid-2", "v=0"))
    await wait_event(first.finished)
    await until(lambda: len(env.speakers.speakers) == 2)
    await until(lambda: room.speaker_ids == {"hpb-s"})
    assert env.admission.active == 1
    requested = len(link.offers_requested)
    await link.emit(ports.SessionReset())
    await wait_event(env.speakers.speakers[1].finished)
    # still speaking: a fresh offer is asked for, its slot held meanwhile
    await until(lambda: len(link.offers_requested) == requested + 1 and room.speaker_ids == frozenset())
    assert env.admission.active == 1
    await link.emit(ports.SpeakerLeft("hpb-s"))
    await until(lambda: env.admission.active == 0)


async def test_shutdown_leaves_every_room() -> None:
    links = LinkFactory()
    manager = Manager(
        link_factory=links,
        speaker_factory=SpeakerFactory(),
        languages=LANGS,
        admission=Admission(max_speakers=5, max_speakers_per_room=5),
    )
    async with manager:
        for token in ("r1", "r2", "r3"):
            await manager.transcribe(token, "talk", True)
    assert all(link.closed.is_set() for link in links.links.values())
    assert manager.rooms() == []
    with pytest.raises(CapacityReached):
        await manager.transcribe("r4", "talk", True)


async def test_refused_offer_frees_the_slot_without_asking_in_a_loop(env: Env) -> None:
    await env.manager.transcribe(TOKEN, "talk-a", True)
    link = env.links.links[TOKEN]
    room = env.manager.room(TOKEN)
    assert room is not None
    for sid in ("s1", "s2", "s3"):
        await link.emit(ports.SpeakerJoined(sid))
    await until(lambda: link.offers_requested == ["s1", "s2"] and room.waiting_speakers == {"s3"})
    await link.emit(ports.OfferFailed("s1", "client_not_found"))
    # s1's slot goes to the waiting s3; s1 is not asked again on its own
    await until(lambda: link.offers_requested == ["s1", "s2", "s3"])
    assert env.admission.active == 2
    await link.emit(ports.OfferReceived("s2", "sid-s2", "v=0"))
    await link.emit(ports.OfferReceived("s3", "sid-s3", "v=0"))
    await until(lambda: room.speaker_ids == {"s2", "s3"})
    assert link.offers_requested == ["s1", "s2", "s3"]
    # when the HPB reports s1 joining again and a slot is free, it is asked again
    await link.emit(ports.SpeakerLeft("s2"))
    await link.emit(ports.SpeakerJoined("s1"))
    await until(lambda: link.offers_requested[3:] == ["s1"])


async def test_a_closed_room_is_freed_by_reference_counting_alone(env: Env) -> None:
    # a room closed with speakers in it: their end notices arrive after the
    # room stopped reading them, and must not keep it in a reference cycle
    gc.collect()
    gc.disable()
    try:
        await env.manager.transcribe(TOKEN, "talk-a", True)
        link = env.links.links[TOKEN]
        room = env.manager.room(TOKEN)
        assert room is not None
        room_ref = weakref.ref(room)
        del room
        for speaker in ("hpb-s", "hpb-t"):
            await link.emit(ports.SpeakerJoined(speaker))
            await link.emit(ports.OfferReceived(speaker, f"sid-{speaker}", "v=0"))
        await until(lambda: len(env.speakers.speakers) == 2)
        assert await env.manager.leave(TOKEN)
        await wait_event(link.closed)
        await asyncio.gather(*(wait_event(speaker.finished) for speaker in env.speakers.speakers))
        await until(lambda: env.manager.room(TOKEN) is None)
        env.speakers.speakers.clear()  # the test's own references to the speakers
        await until(lambda: room_ref() is None, what="the room waits for the cyclic collector")
    finally:
        gc.enable()


async def test_leave_before_the_room_task_ran_cancels_the_join(env: Env) -> None:
    enabling = asyncio.create_task(env.manager.transcribe(TOKEN, "talk-a", True))
    await asyncio.sleep(0)  # transcribe waits for the join; the room's task has not run yet
    assert env.manager.room(TOKEN) is not None
    assert await env.manager.leave(TOKEN)
    with pytest.raises(JoinCancelled, match="left before it was joined"):
        await asyncio.wait_for(enabling, 15)
    await until(lambda: env.manager.room(TOKEN) is None)
    assert env.links.links == {}  # the join never went on
    assert env.manager.joins.report().pending == 0


async def test_reconnect_failures_of_every_room_are_one_outage_logged_at_its_start_and_end(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="live_transcription")
    for token in ("r1", "r2"):
        await env.manager.transcribe(token, "talk-a", True)
    links = [env.links.links[token] for token in ("r1", "r2")]
    refused = FailureCause("connection-refused", "connection refused")
    for link in links:
        await link.emit(ports.LinkState("reconnecting"))
    await until(lambda: all(room.link_state == "reconnecting" for room in env.manager.rooms()))
    assert not env.manager.joins.outage.ongoing  # a link lost is no outage until an attempt fails
    outage = env.manager.joins.outage
    for round_ in range(3):  # every room retries: still one outage
        if round_:
            await env.clock.advance(5)
        for link in links:
            await link.emit(ports.ReconnectFailed(refused, began=env.clock.now()))
        await until(lambda: outage.failed_attempts == 2 * (round_ + 1))  # noqa: B023
    signaling = [r for r in caplog.records if r.__dict__.get("event") == "hpb-outage"]
    assert [(r.levelname, r.getMessage()) for r in signaling] == [
        ("WARNING", "cannot reach the signaling server (connection refused): rooms cannot be joined or kept")
    ]
    await links[0].emit(ports.LinkState("connected"))
    await until(lambda: not outage.ongoing)
    await links[1].emit(ports.LinkState("connected"))
    await until(lambda: all(room.link_state == "connected" for room in env.manager.rooms()))
    signaling = [r for r in caplog.records if r.__dict__.get("event") == "hpb-outage"]
    assert [(r.levelname, r.getMessage()) for r in signaling] == [
        ("WARNING", "cannot reach the signaling server (connection refused): rooms cannot be joined or kept"),
        (
            "INFO",
            "signaling server reachable again after 10 s "
            "(0 join(s) and 6 reconnection attempt(s) failed meanwhile)",
        ),
    ]
