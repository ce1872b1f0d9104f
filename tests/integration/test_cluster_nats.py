"""Replicas sharing rooms through a real nats-server (JetStream).

Each test starts a private `nats-server -js` (skipped loudly without it)
and two or three `ClusterNode`s with a fake room host each. Short TTLs keep
take-overs quick; every wait is on an event or a condition with a generous
deadline, never on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import nats
import pytest

from live_transcription.clock import ManualClock
from live_transcription.cluster import ClusterNode, ClusterOptions, ClusterUnavailable, HostLoad
from live_transcription.cluster.codec import (
    Command,
    Forwarded,
    LeaseValue,
    Leave,
    Reply,
    RoomRecord,
    SetLanguage,
    Transcribe,
    encode_lease,
    parse_reply,
)
from live_transcription.cluster.forwarding import (
    CommandServer,
    FailureKind,
    ForwardFailure,
    command_subject,
    forward,
)
from live_transcription.cluster.store import LeaseStore, Released, open_bucket
from live_transcription.sim.janus_process import free_tcp_port
from live_transcription.sim.nats_process import NatsServerProcess
from tests.nats_support import nats_server_fixture  # noqa: F401

pytestmark = pytest.mark.nats

DEADLINE = 60.0
_ids = itertools.count(1)


def fast_options(url: str, name: str, **overrides: float) -> ClusterOptions:
    """Seconds-scale leases so a take-over happens within a test."""
    values: dict[str, object] = {
        "url": url,
        "replica_id": f"{name}-{next(_ids)}",
        "lease_ttl": 3.0,
        "lease_margin": 1.0,
        "renew_every": 1.0,
        "renew_retry": 0.5,
        "scan_every": 0.5,
        "takeover_grace": 1.5,
        "registry_ttl": 3.0,
        "publish_every": 1.0,
        "forward_timeout": 20.0,
    }
    values.update(overrides)
    return ClusterOptions(**values)  # type: ignore[arg-type]


class Changes:
    """One event every fake host sets on a change: tests wait on it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def until(self, condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
        try:
            async with asyncio.timeout(deadline):
                while not condition():
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            raise AssertionError(f"not reached within {deadline:.0f} s: {what}") from None


class FakeHost:
    """The rooms of one replica, as records: what a room manager keeps."""

    def __init__(self, name: str, changes: Changes, capacity: int | None = None) -> None:
        self.name = name
        self.capacity = capacity
        self.opens_rooms = True
        self.changes = changes
        self.node: ClusterNode | None = None
        self.rooms: dict[str, RoomRecord] = {}
        self.executed: list[Command] = []
        self.resumed: list[RoomRecord] = []
        self.lost_rooms: list[str] = []

    def load(self) -> HostLoad:
        speakers = sum(len(r.targets) for r in self.rooms.values())
        return HostLoad(speakers=speakers, rooms=len(self.rooms), capacity=self.capacity)

    def has_room(self, room: str) -> bool:
        return room in self.rooms

    async def execute(self, command: Command) -> Reply:
        self.executed.append(command)
        assert self.node is not None
        room = self.rooms.get(command.room)
        try:
            match command:
                case Transcribe(enable=True):
                    base = room or RoomRecord(command.room, command.language or "en")
                    language = command.language or base.language
                    self._set(RoomRecord(command.room, language, base.targets | {command.session}))
                    return Reply(200, {"message": "transcription enabled", "replica": self.name})
                case Transcribe(enable=False):
                    if room is None:
                        return Reply(200, {"message": "transcription was not enabled"})
                    self._set(dataclasses.replace(room, targets=room.targets - {command.session}))
                    return Reply(200, {"message": "transcription disabled", "replica": self.name})
                case SetLanguage():
                    if room is None:
                        return Reply.error(404, "no active transcription in this room")
                    self._set(dataclasses.replace(room, language=command.language))
                    return Reply(
                        200, {"message": f"language set to {command.language}", "replica": self.name}
                    )
                case Leave():
                    if room is None:
                        return Reply.error(404, "no active transcription in this room")
                    del self.rooms[command.room]
                    await self.node.room_closed(command.room)
                    return Reply(200, {"message": "leaving the call", "replica": self.name})
            raise AssertionError(f"unexpected command {command!r}")
        finally:
            self.changes.notify()

    def _set(self, record: RoomRecord) -> None:
        assert self.node is not None
        self.rooms[record.room] = record
        self.node.record_changed(record)

    async def resume(self, record: RoomRecord) -> bool:
        self.resumed.append(record)
        if not self.opens_rooms:
            self.changes.notify()
            return False
        self.rooms[record.room] = record
        self.changes.notify()
        return True

    def lost(self, room: str, reason: str) -> None:
        self.rooms.pop(room, None)
        self.lost_rooms.append(room)
        self.changes.notify()


@dataclasses.dataclass
class Replica:
    host: FakeHost
    node: ClusterNode

    async def submit(self, command: Command) -> Reply:
        return await self.node.submit(command)


@contextlib.asynccontextmanager
async def replicas(
    server: NatsServerProcess,
    changes: Changes,
    count: int,
    **overrides: float,
) -> AsyncIterator[list[Replica]]:
    async with contextlib.AsyncExitStack() as stack:
        started: list[Replica] = []
        for index in range(count):
            name = "abc"[index]
            host = FakeHost(name, changes)
            node = ClusterNode(host, fast_options(server.url, name, **overrides))
            host.node = node
            await stack.enter_async_context(node)
            started.append(Replica(host, node))
        yield started


@contextlib.asynccontextmanager
async def lease_store(server: NatsServerProcess, ttl: float = 3.0) -> AsyncIterator[LeaseStore]:
    """A second view of the lease bucket, as another replica would have."""
    nc = await nats.connect(server.url)
    try:
        bucket = await open_bucket(nc.jetstream(), ClusterOptions().lease_bucket, ttl)
        yield LeaseStore(bucket, timeout=5.0)
    finally:
        await nc.close()


def owners_of(room: str, group: list[Replica]) -> list[str]:
    return [r.host.name for r in group if r.host.has_room(room)]


async def poll(condition: Callable[[], Awaitable[bool]], what: str, deadline: float = DEADLINE) -> None:
    """For state only the server holds (a lease expiring): ask again, briefly apart."""
    try:
        async with asyncio.timeout(deadline):
            # nothing announces an expiry (the server keeps no trace of it): ask again
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not reached within {deadline:.0f} s: {what}") from None


# --- leases -----------------------------------------------------------------------------------------------


async def test_racing_acquires_give_each_room_exactly_one_owner(nats_server: NatsServerProcess) -> None:
    async with lease_store(nats_server) as first, lease_store(nats_server) as second:
        for index in range(10):
            room = f"race{index}"
            results = await asyncio.gather(
                first.acquire(LeaseValue("one", RoomRecord(room))),
                second.acquire(LeaseValue("two", RoomRecord(room))),
            )
            winners = [lease for lease in results if lease is not None]
            assert len(winners) == 1, results
            held = await first.read(room)
            assert held is not None and held.value.owner == winners[0].value.owner
        # renew needs the last revision: a stale one is refused
        lease = await first.acquire(LeaseValue("one", RoomRecord("renewed")))
        assert lease is not None
        renewed = await first.renew(lease)
        with pytest.raises(Exception, match="taken or expired"):
            await second.renew(lease)
        assert not await second.release(lease)  # stale revision: not ours to delete
        assert await first.release(renewed)
        assert await first.read("renewed") is None
        assert await first.state("renewed") == Released("renewed")
        # a released room (its key holds a delete marker) is raced for the same way
        results = await asyncio.gather(
            first.acquire(LeaseValue("one", RoomRecord("renewed"))),
            second.acquire(LeaseValue("two", RoomRecord("renewed"))),
        )
        assert len([lease for lease in results if lease is not None]) == 1, results


async def test_concurrent_first_requests_at_every_replica_end_with_one_owner(
    nats_server: NatsServerProcess,
) -> None:
    changes = Changes()
    async with replicas(nats_server, changes, 3) as group:
        rooms = [f"room{i}" for i in range(6)]
        replies = await asyncio.gather(
            *(
                replica.submit(Transcribe(room, f"{room}-viewer-{replica.host.name}", language="de"))
                for room in rooms
                for replica in group
            )
        )
        assert [reply for reply in replies if reply.status != 200] == []
        for room in rooms:
            (owner,) = owners_of(room, group)
            record = next(r.host.rooms[room] for r in group if r.host.name == owner)
            assert record.targets == {f"{room}-viewer-{name}" for name in "abc"}
            assert record.language == "de"
            holders = [r.host.name for r in group if room in r.node.owned_rooms]
            assert holders == [owner]


# --- forwarding -------------------------------------------------------------------------------------------


async def test_commands_reach_the_owner_and_leave_frees_the_room_at_once(
    nats_server: NatsServerProcess,
) -> None:
    changes = Changes()
    async with replicas(nats_server, changes, 2) as group, lease_store(nats_server) as store:
        first = await group[0].submit(Transcribe("meeting", "alice", language="en"))
        assert first.status == 200
        (owner_name,) = owners_of("meeting", group)
        owner = next(r for r in group if r.host.name == owner_name)
        other = next(r for r in group if r is not owner)

        reply = await other.submit(SetLanguage("meeting", "fr"))
        assert reply == Reply(200, {"message": "language set to fr", "replica": owner_name})
        reply = await other.submit(Transcribe("meeting", "bob"))
        assert reply.status == 200 and reply.body["replica"] == owner_name
        assert owner.host.rooms["meeting"] == RoomRecord("meeting", "fr", frozenset({"alice", "bob"}))
        assert other.host.executed == []  # everything ran on the owner
        # the lease carries the room's record for a take-over
        await poll(
            lambda: _lease_record_is(store, RoomRecord("meeting", "fr", frozenset({"alice", "bob"}))),
            "the lease carries the latest record",
        )
        # an owner's error answer comes back as it is
        missing = await other.submit(SetLanguage("nowhere", "fr"))
        assert missing.status == 404

        reply = await other.submit(Leave("meeting"))
        assert reply.status == 200 and reply.body["replica"] == owner_name
        assert owners_of("meeting", group) == []
        # released, not left to expire: another replica can take the room now
        assert await store.state("meeting") == Released("meeting")
        assert await store.acquire(LeaseValue("someone-else", RoomRecord("meeting"))) is not None


async def _lease_record_is(store: LeaseStore, record: RoomRecord) -> bool:
    lease = await store.read(record.room)
    return lease is not None and lease.value.record == record


async def _leases_carry(store: LeaseStore, records: Iterable[RoomRecord]) -> bool:
    for record in records:
        if not await _lease_record_is(store, record):
            return False
    return True


async def test_a_request_for_an_unreachable_owner_whose_lease_lives_gets_503(
    nats_server: NatsServerProcess,
) -> None:
    changes = Changes()
    # a long TTL: the stopped owner's lease certainly outlives the test
    slow = {
        "lease_ttl": 60.0,
        "lease_margin": 5.0,
        "renew_every": 10.0,
        "scan_every": 10.0,
        "takeover_grace": 20.0,
    }
    async with replicas(nats_server, changes, 2, **slow) as group:
        await group[0].submit(Transcribe("meeting", "alice"))
        (owner_name,) = owners_of("meeting", group)
        owner = next(r for r in group if r.host.name == owner_name)
        other = next(r for r in group if r is not owner)
        await owner.node.nats.close()  # the owner vanishes from the network
        reply = await other.submit(SetLanguage("meeting", "fr"))
        assert reply.status == 503
        assert "unreachable" in reply.body["error"]
        assert other.host.executed == []


# --- take-over --------------------------------------------------------------------------------------------


async def test_a_stopped_replicas_rooms_are_taken_over_with_targets_and_language(
    nats_server: NatsServerProcess,
) -> None:
    changes = Changes()
    async with replicas(nats_server, changes, 3) as group, lease_store(nats_server) as store:
        records = {
            f"room{i}": RoomRecord(f"room{i}", language, frozenset({f"v{i}a", f"v{i}b"}))
            for i, language in enumerate(["de", "fr", "en", "it", "es", "nl"])
        }
        for index, record in enumerate(records.values()):
            entry = group[index % 3]
            for session in sorted(record.targets):
                reply = await entry.submit(Transcribe(record.room, session, language=record.language))
                assert reply.status == 200, reply
        # a record change reaches the lease a moment after the change: what a
        # replica stopped before that moment loses is not what this test is about
        await poll(lambda: _leases_carry(store, records.values()), "the leases carry the records")
        # stop the replica with the most rooms: it stops renewing and leaves the network
        victim = max(group, key=lambda r: len(r.host.rooms))
        victim_rooms = set(victim.host.rooms)
        assert victim_rooms
        survivors = [r for r in group if r is not victim]
        await victim.node.nats.close()

        def taken_over() -> bool:
            return all(
                len(owners_of(room, survivors)) == 1
                and next(r.host.rooms[room] for r in survivors if r.host.has_room(room)) == records[room]
                for room in records
            )

        await changes.until(taken_over, "every room lives on a surviving replica with its record")
        # the stopped replica was told it lost its rooms (it stops them)
        await changes.until(lambda: set(victim.host.lost_rooms) == victim_rooms, "the old owner gave up")
        assert victim.host.rooms == {}
        resumed = {rec.room for r in survivors for rec in r.host.resumed}
        assert resumed == victim_rooms
        # Talk's next command for a taken-over room reaches its new owner from anywhere
        room = sorted(victim_rooms)[0]
        for entry in survivors:
            reply = await entry.submit(SetLanguage(room, "pt"))
            assert reply.status == 200, reply
        (new_owner,) = owners_of(room, survivors)
        assert next(r for r in survivors if r.host.name == new_owner).host.rooms[room].language == "pt"


async def test_a_request_after_the_owners_lease_expired_takes_the_room_over(
    nats_server: NatsServerProcess,
) -> None:
    changes = Changes()
    owner_host, survivor_host = FakeHost("a", changes), FakeHost("b", changes)
    owner = ClusterNode(owner_host, fast_options(nats_server.url, "a", capacity=100))
    # the survivor's clock never moves: no scan of its own takes the room over,
    # so only the request below can
    survivor = ClusterNode(survivor_host, fast_options(nats_server.url, "b", capacity=0), clock=ManualClock())
    owner_host.node, survivor_host.node = owner, survivor
    async with owner, survivor, lease_store(nats_server) as store:
        reply = await survivor.submit(Transcribe("meeting", "alice", language="de"))
        assert reply.status == 200 and reply.body["replica"] == "a"  # b is full
        alice = RoomRecord("meeting", "de", frozenset({"alice"}))
        await poll(lambda: _lease_record_is(store, alice), "the lease carries the record")
        await survivor.scan_once()  # the survivor has seen the room leased
        await owner.nats.close()
        await poll(lambda: _lease_gone(store, "meeting"), "the stopped owner's lease expired")
        reply = await survivor.submit(SetLanguage("meeting", "fr"))
        assert reply.status == 200 and reply.body["replica"] == "b", reply
        assert survivor_host.resumed == [alice]
        assert survivor_host.rooms["meeting"] == RoomRecord("meeting", "fr", frozenset({"alice"}))
        assert survivor.takeovers == 1
        await changes.until(lambda: owner_host.lost_rooms == ["meeting"], "the old owner gave the room up")


async def _lease_gone(store: LeaseStore, room: str) -> bool:
    return await store.read(room) is None


# --- placement, serving, start ----------------------------------------------------------------------------


async def test_new_rooms_go_to_the_least_loaded_replica_never_to_a_full_one(
    nats_server: NatsServerProcess,
) -> None:
    changes = Changes()
    full_host, open_host = FakeHost("a", changes, capacity=0), FakeHost("b", changes)
    # the registry's keys must not expire between two publications even on a
    # loaded machine: this test is about placement, not about a replica vanishing
    slow_registry = {"registry_ttl": 60.0}
    full = ClusterNode(full_host, fast_options(nats_server.url, "a", **slow_registry))
    spare = ClusterNode(open_host, fast_options(nats_server.url, "b", capacity=100, **slow_registry))
    full_host.node, open_host.node = full, spare
    async with full:
        async with spare:
            # the registry is keyed by replica id ("b-<n>"), not by the host's name
            assert set(await full.replicas()) == {full.replica_id, spare.replica_id}
            for index in range(4):
                reply = await full.submit(Transcribe(f"room{index}", "viewer"))
                assert reply.status == 200 and reply.body["replica"] == "b", reply
            assert full_host.rooms == {} and full_host.executed == []
            assert set(open_host.rooms) == {f"room{i}" for i in range(4)}
        # once every replica is full, Talk hears so
        reply = await full.submit(Transcribe("room9", "viewer"))
        assert reply.status == 503 and "capacity" in reply.body["error"]


async def test_forwarded_commands_malformed_or_beyond_the_inflight_cap_are_answered(
    nats_server: NatsServerProcess,
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow_handler(forwarded: Forwarded) -> Reply:
        started.set()
        await release.wait()
        return Reply(200, {"message": "done"})

    nc = await nats.connect(nats_server.url)
    try:
        server = CommandServer(nc, command_subject("lt", "owner"), slow_handler, max_inflight=1)
        async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as tasks:
            serving = tasks.create_task(server.run())
            await server.ready.wait()
            subject = command_subject("lt", "owner")
            bad = await nc.request(subject, b'{"v": 1, "op": "dance"}', timeout=DEADLINE)
            parsed = parse_reply(bad.data)
            assert isinstance(parsed, Reply) and parsed.status == 400
            assert "unknown" in parsed.body["error"]
            first = tasks.create_task(forward(nc, subject, Forwarded(Leave("r")), deadline=DEADLINE))
            await started.wait()
            busy = await forward(nc, subject, Forwarded(Leave("r")), deadline=DEADLINE)
            assert busy == Reply.error(503, "replica busy; retry")
            release.set()
            assert await first == Reply(200, {"message": "done"})
            assert (server.rejected_malformed, server.rejected_busy, server.served) == (1, 1, 1)
            nobody = await forward(
                nc, command_subject("lt", "gone"), Forwarded(Leave("r")), deadline=DEADLINE
            )
            assert isinstance(nobody, ForwardFailure) and nobody.kind is FailureKind.NO_RESPONDERS
            serving.cancel()
    finally:
        await nc.close()


async def test_an_existing_bucket_keeps_its_ttl(nats_server: NatsServerProcess) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        first = await open_bucket(js, "leases", 3.0)
        again = await open_bucket(js, "leases", 3.0)  # replicas starting together: same bucket
        other = await open_bucket(js, "leases", 9.0)  # a replica configured otherwise follows the bucket
        assert (first.ttl, again.ttl, other.ttl) == (3.0, 3.0, 3.0)
    finally:
        await nc.close()


async def test_no_nats_server_at_start_is_a_clear_error() -> None:
    host = FakeHost("a", Changes())
    options = fast_options(f"nats://user:secret@127.0.0.1:{free_tcp_port()}", "a", connect_deadline=2.0)
    with pytest.raises(ClusterUnavailable, match="cannot reach NATS") as caught:
        async with ClusterNode(host, options):
            pass
    assert "secret" not in str(caught.value)


async def test_an_owner_whose_lease_another_wrote_stops_its_room(nats_server: NatsServerProcess) -> None:
    changes = Changes()
    async with replicas(nats_server, changes, 1) as (owner,), lease_store(nats_server) as store:
        await owner.submit(Transcribe("meeting", "alice"))
        assert owner.host.has_room("meeting")
        # another writer overwrites the key (as a replica that wrongly thought the lease expired)
        nc = await nats.connect(nats_server.url)
        try:
            kv = await nc.jetstream().key_value(ClusterOptions().lease_bucket)
            await kv.put("meeting", encode_lease(LeaseValue("intruder", RoomRecord("meeting"))))
        finally:
            await nc.close()
        await changes.until(lambda: owner.host.lost_rooms == ["meeting"], "the owner stopped the room")
        assert owner.node.owned_rooms == frozenset()
        held = await store.read("meeting")
        assert held is not None and held.value.owner == "intruder"  # not released by the old owner


async def _full_everywhere(group: list[Replica], full: Replica) -> bool:
    for replica in group:
        load = (await replica.node.replicas()).get(full.node.replica_id)
        if load is None or not load.full:
            return False
    return True


async def test_shutdown_releases_leases_and_leaves_the_registry(nats_server: NatsServerProcess) -> None:
    changes = Changes()
    async with replicas(nats_server, changes, 1, capacity=0) as (watcher,), lease_store(nats_server) as store:
        host = FakeHost("b", changes)
        leaving = ClusterNode(host, fast_options(nats_server.url, "b"))
        host.node = leaving
        async with leaving:
            await leaving.submit(Transcribe("meeting", "alice"))
            assert host.has_room("meeting")
            assert leaving.replica_id in await watcher.node.replicas()
        # the host's room would close before the node exits; the node releases what is left
        assert await store.state("meeting") == Released("meeting")
        assert leaving.replica_id not in await watcher.node.replicas()


async def test_a_room_one_replica_cannot_reopen_is_taken_over_by_another(
    nats_server: NatsServerProcess,
) -> None:
    changes = Changes()
    async with replicas(nats_server, changes, 3) as group, lease_store(nats_server) as store:
        spare = group[2]
        spare.host.capacity = 0  # full: placement chooses the other survivor first
        await poll(lambda: _full_everywhere(group, spare), "every replica knows the spare is full")
        record = RoomRecord("meeting", "de", frozenset({"alice", "bob"}))
        for session in sorted(record.targets):
            assert (await group[0].submit(Transcribe("meeting", session, language="de"))).status == 200
        (owner_name,) = owners_of("meeting", group)
        owner = next(r for r in group if r.host.name == owner_name)
        failing = next(r for r in group[:2] if r is not owner)
        failing.host.opens_rooms = False  # e.g. it cannot reach the HPB
        await poll(lambda: _lease_record_is(store, record), "the lease carries the record")
        await owner.node.nats.close()
        await changes.until(
            lambda: spare.host.rooms.get("meeting") == record, "the spare replica has the room"
        )
        # placement chose the failing replica first (unless the spare's grace ran out
        # first); having failed, it left the lease to expire and the room to the spare
        assert failing.host.rooms == {}
        assert all(resumed == record for resumed in failing.host.resumed)
