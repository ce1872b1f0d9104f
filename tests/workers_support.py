"""Worker processes stood in for by tasks of the test: each runs the real
``run_worker`` (its ``WorkerServer`` and a Manager on fake HPB links) over a
real Unix socket pair, so the supervisor's pool drives them as it drives
processes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from live_transcription.api.app import Runtime
from live_transcription.config import Settings, load_settings
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import Manager
from live_transcription.stt.base import Language
from live_transcription.workers.channel import Channel
from live_transcription.workers.pool import Launched
from live_transcription.workers.worker import run_worker
from tests.fake_link import LinkFactory, SpeakerFactory

LANGS = {"en": Language("en", "English"), "fr": Language("fr", "French")}


@dataclass(eq=False)
class FakeWorker:
    """One started worker: its rooms, links and the task that runs it."""

    index: int
    manager: Manager
    links: LinkFactory
    task: asyncio.Task[None]
    exited: asyncio.Future[int]
    why: list[str] = field(default_factory=list)
    killed: bool = False

    @property
    def running(self) -> bool:
        """Not killed (a killed one still closes its rooms while it is cancelled)."""
        return not self.killed and not self.task.done()


class InProcessLauncher:
    """Workers as tasks of this test: ``kill`` is abrupt (the socket is cut,
    nothing more goes out, then the task is cancelled), like SIGKILL."""

    def __init__(self, tasks: asyncio.TaskGroup, settings: Settings, *, hang: bool = False) -> None:
        self._tasks = tasks
        self._settings = settings
        self._hang = hang
        self.started: list[FakeWorker] = []
        self.crash_at_start: set[int] = set()
        """Workers whose next starts exit at once (exit code 1)."""

    def of(self, index: int) -> list[FakeWorker]:
        return [worker for worker in self.started if worker.index == index]

    def current(self, index: int) -> FakeWorker:
        return self.of(index)[-1]

    async def launch(self, index: int, *, max_rooms: int, max_speakers: int) -> Launched:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        their_reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
        exited: asyncio.Future[int] = loop.create_future()
        links = LinkFactory(hang=self._hang)
        manager = Manager(
            link_factory=links,
            speaker_factory=SpeakerFactory(),
            languages=LANGS,
            admission=Admission(max_speakers=max_speakers, max_speakers_per_room=5),
            max_rooms=max_rooms,
            join_timeout=60,
            linger_seconds=3600,
        )
        settings = self._settings

        @contextlib.asynccontextmanager
        async def service(_: Settings) -> AsyncIterator[Runtime]:
            async with manager:
                yield Runtime(settings=settings, manager=manager, engine_name="fake")

        worker_channel = Channel(their_reader, their_writer)
        crash = index in self.crash_at_start

        async def run() -> None:
            code = -9
            try:
                if crash:
                    await worker_channel.aclose()
                    code = 1
                    return
                fake.why.append(await run_worker(settings, worker_channel, service=service))
                code = 0
            finally:
                exited.set_result(code)

        task = self._tasks.create_task(run())
        fake = FakeWorker(index, manager, links, task, exited)
        self.started.append(fake)

        def kill() -> None:
            fake.killed = True
            their_writer.transport.abort()
            task.cancel()

        return Launched(
            1000 + len(self.started), Channel(reader, writer), lambda: asyncio.shield(exited), kill
        )


def settings_for(**env: Any) -> Settings:
    """Settings for calls (to fake HPB links), ``env`` on top."""
    defaults: dict[str, Any] = {
        "APP_SECRET": "x",
        "LT_HPB_URL": "https://hpb.example",
        "LT_INTERNAL_SECRET": "i",
        "NEXTCLOUD_URL": "https://cloud.example",
        "LT_STT_ENGINE": "instant",
    }
    return load_settings(**(defaults | env))
