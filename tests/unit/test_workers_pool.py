"""The supervisor's pool with workers in this process: each worker is the real
``run_worker`` (its ``WorkerServer`` and a Manager on fake HPB links), and
the channel a real Unix socket pair. Placement, stickiness, caps, a killed
worker's rooms re-opened elsewhere, bounded requests, the restart backoff on
a manual clock, the drain, and the records a cluster node would be told."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import REGISTRY

from live_transcription.clock import ManualClock
from live_transcription.cluster.codec import Leave, Reply, RoomRecord, SetLanguage, Transcribe
from live_transcription.rooms import ports
from live_transcription.workers.policy import RestartBackoff
from live_transcription.workers.pool import READY, RESTARTING, WorkerPool
from tests.waiting import until
from tests.workers_support import FakeWorker, InProcessLauncher, settings_for


@dataclass
class Pool:
    pool: WorkerPool
    launcher: InProcessLauncher
    clock: ManualClock
    node: FakeNode

    def worker_of(self, room: str) -> FakeWorker:
        [owner] = [w for w in self.launcher.started if w.running and w.manager.room(room)]
        return owner


@dataclass
class FakeNode:
    records: list[RoomRecord] = field(default_factory=list)
    ended: list[tuple[str, bool]] = field(default_factory=list)

    def record_changed(self, record: RoomRecord) -> None:
        self.records.append(record)

    def room_ended(self, room: str, *, release: bool = True) -> None:
        self.ended.append((room, release))


@contextlib.asynccontextmanager
async def running_pool(
    *, workers: int = 2, hang: bool = False, pool_args: dict[str, Any] | None = None, **env: Any
) -> AsyncIterator[Pool]:
    settings = settings_for(LT_WORKERS=workers, **env)
    clock = ManualClock()
    async with asyncio.TaskGroup() as tasks:
        launcher = InProcessLauncher(tasks, settings, hang=hang)
        pool = WorkerPool(
            settings,
            launcher,
            clock=clock,
            backoff=lambda: RestartBackoff(first=0.5, cap=4.0),
            **(pool_args or {}),
        )
        node = FakeNode()
        pool.node = node
        async with pool:
            yield Pool(pool, launcher, clock, node)


def transcribe(room: str, session: str, language: str | None = None) -> Transcribe:
    return Transcribe(room, session, True, language)


def metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_new_rooms_spread_over_the_workers_and_stay_where_they_are() -> None:
    async with running_pool() as env:
        for token in [f"room{index}" for index in range(4)]:
            assert (await env.pool.execute(transcribe(token, f"talk-{token}", "fr"))).status == 200
        managers = [env.launcher.current(index).manager for index in range(2)]
        assert sorted(m.room_count for m in managers) == [2, 2]
        # Talk's next commands for a room reach the worker that runs it
        owner = env.worker_of("room0")
        assert (await env.pool.execute(transcribe("room0", "talk-second"))).status == 200
        assert (await env.pool.execute(SetLanguage("room0", "en"))).status == 200
        room = owner.manager.room("room0")
        assert room is not None
        await until(lambda: room.targets == {"talk-room0", "talk-second"} and room.language == "en")
        assert sum(m.room_count for m in managers) == 4
        # the record the supervisor keeps (and a cluster node hears of)
        await until(lambda: env.pool.record("room0") == RoomRecord("room0", "en", frozenset(room.targets)))
        assert env.node.records[-1] == RoomRecord("room0", "en", frozenset({"talk-room0", "talk-second"}))
        # a command for a room nobody runs is answered as a single process would
        reply = await env.pool.execute(Leave("nowhere"))
        assert reply == Reply(404, {"error": "no active transcription in this room"})
        # leave: the room ends on its worker, the supervisor forgets it, the node is told
        assert (await env.pool.execute(Leave("room0"))).status == 200
        await until(lambda: not env.pool.has_room("room0"))
        assert ("room0", True) in env.node.ended


async def test_placement_is_by_speakers_and_a_full_worker_is_never_chosen() -> None:
    # caps shared: 3 rooms over 2 workers is 2 + 1
    async with running_pool(LT_MAX_ROOMS=3) as env:
        assert [w.max_rooms for w in env.pool.workers] == [2, 1]
        assert (await env.pool.execute(transcribe("busy", "talk-a"))).status == 200
        busy = env.worker_of("busy")
        link = busy.links.links["busy"]
        for speaker in ("s1", "s2"):
            await link.emit(ports.SpeakerJoined(speaker))
        await until(lambda: env.pool.workers[busy.index].speakers == 2)
        # the worker with speakers is not chosen while another has none
        assert (await env.pool.execute(transcribe("next", "talk-b"))).status == 200
        assert env.worker_of("next") is not busy
        # the other one is full (its share of the room cap is reached): the busy one takes the third
        third = "third"
        assert (await env.pool.execute(transcribe(third, "talk-c"))).status == 200
        assert env.pool.load().rooms == 3
        reply = await env.pool.execute(transcribe("fourth", "talk-d"))
        assert reply == Reply(503, {"error": "room cap of 3 reached"})


async def test_a_killed_worker_is_restarted_and_its_rooms_reopened_with_targets_and_language(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    restarts_before = metric("live_transcription_worker_restarts_total", {"worker": "0"}) + metric(
        "live_transcription_worker_restarts_total", {"worker": "1"}
    )
    async with running_pool() as env:
        for index in range(4):
            room = f"room{index}"
            assert (await env.pool.execute(transcribe(room, f"talk-{room}", "fr"))).status == 200
            assert (await env.pool.execute(transcribe(room, f"talk-{room}-2"))).status == 200
        victim = env.worker_of("room0")
        survivor_index = 1 - victim.index
        theirs = sorted(env.pool.rooms_of(victim.index))
        assert len(theirs) == 2
        for room in theirs:
            found = victim.manager.room(room)
            assert found is not None
            await until(lambda found=found: len(found.targets) == 2)  # type: ignore[misc]
        await until(lambda: all(len(env.pool.record(room).targets) == 2 for room in theirs))  # type: ignore[union-attr]

        env.pool.workers[victim.index].kill()

        # every room of the killed worker runs again, on a running worker, with its targets and language
        def reopened() -> bool:
            running = [w for w in env.launcher.started if w.running]
            return all(any(w.manager.room(room) for w in running) for room in theirs)

        await until(reopened)
        for room in theirs:
            owner = env.worker_of(room)
            found = owner.manager.room(room)
            assert found is not None
            await until(lambda found=found: len(found.targets) == 2)  # type: ignore[misc]
            assert found.targets == {f"talk-{room}", f"talk-{room}-2"}
            assert found.language == "fr"
        # the slot is started again
        await until(
            lambda: len(env.launcher.of(victim.index)) == 2 and env.pool.workers[victim.index].state == READY
        )
        assert env.pool.workers[victim.index].restarts == 1
        assert env.pool.workers[victim.index].last_exit == "killed by SIGKILL"
        restarts = metric("live_transcription_worker_restarts_total", {"worker": "0"}) + metric(
            "live_transcription_worker_restarts_total", {"worker": "1"}
        )
        assert restarts == restarts_before + 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "stopped" in r.getMessage()]
        assert any(
            f"worker {victim.index} " in r.getMessage() and all(room[:4] in r.getMessage() for room in theirs)
            for r in warnings
        ), [r.getMessage() for r in warnings]
        await until(lambda: env.pool.rooms_reopened == 2 and env.pool.rooms_reopening == 0)
        # the survivor's own rooms never moved
        survivor = env.launcher.current(survivor_index)
        assert {room for room in ("room0", "room1", "room2", "room3") if survivor.manager.room(room)} >= (
            {f"room{i}" for i in range(4)} - set(theirs)
        )


async def test_a_worker_crashing_at_start_waits_longer_each_time_on_the_clock() -> None:
    async with running_pool() as env:
        env.launcher.crash_at_start.add(1)
        env.pool.workers[1].kill()
        # the first restart is at once (it ran a while); the next wait 0.5 s, 1 s, ... on the clock
        await until(lambda: len(env.launcher.of(1)) == 2)
        await until(lambda: env.clock.sleepers == 1)
        assert env.pool.workers[1].state == RESTARTING
        assert len(env.launcher.of(1)) == 2
        await env.clock.advance(0.5)
        await until(lambda: len(env.launcher.of(1)) == 3)
        await until(lambda: env.clock.sleepers == 1)
        await env.clock.advance(0.9)
        assert len(env.launcher.of(1)) == 3  # 1 s this time
        env.launcher.crash_at_start.clear()
        await env.clock.advance(0.1)
        await until(lambda: env.pool.workers[1].state == READY)
        assert len(env.launcher.of(1)) == 4
        assert env.pool.workers[1].restarts == 3


async def test_requests_beyond_the_bound_get_503_at_once_and_the_drain_ends_the_rest() -> None:
    async with running_pool(workers=1, hang=True, pool_args={"max_pending": 2}) as env:
        refused_before = metric("live_transcription_worker_requests_refused_total", {"reason": "queue-full"})
        # joins the HPB never answers: the two commands in flight wait
        waiting = [asyncio.create_task(env.pool.execute(transcribe(f"r{i}", "talk-a"))) for i in range(2)]
        await until(lambda: len(env.pool.workers[0].pending) == 2)
        reply = await env.pool.execute(transcribe("r9", "talk-a"))
        assert reply.status == 503 and "requests waiting" in reply.body["error"]
        refused = metric("live_transcription_worker_requests_refused_total", {"reason": "queue-full"})
        assert refused == refused_before + 1
    # leaving the pool drained the worker: the joins were given up, the requests answered
    replies = await asyncio.gather(*waiting)
    assert {r.status for r in replies} == {503}
    assert env.launcher.current(0).why == ["drain"]


async def test_the_drain_leaves_every_call_and_leaves_the_leases_to_expire() -> None:
    async with running_pool() as env:
        for room in ("a1", "b2", "c3"):
            assert (await env.pool.execute(transcribe(room, f"talk-{room}"))).status == 200
        workers = [env.launcher.current(index) for index in range(2)]
        links = [link for worker in workers for link in worker.links.links.values()]
    assert all(link.closed.is_set() for link in links)
    assert [worker.why for worker in workers] == [["drain"], ["drain"]]
    # rooms closed by the shutdown are not over for their viewers: another replica takes them
    assert sorted(env.node.ended) == [("a1", False), ("b2", False), ("c3", False)]


async def test_as_the_room_host_of_a_cluster_node() -> None:
    async with running_pool() as env:
        record = RoomRecord("taken", "fr", frozenset({"talk-x", "talk-y"}))
        assert await env.pool.resume(record)
        owner = env.worker_of("taken")
        room = owner.manager.room("taken")
        assert room is not None
        await until(lambda: room.targets == {"talk-x", "talk-y"})
        assert room.language == "fr"
        assert env.pool.has_room("taken")
        load = env.pool.load()
        assert (load.rooms, load.capacity, load.accepting) == (1, 500, True)
        env.pool.lost("taken", "lease-lost")
        await until(lambda: not env.pool.has_room("taken"))
        assert ("taken", True) in env.node.ended
