"""The Manager as a cluster replica's room host, without NATS: the commands
the node routes here, rooms re-opened from a lease's record, rooms stopped
when their lease went elsewhere, and what the node is told (each room's
record, each room's end)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from live_transcription.api.commands import run_command
from live_transcription.clock import ManualClock
from live_transcription.cluster.codec import (
    Leave,
    Reply,
    RoomRecord,
    SetLanguage,
    SetTargetLanguage,
    Transcribe,
)
from live_transcription.rooms import ports
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.cluster_host import ManagerHost
from live_transcription.rooms.manager import Manager
from live_transcription.stt.base import Language
from tests.fake_link import LinkFactory, SpeakerFactory
from tests.waiting import until

LANGS = {"en": Language("en", "English"), "fr": Language("fr", "French")}
TOKEN = "room-token-1"


@dataclass
class FakeNode:
    """What the host tells the node."""

    records: list[RoomRecord] = field(default_factory=list)
    ended: list[tuple[str, bool]] = field(default_factory=list)

    def record_changed(self, record: RoomRecord) -> None:
        self.records.append(record)

    def room_ended(self, room: str, *, release: bool = True) -> None:
        self.ended.append((room, release))


@dataclass
class Env:
    host: ManagerHost
    manager: Manager
    node: FakeNode
    links: LinkFactory


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    links = LinkFactory()
    manager = Manager(
        link_factory=links,
        speaker_factory=SpeakerFactory(),
        languages=LANGS,
        admission=Admission(max_speakers=7, max_speakers_per_room=5),
        linger_seconds=60,
        clock=ManualClock(),
        join_timeout=5,
        max_rooms=2,
    )
    host = ManagerHost(manager, run_command)
    node = FakeNode()
    host.node = node
    manager.observer = host
    async with manager:
        yield Env(host, manager, node, links)


async def test_commands_run_here_and_the_node_hears_every_record_change(env: Env) -> None:
    reply = await env.host.execute(Transcribe(TOKEN, "talk-a", language="en"))
    assert reply == Reply(200, {"message": "transcription enabled for this session"})
    await env.host.execute(Transcribe(TOKEN, "talk-b"))
    assert (await env.host.execute(SetLanguage(TOKEN, "fr"))).status == 200
    await env.host.execute(Transcribe(TOKEN, "talk-a", enable=False))
    await until(lambda: env.node.records[-1:] == [RoomRecord(TOKEN, "fr", frozenset({"talk-b"}))])
    assert env.node.records == [
        RoomRecord(TOKEN, "en", frozenset({"talk-a"})),
        RoomRecord(TOKEN, "en", frozenset({"talk-a", "talk-b"})),
        RoomRecord(TOKEN, "fr", frozenset({"talk-a", "talk-b"})),
        RoomRecord(TOKEN, "fr", frozenset({"talk-b"})),
    ]
    # a target that leaves the call with its session is gone from the record too
    link = env.links.links[TOKEN]
    await link.emit(ports.SessionMap(added={"talk-b": "hpb-b"}))
    await link.emit(ports.SessionMap(added={}, removed=frozenset({"talk-b"})))
    await until(lambda: env.node.records[-1] == RoomRecord(TOKEN, "fr", frozenset()))
    assert env.host.has_room(TOKEN)
    assert env.host.load().rooms == 1

    assert (await env.host.execute(Leave(TOKEN))).status == 200
    await until(lambda: not env.host.has_room(TOKEN))
    assert env.node.ended == [(TOKEN, True)]  # left: the lease is released at once


async def test_errors_get_the_status_codes_of_the_routes(env: Env) -> None:
    assert (await env.host.execute(Transcribe(TOKEN, "talk-a", language="xx"))).status == 400
    assert (await env.host.execute(SetLanguage(TOKEN, "fr"))).status == 404
    assert (await env.host.execute(Leave(TOKEN))).status == 404
    no_provider = await env.host.execute(SetTargetLanguage(TOKEN, "talk-a", "de"))
    assert no_provider.status == 404  # no room: nothing to translate
    await env.host.execute(Transcribe(TOKEN, "talk-a"))
    no_provider = await env.host.execute(SetTargetLanguage(TOKEN, "talk-a", "de"))
    assert no_provider.status == 550 and "translation" in no_provider.body["error"]
    env.links.fail = True
    refused = await env.host.execute(Transcribe("other-room", "talk-a"))
    assert refused.status == 503 and "signaling server" in refused.body["error"]
    assert env.node.ended == [("other-room", True)]  # a room that never joined frees its lease


async def test_a_room_taken_over_is_reopened_with_its_targets_and_language(env: Env) -> None:
    record = RoomRecord(TOKEN, "fr", frozenset({"talk-a", "talk-b"}))
    assert await env.host.resume(record)
    room = env.manager.room(TOKEN)
    assert room is not None and room.language == "fr"
    await until(lambda: room.targets == record.targets)
    assert env.node.records[-1] == record
    # captions reach the restored viewers as soon as the HPB maps their sessions
    link = env.links.links[TOKEN]
    await link.emit(ports.SessionMap(added={"talk-a": "hpb-a", "talk-b": "hpb-b"}))
    await until(lambda: room.resolved_targets == {"hpb-a", "hpb-b"})


async def test_a_room_that_cannot_be_reopened_says_so(env: Env) -> None:
    env.links.fail = True
    assert not await env.host.resume(RoomRecord(TOKEN, "en", frozenset({"talk-a"})))
    await until(lambda: not env.host.has_room(TOKEN))
    env.links.fail = False
    for index in range(2):  # the room cap
        await env.host.execute(Transcribe(f"room{index}", "talk-a"))
    assert not env.host.load().accepting
    assert not await env.host.resume(RoomRecord(TOKEN, "en", frozenset({"talk-a"})))


async def test_a_lost_lease_stops_the_room_and_shutdown_leaves_leases_to_expire(env: Env) -> None:
    await env.host.execute(Transcribe(TOKEN, "talk-a"))
    await env.host.execute(Transcribe("second", "talk-a"))
    env.host.lost(TOKEN, "taken by another replica")
    await until(lambda: not env.host.has_room(TOKEN))
    env.manager.stop_accepting()
    await env.manager.__aexit__(None, None, None)
    assert sorted(env.node.ended) == sorted([(TOKEN, True), ("second", False)])
    await env.manager.__aenter__()  # the fixture leaves it again


async def test_a_room_closing_while_a_command_reopens_it_keeps_its_lease(env: Env) -> None:
    await env.host.execute(Transcribe(TOKEN, "talk-a"))
    first = env.manager.room(TOKEN)
    env.manager.stop_room(TOKEN, "no-targets")  # as when it lingered out
    # the command waits for the closing room, then opens it again under the same lease
    reply = await env.host.execute(Transcribe(TOKEN, "talk-b"))
    assert reply.status == 200
    second = env.manager.room(TOKEN)
    assert second is not None and second is not first
    assert first is not None and first.task is not None and first.task.done()
    assert env.node.ended == []  # the first room's end came while the command ran: no release
