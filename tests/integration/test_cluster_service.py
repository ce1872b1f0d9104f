"""Replicas of the whole service sharing calls through a real nats-server.

Each replica is ``running_service`` with ``LT_NATS_URL`` (short leases through
``ClusterOptions``) and its own Talk API (the ExApp's routes over ASGI); all
of them join calls on one HPB emulator, whose participants publish looping
tones through a direct WebRTC bridge and whose viewers are real signaling
clients. Talk's requests go to whichever replica; captions are read where
the viewer reads them. Every wait is on an event or a condition with a
generous deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import nats as nats_client
import pytest

from live_transcription.api.app import Runtime, create_app
from live_transcription.cluster import ClusterNode, ClusterOptions, RoomRecord
from live_transcription.cluster.store import LeaseStore, open_bucket
from live_transcription.config import load_settings
from live_transcription.rooms.manager import Manager
from live_transcription.rooms.room import Room
from live_transcription.service import running_service
from live_transcription.sim.client import SimClient
from live_transcription.sim.direct_bridge import DirectBridge
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.sim.nats_process import NatsServerProcess
from tests.integration.test_faults_support import BACKEND, no_ice_servers, talking_wav
from tests.nats_support import nats_server_fixture, skip_unless_nats_server  # noqa: F401
from tests.serve_process import free_port, start_serve, wait_serving
from tests.viewers import captions, finals_since

pytestmark = pytest.mark.nats

DEADLINE = 60.0
APP_SECRET = "cluster-app-secret"
_ids = itertools.count(1)


def auth() -> dict[str, str]:
    token = base64.b64encode(f"admin:{APP_SECRET}".encode()).decode()
    return {
        "EX-APP-ID": "live_transcription",
        "EX-APP-VERSION": "0.1.0",
        "AA-VERSION": "3.0.0",
        "AUTHORIZATION-APP-API": token,
    }


def fast_options(url: str, name: str) -> ClusterOptions:
    """3 s leases (renewed every second, scanned every 0.6 s) so a take-over
    happens within a test; the registry keeps a replica's load long enough
    that a loaded machine does not make a live replica look gone."""
    options = ClusterOptions.scaled(url=url, lease_ttl=3.0, replica_id=f"{name}-{next(_ids)}")
    return dataclasses.replace(options, registry_ttl=30.0)


@dataclasses.dataclass
class Replica:
    name: str
    runtime: Runtime
    client: httpx.AsyncClient
    stack: contextlib.AsyncExitStack

    @property
    def node(self) -> ClusterNode:
        assert self.runtime.cluster is not None
        return self.runtime.cluster

    @property
    def manager(self) -> Manager:
        return self.runtime.manager

    def has_room(self, room: str) -> bool:
        return self.manager.room(room) is not None

    async def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post(path, json=body, headers=auth())

    async def transcribe(self, room: str, session: str, language: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"roomToken": room, "ncSessionId": session, "enable": True}
        if language is not None:
            body["langId"] = language
        return await self.post("/api/v1/call/transcribe", body)

    async def healthz(self) -> dict[str, Any]:
        reply = await self.client.get("/healthz")
        body: dict[str, Any] = reply.json()
        return body

    async def stop(self) -> None:
        """Shut the replica down as SIGTERM does: its calls are left, its leases left to expire."""
        await self.stack.aclose()


@dataclasses.dataclass
class Cluster:
    hpb: HpbEmulator
    bridge: DirectBridge
    nats: NatsServerProcess
    tmp: Path
    stack: contextlib.AsyncExitStack
    replicas: list[Replica] = dataclasses.field(default_factory=list)

    async def start_replica(self, name: str) -> Replica:
        settings = load_settings(
            LT_HPB_URL=self.hpb.url,
            LT_INTERNAL_SECRET=SECRET,
            NEXTCLOUD_URL=BACKEND,
            LT_STT_ENGINE="instant",
            APP_SECRET=APP_SECRET,
            LT_NATS_URL=self.nats.url,
            LT_ROOM_LINGER_SECONDS=3600,
        )
        stack = contextlib.AsyncExitStack()
        await self.stack.enter_async_context(stack)  # stopped at the end if the test did not
        runtime = await stack.enter_async_context(
            running_service(
                settings, ice_servers=no_ice_servers, cluster_options=fast_options(self.nats.url, name)
            )
        )
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(runtime)),
                base_url="http://exapp",
                timeout=DEADLINE,
            )
        )
        replica = Replica(name, runtime, client, stack)
        self.replicas.append(replica)
        return replica

    async def add_call(self, room: str, speaker: str, freq: float) -> None:
        """A call whose one speaker talks in a loop (one utterance, one final, every 2 s)."""
        self.bridge.add_publisher(speaker, talking_wav(self.tmp / f"{speaker}.wav", freq), loop=True)
        await self.hpb.add_participant(
            room, session_id=speaker, nextcloud_session_id=f"talk-{speaker}", in_call=7, user_id=speaker
        )

    def owners(self, room: str, among: list[Replica] | None = None) -> list[Replica]:
        return [r for r in (among if among is not None else self.replicas) if r.has_room(room)]

    def our_sessions(self, room: str) -> list[str]:
        return self.hpb.sessions_in_room(room, internal=True)


SECRET = "cluster-internal-secret-" + secrets.token_hex(4)


@contextlib.asynccontextmanager
async def cluster_on(nats: NatsServerProcess, tmp: Path) -> AsyncIterator[Cluster]:
    bridge = DirectBridge()
    try:
        async with HpbEmulator(SECRET, BACKEND, bridge=bridge) as hpb, contextlib.AsyncExitStack() as stack:
            cluster = Cluster(hpb, bridge, nats, tmp, stack)
            try:
                yield cluster
            finally:
                # every replica stops at once: none takes over the calls another leaves
                for replica in cluster.replicas:
                    replica.manager.stop_accepting()
                    replica.node.stop_accepting()
    finally:
        await bridge.aclose()


async def until(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Replicas, NATS and the HPB change state in other tasks: look again shortly."""
    try:
        async with asyncio.timeout(deadline):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not reached within {deadline:.0f} s: {what}") from None


async def resumed_captions(
    viewer: SimClient, mark: int, speaker: str, *, language: str | None = None
) -> None:
    """Wait until a final caption of ``speaker`` (in ``language``) reaches ``viewer`` after ``mark``."""

    def arrived() -> bool:
        return any(
            language is None or data["langId"] == language for _, data in finals_since(viewer, mark, speaker)
        )

    await viewer.wait_for(arrived, deadline=DEADLINE)


async def until_leased(nats: NatsServerProcess, record: RoomRecord) -> None:
    """Until the room's lease carries ``record`` (read as another replica would)."""
    nc = await nats_client.connect(nats.url)
    try:
        bucket = await open_bucket(nc.jetstream(), ClusterOptions().lease_bucket, 3.0)
        store = LeaseStore(bucket, timeout=5.0)
        async with asyncio.timeout(DEADLINE):
            # the server announces nothing: ask again
            while (lease := await store.read(record.room)) is None or lease.value.record != record:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


async def until_targets(room: Room, targets: set[str]) -> None:
    """The room's loop applies targets after the request returns."""
    await until(lambda: room.targets == targets, f"the targets of {room.token} are {sorted(targets)}")


# --- forwarding -------------------------------------------------------------------------------------------


async def test_two_replicas_forward_talk_requests_to_the_rooms_owner(
    nats_server: NatsServerProcess, tmp_path: Path
) -> None:
    async with cluster_on(nats_server, tmp_path) as cluster:
        first = await cluster.start_replica("a")
        second = await cluster.start_replica("b")
        await cluster.add_call("meeting", "alice", 220)
        async with (
            SimClient(cluster.hpb.url, "meeting", "talk-viewer-1") as viewer_one,
            SimClient(cluster.hpb.url, "meeting", "talk-viewer-2") as viewer_two,
        ):
            reply = await first.transcribe("meeting", "talk-viewer-1", "en")
            assert reply.status_code == 200, reply.text
            [owner] = cluster.owners("meeting")
            other = second if owner is first else first
            forwards_before = other.node.forwarded

            # Talk's next requests reach the replica that does not run the call
            reply = await other.transcribe("meeting", "talk-viewer-2")
            assert reply.status_code == 200, reply.text
            reply = await other.post("/api/v1/call/set-language", {"roomToken": "meeting", "langId": "fr"})
            assert reply.status_code == 200, reply.text
            assert other.node.forwarded >= forwards_before + 2
            assert cluster.owners("meeting") == [owner]
            room = owner.manager.room("meeting")
            assert room is not None
            await until_targets(room, {"talk-viewer-1", "talk-viewer-2"})
            await until(lambda: room.language == "fr", "the language changed on the owner")
            assert len(cluster.our_sessions("meeting")) == 1  # one replica joined the call

            # the viewer added through the other replica gets captions, in the new language
            await resumed_captions(viewer_two, 0, "alice", language="fr")
            await resumed_captions(viewer_one, 0, "alice", language="fr")

            # an error answer comes back from the owner as it is
            reply = await other.post("/api/v1/call/set-language", {"roomToken": "meeting", "langId": "xx"})
            assert reply.status_code == 400 and "unsupported language" in reply.json()["error"], reply.text

            health_owner, health_other = await owner.healthz(), await other.healthz()
            assert health_owner["cluster"]["rooms_owned"] == 1
            assert health_other["cluster"]["rooms_owned"] == 0
            assert health_owner["cluster"]["nats"] == health_other["cluster"]["nats"] == "connected"

            # leave through the other replica: the call is left, the room is free at once
            reply = await other.post("/api/v1/call/leave", {"roomToken": "meeting"})
            assert reply.status_code == 200, reply.text
            await until(lambda: cluster.owners("meeting") == [], "the owner left the call")
            await until(lambda: owner.node.owned_rooms == frozenset(), "the lease was released")
            reply = await other.post("/api/v1/call/leave", {"roomToken": "meeting"})
            assert reply.status_code == 404


async def test_the_same_room_requested_at_two_replicas_at_once_has_one_owner(
    nats_server: NatsServerProcess, tmp_path: Path
) -> None:
    async with cluster_on(nats_server, tmp_path) as cluster:
        group = [await cluster.start_replica(name) for name in "abc"]
        rooms = [f"race{index}" for index in range(3)]
        for index, room in enumerate(rooms):
            await cluster.add_call(room, f"speaker{index}", 200 + 40 * index)
        replies = await asyncio.gather(
            *(
                replica.transcribe(room, f"talk-{room}-{replica.name}", "en")
                for room in rooms
                for replica in group
            )
        )
        assert [r.text for r in replies if r.status_code != 200] == []
        for room in rooms:
            [owner] = cluster.owners(room)
            found = owner.manager.room(room)
            assert found is not None
            await until_targets(found, {f"talk-{room}-{name}" for name in "abc"})
            assert [r.name for r in group if room in r.node.owned_rooms] == [owner.name]
            assert len(cluster.our_sessions(room)) == 1


# --- take-over --------------------------------------------------------------------------------------------


async def test_a_stopped_replicas_calls_are_taken_over_and_captions_resume(
    nats_server: NatsServerProcess, tmp_path: Path
) -> None:
    async with cluster_on(nats_server, tmp_path) as cluster:
        group = [await cluster.start_replica(name) for name in "abc"]
        rooms = {f"room{index}": f"speaker{index}" for index in range(4)}
        for index, (room, speaker) in enumerate(rooms.items()):
            await cluster.add_call(room, speaker, 200 + 40 * index)
        async with contextlib.AsyncExitStack() as viewers_stack:
            viewers: dict[str, SimClient] = {}
            for room in rooms:
                viewers[room] = await viewers_stack.enter_async_context(
                    SimClient(cluster.hpb.url, room, f"talk-{room}-viewer")
                )
            for index, room in enumerate(rooms):
                entry = group[index % len(group)]
                reply = await entry.transcribe(room, f"talk-{room}-viewer", "fr")
                assert reply.status_code == 200, reply.text
            for room, speaker in rooms.items():
                await resumed_captions(viewers[room], 0, speaker, language="fr")

            victim = max(group, key=lambda r: len(r.node.owned_rooms))
            victim_rooms = sorted(victim.node.owned_rooms)
            assert victim_rooms
            survivors = [r for r in group if r is not victim]
            takeovers_before = sum(r.node.takeovers for r in survivors)
            marks = {room: len(captions(viewers[room])) for room in victim_rooms}
            old_sessions = {room: cluster.our_sessions(room) for room in victim_rooms}

            await victim.stop()
            await until(
                lambda: all(cluster.our_sessions(room) == [] for room in victim_rooms),
                "the stopped replica left its calls (bye)",
            )

            def taken_over() -> bool:
                return all(len(cluster.owners(room, survivors)) == 1 for room in victim_rooms)

            await until(taken_over, "every call of the stopped replica runs on one survivor")
            assert sum(r.node.takeovers for r in survivors) - takeovers_before == len(victim_rooms)
            for room in victim_rooms:
                [owner] = cluster.owners(room, survivors)
                found = owner.manager.room(room)
                assert found is not None
                # Talk did nothing: the viewer and the language came from the lease
                assert found.language == "fr"
                viewer, speaker = viewers[room], rooms[room]
                await resumed_captions(viewer, marks[room], speaker)
                assert found.targets == {f"talk-{room}-viewer"}
                [new_session] = cluster.our_sessions(room)
                assert new_session not in old_sessions[room]
                resumed = finals_since(viewer, marks[room], speaker)
                assert {sender for sender, _ in resumed} == {new_session}
                assert {data["langId"] for _, data in resumed} == {"fr"}
            # the calls of the other replicas never moved
            for room in set(rooms) - set(victim_rooms):
                assert len(cluster.owners(room, survivors)) == 1


# --- NATS unreachable -------------------------------------------------------------------------------------


async def test_calls_keep_captioning_while_nats_is_down_and_are_reclaimed_after(tmp_path: Path) -> None:
    skip_unless_nats_server()
    async with NatsServerProcess() as nats, cluster_on(nats, tmp_path) as cluster:
        replica = await cluster.start_replica("a")
        await cluster.add_call("meeting", "alice", 260)
        async with SimClient(cluster.hpb.url, "meeting", "talk-viewer") as viewer:
            reply = await replica.transcribe("meeting", "talk-viewer", "en")
            assert reply.status_code == 200, reply.text
            await resumed_captions(viewer, 0, "alice")

            await nats.outage()
            await until(lambda: not replica.node.connected, "the replica noticed the outage")
            health = await replica.healthz()
            assert health["status"] == "degraded"
            assert health["cluster"]["nats"] == "disconnected"
            assert any("NATS unreachable" in reason for reason in health["reasons"])
            # past the lease's TTL the room still runs here, and Talk's commands for it still work
            await until(lambda: replica.node.unleased_rooms == {"meeting"}, "the lease ran out", DEADLINE)
            assert replica.node.disconnects >= 1
            mark = len(captions(viewer))
            reply = await replica.transcribe("meeting", "talk-viewer-2")
            assert reply.status_code == 200, reply.text
            await resumed_captions(viewer, mark, "alice")
            assert replica.has_room("meeting")

            await nats.recover()
            await until(lambda: replica.node.owned_rooms == {"meeting"}, "the room's lease was re-claimed")
            assert replica.node.unleased_rooms == frozenset()
            assert (await replica.healthz())["cluster"]["nats"] == "connected"
            mark = len(captions(viewer))
            await resumed_captions(viewer, mark, "alice")


# --- a replica killed -------------------------------------------------------------------------------------


async def test_a_killed_serve_process_has_its_call_taken_over(
    nats_server: NatsServerProcess, tmp_path: Path
) -> None:
    """``live-transcription serve`` with LT_NATS_URL from the environment, then
    SIGKILL: no bye, no release; the other replica takes the call over."""
    async with cluster_on(nats_server, tmp_path) as cluster:
        await cluster.add_call("meeting", "alice", 240)
        port = free_port()
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("LT_", "APP_", "MODAL_", "NEXTCLOUD"))
        }
        env |= {
            "APP_SECRET": APP_SECRET,
            "APP_PORT": str(port),
            "APP_HOST": "127.0.0.1",
            "NEXTCLOUD_URL": BACKEND,
            "LT_HPB_URL": cluster.hpb.url,
            "LT_INTERNAL_SECRET": SECRET,
            "LT_STT_ENGINE": "instant",
            "LT_NATS_URL": nats_server.url,
            "LT_REPLICA_ID": "doomed",
            "LT_CLUSTER_LEASE_TTL_SECONDS": "3",
        }
        log_path = tmp_path / "doomed.log"
        process = await start_serve(env, log_path)
        try:
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as doomed,
                SimClient(cluster.hpb.url, "meeting", "talk-viewer") as viewer,
            ):
                await wait_serving(doomed, process)
                # alone in the cluster, the serve process gets the call
                reply = await doomed.post(
                    "/api/v1/call/transcribe",
                    json={
                        "roomToken": "meeting",
                        "ncSessionId": "talk-viewer",
                        "enable": True,
                        "langId": "fr",
                    },
                    headers=auth(),
                )
                assert reply.status_code == 200, reply.text
                health = (await doomed.get("/healthz")).json()
                assert health["cluster"] == {
                    "replica": "doomed",
                    "nats": "connected",
                    "rooms_owned": 1,
                    "rooms_without_lease": 0,
                    "replicas": health["cluster"]["replicas"],
                }
                await resumed_captions(viewer, 0, "alice", language="fr")
                [old_session] = cluster.our_sessions("meeting")

                survivor = await cluster.start_replica("b")
                # a request at the new replica is forwarded to the serve process
                reply = await survivor.transcribe("meeting", "talk-viewer-2")
                assert reply.status_code == 200, reply.text
                assert not survivor.has_room("meeting")
                # the owner writes a changed record a moment after the change
                both = RoomRecord("meeting", "fr", frozenset({"talk-viewer", "talk-viewer-2"}))
                await until_leased(nats_server, both)

                process.kill()
                await process.wait()
                await until(lambda: survivor.has_room("meeting"), "the survivor took the call over")
                room = survivor.manager.room("meeting")
                assert room is not None and room.language == "fr"
                await until_targets(room, {"talk-viewer", "talk-viewer-2"})
                assert survivor.node.takeovers == 1
                mark = len(captions(viewer))
                await resumed_captions(viewer, mark, "alice", language="fr")
                new_sessions = set(cluster.our_sessions("meeting")) - {old_session}
                assert len(new_sessions) == 1
                assert {sender for sender, _ in finals_since(viewer, mark, "alice")} == new_sessions
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


# --- a replica with worker processes ----------------------------------------------------------------------


async def test_a_serve_process_with_workers_is_one_replica(
    nats_server: NatsServerProcess, tmp_path: Path
) -> None:
    """``serve --workers 2`` with LT_NATS_URL: the supervisor is the replica
    (it holds the leases, its load is its workers'), requests forwarded to it
    reach the worker running the call, a killed worker's call is re-joined on
    this replica with its lease kept, and a SIGTERM leaves the calls to the
    other replica, which takes them over."""
    async with cluster_on(nats_server, tmp_path) as cluster:
        calls = {"meeting": "alice", "standup": "bob"}
        for index, (room, speaker) in enumerate(calls.items()):
            await cluster.add_call(room, speaker, 240 + 60 * index)
        port = free_port()
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("LT_", "APP_", "MODAL_", "NEXTCLOUD"))
        }
        env |= {
            "APP_SECRET": APP_SECRET,
            "APP_PORT": str(port),
            "APP_HOST": "127.0.0.1",
            "NEXTCLOUD_URL": BACKEND,
            "LT_HPB_URL": cluster.hpb.url,
            "LT_INTERNAL_SECRET": SECRET,
            "LT_STT_ENGINE": "instant",
            "LT_NATS_URL": nats_server.url,
            "LT_REPLICA_ID": "workers",
            "LT_CLUSTER_LEASE_TTL_SECONDS": "3",
            "LT_ROOM_LINGER_SECONDS": "3600",
        }
        process = await start_serve(env, tmp_path / "workers.log", ["--workers", "2"])
        try:
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as supervised,
                contextlib.AsyncExitStack() as viewers_stack,
            ):
                await wait_serving(supervised, process)
                viewers: dict[str, SimClient] = {}
                for room in calls:
                    viewers[room] = await viewers_stack.enter_async_context(
                        SimClient(cluster.hpb.url, room, f"talk-{room}")
                    )
                    body = {"roomToken": room, "ncSessionId": f"talk-{room}", "enable": True, "langId": "fr"}
                    reply = await supervised.post("/api/v1/call/transcribe", json=body, headers=auth())
                    assert reply.status_code == 200, reply.text
                for room, speaker in calls.items():
                    await resumed_captions(viewers[room], 0, speaker, language="fr")
                health = (await supervised.get("/healthz")).json()
                assert health["cluster"]["replica"] == "workers" and health["cluster"]["rooms_owned"] == 2
                assert [p["rooms"] for p in health["workers"]["processes"]] == [1, 1]

                # another replica forwards Talk's request to the supervisor, which hands it to the worker
                other = await cluster.start_replica("b")
                reply = await other.transcribe("meeting", "talk-meeting-2")
                assert reply.status_code == 200, reply.text
                assert not other.has_room("meeting")
                both = RoomRecord("meeting", "fr", frozenset({"talk-meeting", "talk-meeting-2"}))
                await until_leased(nats_server, both)

                # a worker killed: its call is re-joined on this replica, which keeps the lease
                old = {room: cluster.our_sessions(room) for room in calls}
                marks = {room: len(captions(viewers[room])) for room in calls}
                victim = health["workers"]["processes"][0]["pid"]
                os.kill(victim, signal.SIGKILL)

                def moved() -> list[str]:
                    return [r for r in calls if cluster.our_sessions(r) not in ([], old[r])]

                await until(lambda: len(moved()) == 1, "the killed worker's call is joined again")
                for room, speaker in calls.items():
                    await resumed_captions(viewers[room], marks[room], speaker, language="fr")
                assert other.node.takeovers == 0 and not other.has_room(moved()[0])
                health = (await supervised.get("/healthz")).json()
                assert health["cluster"]["rooms_owned"] == 2
                if moved()[0] == "meeting":
                    await until_leased(nats_server, both)

                # SIGTERM: the calls are left with their leases, and the other replica takes them over
                marks = {room: len(captions(viewers[room])) for room in calls}
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(DEADLINE):
                    assert await process.wait() == 0
                await until(
                    lambda: all(other.has_room(room) for room in calls), "the other replica took over"
                )
                for room, speaker in calls.items():
                    await resumed_captions(viewers[room], marks[room], speaker, language="fr")
                room_found = other.manager.room("meeting")
                assert room_found is not None
                await until_targets(room_found, {"talk-meeting", "talk-meeting-2"})
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
