"""A worker as its supervisor sees it over the channel (a real socket pair,
fake HPB links): hello, each room's record before the answer that changed
it, status and metrics, the bound on requests, and the ways it stops
(drain, end of the channel, an unreadable frame)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from live_transcription.api.app import Runtime
from live_transcription.cluster.codec import RoomRecord, Transcribe
from live_transcription.config import Settings
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import Manager
from live_transcription.workers import protocol
from live_transcription.workers.channel import Channel
from live_transcription.workers.protocol import (
    Drain,
    Failed,
    Hello,
    Load,
    Message,
    MetricsRequest,
    MetricsText,
    ProtocolError,
    RoomChanged,
    RoomEnded,
    Run,
    RunDone,
    StatusReport,
    StatusRequest,
)
from live_transcription.workers.worker import WorkerServer, run_worker
from tests.fake_link import LinkFactory, SpeakerFactory
from tests.workers_support import LANGS, settings_for


@dataclass
class Supervisor:
    """The supervisor's end of the channel, read by the test."""

    channel: Channel
    inbox: asyncio.Queue[Message | ProtocolError]
    raw: asyncio.StreamWriter

    async def next(self, *kinds: type) -> Message | ProtocolError:
        """The next message of one of ``kinds`` (load reports in between are skipped unless asked for)."""
        async with asyncio.timeout(15):
            while True:
                message = await self.inbox.get()
                if isinstance(message, kinds):
                    return message
                assert isinstance(message, Load), message


def manager_for(links: LinkFactory) -> Manager:
    return Manager(
        link_factory=links,
        speaker_factory=SpeakerFactory(),
        languages=LANGS,
        admission=Admission(max_speakers=5, max_speakers_per_room=5),
        join_timeout=60,
        linger_seconds=3600,
    )


@contextlib.asynccontextmanager
async def worker(
    *, links: LinkFactory | None = None, server_args: dict[str, int] | None = None
) -> AsyncIterator[tuple[Supervisor, asyncio.Task[str]]]:
    settings = settings_for()
    links = links or LinkFactory()
    manager = manager_for(links)

    @contextlib.asynccontextmanager
    async def service(_: Settings) -> AsyncIterator[Runtime]:
        async with manager:
            yield Runtime(settings=settings, manager=manager, engine_name="fake")

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    their_reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
    channel = Channel(their_reader, their_writer)
    stop = asyncio.Event()

    async def run() -> str:
        if server_args is None:
            return await run_worker(settings, channel, stop=stop, service=service)
        async with service(settings) as runtime:
            return await WorkerServer(runtime, channel, **server_args).run(stop)  # type: ignore[arg-type]

    inbox: asyncio.Queue[Message | ProtocolError] = asyncio.Queue(maxsize=1000)
    supervisor_end = Channel(reader, writer)

    async def read() -> None:
        async for message in supervisor_end.messages():
            await inbox.put(message)

    async with asyncio.TaskGroup() as tasks:
        task = tasks.create_task(run())
        reading = tasks.create_task(read())
        try:
            yield Supervisor(supervisor_end, inbox, writer), task
        finally:
            stop.set()
            await asyncio.wait({task}, timeout=15)
            reading.cancel()
            supervisor_end.close()


async def test_hello_records_before_answers_status_metrics_and_the_drain() -> None:
    async with worker() as (supervisor, task):
        hello = await supervisor.next(Hello)
        assert isinstance(hello, Hello) and hello.engine == "fake"
        assert {lang.code for lang in hello.languages} == {"en", "fr"}

        supervisor.channel.send(Run(1, Transcribe("room1", "talk-a", True, "fr")))
        # the record reaches the supervisor before the answer of the command that changed it
        changed = await supervisor.next(RoomChanged, RunDone)
        assert changed == RoomChanged(RoomRecord("room1", "fr", frozenset({"talk-a"})))
        done = await supervisor.next(RunDone)
        assert isinstance(done, RunDone) and done.id == 1 and done.running
        assert done.reply.status == 200

        supervisor.channel.send(StatusRequest(2))
        report = await supervisor.next(StatusReport)
        assert isinstance(report, StatusReport)
        assert [room.token for room in report.status.rooms] == ["room1"]
        assert report.status.accepting

        supervisor.channel.send(MetricsRequest(3))
        metrics = await supervisor.next(MetricsText)
        assert isinstance(metrics, MetricsText) and b"live_transcription_rooms_opened_total" in metrics.text

        supervisor.channel.send(Drain())
        # the call is left on the way out, and is not over for its viewers
        assert await supervisor.next(RoomEnded) == RoomEnded("room1", release=False)
        assert await task == "drain"


async def test_requests_past_the_bound_are_refused_at_once() -> None:
    async with worker(links=LinkFactory(hang=True), server_args={"max_inflight": 1}) as (supervisor, task):
        await supervisor.next(Hello)
        supervisor.channel.send(Run(1, Transcribe("room1", "talk-a")))  # its join never ends
        supervisor.channel.send(Run(2, Transcribe("room2", "talk-b")))
        assert await supervisor.next(Failed) == Failed(2, "busy")
        supervisor.channel.send(Drain())
        # the first is answered when the drain gives up its join; its room, never joined, ends
        got = [await supervisor.next(RoomEnded, RunDone) for _ in range(2)]
        [done] = [message for message in got if isinstance(message, RunDone)]
        assert done.id == 1 and done.reply.status == 503
        assert [message.room for message in got if isinstance(message, RoomEnded)] == ["room1"]
        assert await task == "drain"


async def test_the_end_of_the_channel_or_an_unreadable_frame_stops_the_worker() -> None:
    async with worker() as (supervisor, task):
        await supervisor.next(Hello)
        supervisor.raw.close()  # the supervisor is gone
        assert await task == "eof"
    async with worker() as (supervisor, task):
        await supervisor.next(Hello)
        supervisor.raw.write(protocol.frame(b"\xc1 not msgpack"))
        assert await task == "protocol-error"
