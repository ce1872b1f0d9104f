"""HpbLink against the HPB emulator over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from live_transcription.clock import ManualClock
from live_transcription.hpb import protocol
from live_transcription.hpb.connection import HpbLink, HpbLinkFactory
from live_transcription.rooms import ports
from live_transcription.sim.client import SimClient
from live_transcription.sim.emulator import HpbEmulator
from tests.integration.conftest import HPB_BACKEND, HPB_SECRET

ROOM = "room-token-1"


class RecordingClock(ManualClock):
    """A manual clock that remembers every requested sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


class Events:
    def __init__(self, link: HpbLink) -> None:
        self._it: AsyncIterator[ports.CallEvent] = link.events().__aiter__()
        self.seen: list[ports.CallEvent] = []

    async def next(self) -> ports.CallEvent:
        async with asyncio.timeout(30):
            event = await anext(self._it)
        self.seen.append(event)
        return event

    async def until(self, condition: Callable[[ports.CallEvent], bool]) -> ports.CallEvent:
        while not condition(event := await self.next()):
            pass
        return event


def factory(hpb: HpbEmulator, **overrides: Any) -> HpbLinkFactory:
    options: dict[str, Any] = {
        "ws_url": hpb.url,
        "internal_secret": HPB_SECRET,
        "backend_url": HPB_BACKEND,
        "rng": random.Random(1),
    }
    options.update(overrides)
    return HpbLinkFactory(**options)


def data_of(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [
        m["message"]
        for m in messages
        if m.get("type") == "message" and m["message"]["data"].get("type") == kind
    ]


class FakeBridge:
    def __init__(self) -> None:
        self.media = {"speaker-a"}
        self.answers: list[tuple[str, str, str, str]] = []
        self.candidates: list[tuple[str, str, str, dict[str, object]]] = []
        self.closed: list[str] = []

    async def request_offer(self, subscriber: str, publisher: str) -> tuple[str, str]:
        if publisher not in self.media:
            raise LookupError(publisher)
        return f"sid-{publisher}", f"v=0 offer of {publisher}"

    async def answer(self, subscriber: str, publisher: str, sid: str, sdp: str) -> None:
        self.answers.append((subscriber, publisher, sid, sdp))

    async def candidate(
        self, subscriber: str, publisher: str, sid: str, candidate: dict[str, object]
    ) -> None:
        self.candidates.append((subscriber, publisher, sid, candidate))

    async def close_subscriber(self, subscriber: str) -> None:
        self.closed.append(subscriber)


async def test_hello_is_verified_and_incall_comes_before_room(hpb: HpbEmulator) -> None:
    async with factory(hpb)(ROOM) as link:
        own = link.session_id
        assert own is not None
        assert hpb.sessions_in_room(ROOM, internal=True) == [own]
        first = hpb.received(own)[:3]
        assert [m["type"] for m in first] == ["hello", "internal", "room"]
        hello = first[0]["hello"]
        assert hello["version"] == "2.0" and hello["features"] == ["internal-incall"]
        params = hello["auth"]["params"]
        assert hello["auth"]["type"] == "internal" and params["backend"] == HPB_BACKEND
        assert params["token"] == protocol.internal_token(HPB_SECRET, params["random"])
        assert first[1]["internal"] == {"type": "incall", "incall": {"incall": 1}}
        assert first[2]["room"] == {"roomid": ROOM, "sessionid": own}
        assert all(isinstance(m["id"], str) for m in hpb.received(own))
        assert hpb.session(own) == {
            "sessionId": own,
            "inCall": 1,
            "lastPing": 0,
            "participantType": 3,
            "nextcloudSessionId": own,
            "internal": True,
            "room": ROOM,
        }


async def test_hello_version_1_works(hpb: HpbEmulator) -> None:
    async with factory(hpb, hello_version="1.0")(ROOM) as link:
        assert link.session_id in hpb.sessions_in_room(ROOM)


@pytest.mark.parametrize(
    "overrides",
    [{"internal_secret": "wrong"}, {"backend_url": "https://other.example"}],
)
async def test_refused_hello_raises_unavailable(hpb: HpbEmulator, overrides: dict[str, str]) -> None:
    with pytest.raises(ports.HpbUnavailable):
        async with factory(hpb, **overrides)(ROOM):
            pass
    await hpb.wait_for(lambda: hpb.open_connections == 0)
    assert hpb.sessions_in_room(ROOM) == []


async def test_unreachable_hpb_raises_unavailable(hpb: HpbEmulator) -> None:
    url = hpb.url
    await hpb.stop()
    with pytest.raises(ports.HpbUnavailable):
        async with HpbLinkFactory(url, HPB_SECRET, HPB_BACKEND)(ROOM):
            pass


async def test_speakers_mapping_and_requestoffer(hpb: HpbEmulator) -> None:
    hpb.bridge = bridge = FakeBridge()
    a = await hpb.add_participant(ROOM, session_id="speaker-a", nextcloud_session_id="nc-a", in_call=3)
    b = await hpb.add_participant(ROOM, session_id="listener-b", nextcloud_session_id="nc-b", in_call=1)
    await hpb.add_participant(ROOM, session_id="bot", in_call=3, internal=True)
    await hpb.add_participant(ROOM, session_id="phone", in_call=3, virtual=True)
    async with factory(hpb)(ROOM) as link:
        events = Events(link)
        assert await events.next() == ports.LinkState("connected")
        assert await events.next() == ports.SessionMap(added={"nc-a": a, "nc-b": b})
        assert await events.next() == ports.SpeakerJoined(a)
        link.request_offer(a)
        assert await events.next() == ports.OfferReceived(a, "sid-speaker-a", "v=0 offer of speaker-a")
        own = link.session_id
        assert own is not None
        requests = data_of(hpb.received(own), "requestoffer")
        assert requests == [
            {
                "recipient": {"type": "session", "sessionid": a},
                "data": {"type": "requestoffer", "roomType": "video"},
            }
        ]
        link.send_answer(a, "sid-speaker-a", "v=0 answer")
        link.send_candidate(
            a, "sid-speaker-a", ports.LocalCandidate("candidate:1 1 udp 1 127.0.0.1 9 typ host", "0", 0)
        )
        await hpb.wait_for(lambda: len(bridge.candidates) == 1)
        assert bridge.answers == [(own, a, "sid-speaker-a", "v=0 answer")]
        assert bridge.candidates[0][3] == {
            "candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host",
            "sdpMLineIndex": 0,
            "sdpMid": "0",
        }
        # b has no media: client_not_found is not fatal, the link keeps working,
        # and the room learns which request failed
        await hpb.set_in_call(b, 3)
        assert await events.next() == ports.SpeakerJoined(b)
        link.request_offer(b)
        assert await events.next() == ports.OfferFailed(b, "client_not_found")
        await hpb.set_in_call(a, 1)
        assert await events.next() == ports.SpeakerLeft(a)
        await hpb.remove_participant(b)
        assert await events.next() == ports.SpeakerLeft(b)
        assert await events.next() == ports.SessionMap(removed=frozenset({"nc-b"}))
        await hpb.end_call(ROOM)
        assert await events.next() == ports.CallEnded()
    await hpb.wait_for(lambda: bridge.closed == [own])


async def test_unrequested_offer_is_skipped(hpb: HpbEmulator) -> None:
    async with factory(hpb)(ROOM) as link, SimClient(hpb.url, ROOM, "nc-x") as intruder:
        events = Events(link)
        own = link.session_id
        assert own is not None
        assert intruder._ws is not None
        offer = {
            "type": "message",
            "id": "9",
            "message": {
                "recipient": {"type": "session", "sessionid": own},
                "data": {"type": "offer", "sid": "1", "payload": {"type": "offer", "sdp": "v=0"}},
            },
        }
        await intruder._ws.send(json.dumps(offer))
        await hpb.wait_for(lambda: len(hpb.received(intruder.session_id)) == 3)
        # the same socket delivers this after the offer: it was handled by then
        await hpb.set_in_call(intruder.session_id, 3)
        event = await events.until(lambda e: not isinstance(e, ports.LinkState | ports.SessionMap))
        assert event == ports.SpeakerJoined(intruder.session_id)
        assert link.skipped_media == 1


async def test_captions_reach_targets_with_exact_shape(hpb: HpbEmulator) -> None:
    speaker = await hpb.add_participant(ROOM, session_id="speaker-a", in_call=3)
    async with (
        factory(hpb)(ROOM) as link,
        SimClient(hpb.url, ROOM, "nc-carol", user_id="carol") as carol,
        SimClient(hpb.url, ROOM, "nc-dave", user_id="dave") as dave,
        SimClient(hpb.url, ROOM, "nc-erin", user_id="erin") as erin,
    ):
        events = Events(link)
        mapping: dict[str, str] = {}
        while len(mapping) < 4:
            event = await events.next()
            if isinstance(event, ports.SessionMap):
                mapping.update(event.added)
        targets = [mapping["nc-carol"], mapping["nc-dave"]]
        assert targets == [carol.session_id, dave.session_id]
        link.send_transcript(targets, speaker, "Hello there.", True, "en")
        for client in (carol, dave):
            await client.wait_for(lambda c=client: len(c.transcripts()) == 1)  # type: ignore[misc]
            assert client.transcripts() == [
                {
                    "type": "transcript",
                    "message": "Hello there.",
                    "final": True,
                    "langId": "en",
                    "speakerSessionId": speaker,
                }
            ]
        relayed = [e for e in carol.events if isinstance(e, protocol.Relayed)]
        assert relayed[0].sender == link.session_id
        assert erin.transcripts() == []


async def test_partials_are_throttled_newest_wins_final_immediate(hpb: HpbEmulator) -> None:
    clock = RecordingClock()
    for speaker in ("spk", "other"):
        await hpb.add_participant(ROOM, session_id=speaker, in_call=3)
    async with (
        factory(hpb, clock=clock)(ROOM) as link,
        SimClient(hpb.url, ROOM, "nc-carol") as carol,
    ):
        await Events(link).until(lambda e: isinstance(e, ports.SessionMap) and "nc-carol" in e.added)
        target = [carol.session_id]

        def texts() -> list[tuple[str, bool]]:
            return [(t["message"], t["final"]) for t in carol.transcripts()]

        link.send_transcript(target, "spk", "one", False, "en")
        link.send_transcript(target, "spk", "one two", False, "en")
        link.send_transcript(target, "spk", "one two three", False, "en")
        await carol.wait_for(lambda: len(texts()) == 1)
        await clock.wait_for_sleepers(1)
        await clock.advance(0.299)
        link.send_transcript(target, "other", "hi", False, "en")  # another speaker is not held back
        await carol.wait_for(lambda: len(texts()) == 2)
        await clock.advance(0.001)
        await carol.wait_for(lambda: len(texts()) == 3)
        link.send_transcript(target, "spk", "one two three four", False, "en")
        link.send_transcript(target, "spk", "One two three four five.", True, "en")
        await carol.wait_for(lambda: len(texts()) == 4)
        await clock.advance(5)
        link.send_transcript(target, "spk", "Next.", True, "en")
        await carol.wait_for(lambda: len(texts()) == 5)
        assert texts() == [
            ("one", False),
            ("hi", False),
            ("one two three", False),
            ("One two three four five.", True),
            ("Next.", True),
        ]


async def test_resume_after_short_drop_does_not_rejoin(hpb: HpbEmulator) -> None:
    speaker = await hpb.add_participant(ROOM, session_id="speaker-a", in_call=3)
    async with factory(hpb)(ROOM) as link, SimClient(hpb.url, ROOM, "nc-carol") as carol:
        events = Events(link)
        await events.until(lambda e: e == ports.SpeakerJoined(speaker))
        await events.until(lambda e: isinstance(e, ports.SessionMap) and "nc-carol" in e.added)
        own = link.session_id
        assert own is not None
        hpb.drop(own)
        await events.until(lambda e: e == ports.LinkState("reconnecting"))
        link.send_transcript([carol.session_id], speaker, "During the drop.", True, "en")
        await events.until(lambda e: e == ports.LinkState("connected"))
        assert link.session_id == own
        assert link.resumes == 1 and link.session_resets == 0
        sent = [m["type"] for m in hpb.received(own)]
        assert sent.count("room") == 1 and sent.count("hello") == 2
        assert hpb.received(own)[3]["hello"] == {"version": "2.0", "resumeid": hpb_resume_id(hpb, own)}
        await carol.wait_for(lambda: len(carol.transcripts()) == 1)
        assert not any(isinstance(e, ports.SessionReset) for e in events.seen)


def hpb_resume_id(hpb: HpbEmulator, session_id: str) -> str:
    return hpb._sessions[session_id].resume_id


async def test_no_such_session_starts_over_and_the_same_list_is_news_again(hpb: HpbEmulator) -> None:
    hpb.bridge = FakeBridge()
    speaker = await hpb.add_participant(ROOM, session_id="speaker-a", nextcloud_session_id="nc-a", in_call=3)
    async with factory(hpb)(ROOM) as link:
        events = Events(link)
        await events.until(lambda e: e == ports.SpeakerJoined(speaker))
        link.request_offer(speaker)
        await events.until(lambda e: isinstance(e, ports.OfferReceived))
        old = link.session_id
        assert old is not None
        hpb.refuse_resume = True
        hpb.drop(old)
        # what the old session knew is gone: its speakers leave, then the reset
        assert await events.until(lambda e: isinstance(e, ports.SpeakerLeft)) == ports.SpeakerLeft(speaker)
        assert await events.next() == ports.SessionReset()
        # the unchanged participant list after the new join rebuilds everything
        after_reset: list[ports.CallEvent] = []
        while ports.SpeakerJoined(speaker) not in after_reset:
            after_reset.append(await events.next())
        assert ports.SessionMap(added={"nc-a": speaker}, removed=frozenset()) in after_reset
        link.request_offer(speaker)  # the room asks again for whom it captions
        offer = await events.until(lambda e: isinstance(e, ports.OfferReceived))
        assert offer == ports.OfferReceived(speaker, "sid-speaker-a", "v=0 offer of speaker-a")
        new = link.session_id
        assert new is not None and new != old
        assert hpb.session(old) is None
        assert hpb.sessions_in_room(ROOM, internal=True) == [new]
        assert [m["type"] for m in hpb.received(new)] == ["hello", "internal", "room", "message"]
        assert data_of(hpb.received(new), "requestoffer")[0]["recipient"]["sessionid"] == speaker
        assert link.session_resets == 1 and link.resumes == 0


async def test_backoff_is_exponential_capped_and_jittered(hpb: HpbEmulator) -> None:
    clock = RecordingClock()
    link_factory = factory(hpb, clock=clock, backoff_base=0.5, backoff_cap=4.0)
    async with link_factory(ROOM) as link:
        events = Events(link)
        await hpb.stop()
        await events.until(lambda e: e == ports.LinkState("reconnecting"))
        for _ in range(7):
            await clock.wait_for_sleepers(1)
            await clock.advance(clock.sleeps[-1])
        await clock.wait_for_sleepers(1)
        ceilings = [min(4.0, 0.5 * 2**i) for i in range(8)]
        assert len(clock.sleeps) == 8
        for delay, ceiling in zip(clock.sleeps, ceilings, strict=True):
            assert ceiling / 2 <= delay <= ceiling
        assert len(set(clock.sleeps)) == 8  # jittered, not a fixed ladder
        # transcripts while the HPB is gone are bounded, oldest dropped
        for i in range(link_factory.transcript_limit + 10):
            link.send_transcript(["t"], "spk", f"caption {i}", True, "en")
        assert link.transcripts_dropped == 10
        await hpb.start()
        await clock.advance(clock.sleeps[-1])
        await events.until(lambda e: e == ports.SessionReset())
        await events.until(lambda e: e == ports.LinkState("connected"))
        assert link.session_id is not None
        # every failed attempt was told, with its cause and when it began
        failures = [e for e in events.seen if isinstance(e, ports.ReconnectFailed)]
        assert len(failures) == 8
        assert {e.cause.words for e in failures} == {"connection refused"}
        assert [e.began for e in failures] == sorted(e.began for e in failures)


async def test_garbage_frames_are_skipped(hpb: HpbEmulator) -> None:
    async with factory(hpb)(ROOM) as link:
        events = Events(link)
        own = link.session_id
        assert own is not None
        await hpb.send_raw(own, "{not json")
        await hpb.send_raw(own, b"\xff\x00binary")
        await hpb.send_raw(own, '{"type":"message","message":{"data":{"type":"offer"}}}')
        await hpb.send_raw(
            own, '{"type":"event","event":{"target":"participants","type":"update","update":{"users":7}}}'
        )
        await hpb.send_raw(own, json.dumps({"type": "x", "pad": "a" * (protocol.MAX_FRAME_BYTES + 1)}))
        speaker = await hpb.add_participant(ROOM, in_call=3)
        await events.until(lambda e: e == ports.SpeakerJoined(speaker))
        assert link.malformed_frames == 5
        assert link.session_id == own and link.resumes == 0


async def test_close_says_bye_and_leaves_nothing_behind(hpb: HpbEmulator) -> None:
    before = asyncio.all_tasks()
    hpb.bridge = FakeBridge()
    speaker = await hpb.add_participant(ROOM, session_id="speaker-a", in_call=3)
    async with factory(hpb)(ROOM) as link:
        events = Events(link)
        await events.until(lambda e: e == ports.SpeakerJoined(speaker))
        link.request_offer(speaker)
        link.send_transcript(["x"], speaker, "partial", False, "en")
        link.send_transcript(["x"], speaker, "pending partial", False, "en")
        own = link.session_id
        assert own is not None
    assert hpb.received(own)[-1]["type"] == "bye"
    await hpb.wait_for(lambda: hpb.open_connections == 0)
    assert hpb.session(own) is None
    assert link.session_id is None
    assert asyncio.all_tasks() == before
    assert [e async for e in link.events()][-1:] == [ports.LinkState("closed")]


async def test_too_many_requests_backs_off_longer(hpb: HpbEmulator) -> None:
    clock = RecordingClock()
    async with factory(hpb, clock=clock, backoff_base=0.5, backoff_cap=30.0)(ROOM) as link:
        events = Events(link)
        own = link.session_id
        assert own is not None
        hpb.hello_error = "too_many_requests"
        hpb.drop(own)
        await events.until(lambda e: e == ports.LinkState("reconnecting"))
        await clock.wait_for_sleepers(1)
        # without the penalty the first delay would be at most 0.5 s
        assert 0.5 * 2**3 / 2 <= clock.sleeps[0] <= 0.5 * 2**3
        hpb.hello_error = None
        await clock.advance(clock.sleeps[0])
        await events.until(lambda e: e == ports.LinkState("connected"))
        assert link.session_id == own and link.resumes == 1
