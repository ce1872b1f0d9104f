"""A worker process: the service's rooms without the HTTP API, driven by its
supervisor over a channel.

``live-transcription worker`` (started by the supervisor, not by hand) runs
``service.running_service`` with its share of the caps and serves the
supervisor's requests: Talk's commands and re-opened rooms go to the
Manager through a ``ManagerHost`` (the same adapter a cluster replica
uses), whose ``RecordSink`` is the channel: each room's record (targets,
language) and its end go to the supervisor, coalesced per room.

The worker leaves every call (finals flushed, ``bye`` sent) and exits when
the supervisor says ``Drain``, on SIGTERM, and when its channel reaches
end-of-file: the supervisor is gone. SIGINT is ignored (a Ctrl-C reaches
the whole process group; the supervisor drains its workers).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from live_transcription import loop as event_loop
from live_transcription import metrics
from live_transcription.api.app import Runtime
from live_transcription.api.commands import run_command
from live_transcription.clock import Clock, MonotonicClock
from live_transcription.cluster.codec import Reply, RoomRecord
from live_transcription.config import ConfigError, Settings, load_settings
from live_transcription.logs import flush_repeats, setup_logging
from live_transcription.rooms.cluster_host import ManagerHost
from live_transcription.service import running_service
from live_transcription.workers.channel import Channel
from live_transcription.workers.protocol import (
    MAX_TEXT,
    Answer,
    Done,
    Drain,
    Failed,
    Hello,
    LeaveAll,
    Load,
    MetricsRequest,
    MetricsText,
    ProtocolError,
    Request,
    Resume,
    Resumed,
    RoomChanged,
    RoomEnded,
    Run,
    RunDone,
    StatusReport,
    StatusRequest,
    StopRoom,
    WorkerStatus,
)

log = logging.getLogger(__name__)

LOAD_EVERY = 1.0
"""Seconds between load reports (also sent with every answer)."""
MAX_INFLIGHT = 512
"""Requests served at once; the supervisor sends fewer, this is a backstop."""
INFLIGHT_GRACE = 3.0
"""When told to stop, requests in flight get this long before the calls are left."""

Service = Callable[[Settings], AbstractAsyncContextManager[Runtime]]


class RecordOutbox:
    """The worker's ``RecordSink``: each room's newest record or end, sent at
    once while the channel keeps up; while it is backed up, changes of the
    same room replace each other (bounded by the rooms) until it drains."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._pending: dict[str, RoomChanged | RoomEnded] = {}
        self._wake = asyncio.Event()

    def record_changed(self, record: RoomRecord) -> None:
        self._put(record.room, RoomChanged(record))

    def room_ended(self, room: str, *, release: bool = True) -> None:
        self._put(room, RoomEnded(room, release))

    def _put(self, room: str, event: RoomChanged | RoomEnded) -> None:
        self._pending.pop(room, None)
        self._pending[room] = event
        if self._channel.backed_up:
            self._wake.set()
        else:
            self.flush()

    def flush(self) -> None:
        """Send what is pending now (before an answer: the supervisor learns a
        room's record before the answer of the command that changed it)."""
        pending, self._pending = self._pending, {}
        for event in pending.values():
            self._channel.send(event)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._channel.drain()
            self.flush()


class WorkerServer:
    """Serves the supervisor's requests on ``runtime``'s rooms."""

    def __init__(
        self,
        runtime: Runtime,
        channel: Channel,
        *,
        load_every: float = LOAD_EVERY,
        max_inflight: int = MAX_INFLIGHT,
        clock: Clock | None = None,
    ) -> None:
        self.runtime = runtime
        self.channel = channel
        self.host = ManagerHost(runtime.manager, run_command)
        self.records = RecordOutbox(channel)
        self.host.node = self.records
        runtime.manager.observer = self.host
        self._load_every = load_every
        self._max_inflight = max_inflight
        self._clock = clock or MonotonicClock()
        self._inflight = 0
        self._serving: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> str:
        """Serve until the supervisor says ``Drain`` ("drain"), ``stop`` is set
        ("signal"), the channel ends ("eof") or breaks ("protocol-error").
        New rooms are refused from then on; requests in flight are answered."""
        runtime = self.runtime
        self.channel.send(Hello(os.getpid(), runtime.engine_name, tuple(runtime.languages.values())))
        self._send_load()
        async with asyncio.TaskGroup() as tasks:
            background = [
                tasks.create_task(self._report_load(), name="worker-load"),
                tasks.create_task(self.records.run(), name="worker-records"),
            ]
            reading = tasks.create_task(self._read(tasks), name="worker-channel")
            stopping = tasks.create_task(stop.wait(), name="worker-stop")
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            why = reading.result() if reading.done() else "signal"
            for task in (reading, stopping):
                task.cancel()
            runtime.stop_accepting()  # joins still pending give up: their requests end now
            if self._serving:
                await asyncio.wait(self._serving, timeout=INFLIGHT_GRACE)
            for pending in (*self._serving, *background):  # the calls are left next, whatever they wait for
                pending.cancel()
        return why

    async def _read(self, tasks: asyncio.TaskGroup) -> str:
        async for item in self.channel.messages():
            match item:
                case ProtocolError():
                    log.error("unreadable message from the supervisor (%s): stopping", item)
                    return "protocol-error"
                case Drain():
                    return "drain"
                case Run() | Resume() | StopRoom() | LeaveAll() | StatusRequest() | MetricsRequest():
                    if self._inflight >= self._max_inflight:
                        self._answer(Failed(item.id, "busy"))
                        continue
                    self._inflight += 1
                    serving = tasks.create_task(self._serve(item))
                    self._serving.add(serving)
                    serving.add_done_callback(self._serving.discard)
                case _:
                    log.warning("unexpected %s from the supervisor", type(item).__name__)
        return "eof"

    async def _serve(self, request: Request) -> None:
        try:
            answer = await self._handle(request)
        except Exception as exc:
            log.exception("a request from the supervisor failed")
            if isinstance(request, Run):
                room = request.command.room
                answer = RunDone(request.id, Reply.error(500, "internal error"), self.host.has_room(room))
            else:
                answer = Failed(request.id, f"internal error: {type(exc).__name__}")
        finally:
            self._inflight -= 1
        self._answer(answer)

    async def _handle(self, request: Request) -> Answer:
        host = self.host
        match request:
            case Run(command=command):
                reply = await host.execute(command)
                return RunDone(request.id, reply, host.has_room(command.room))
            case Resume(record=record):
                ok = await host.resume(record)
                return Resumed(request.id, ok, host.has_room(record.room))
            case StopRoom():
                host.lost(request.room, request.reason)
                return Done(request.id)
            case LeaveAll():
                await self.runtime.leave_all(request.reason)
                return Done(request.id)
            case StatusRequest():
                return StatusReport(request.id, self.status())
            case MetricsRequest():
                return MetricsText(request.id, await self.runtime.metrics_text())
        raise AssertionError(f"unknown request {request!r}")  # pragma: no cover - the match is exhaustive

    def status(self) -> WorkerStatus:
        _, inputs = self.runtime.health()
        error = inputs.engine_error
        return WorkerStatus(
            engine_error=None if error is None else error[: MAX_TEXT // 4],
            engine_ready=inputs.engine_ready,
            accepting=inputs.accepting,
            speakers_active=inputs.speakers_active,
            speakers_cap=inputs.speakers_cap,
            speakers_refused=inputs.speakers_refused,
            rooms_cap=inputs.rooms_cap,
            rss_bytes=inputs.rss_bytes,
            rooms=tuple(inputs.rooms),
            joins=inputs.joins,
        )

    def _answer(self, answer: Answer) -> None:
        self.records.flush()
        self._send_load()
        self.channel.send(answer)

    def _send_load(self) -> None:
        manager = self.runtime.manager
        self.channel.send(Load(manager.admission.active, manager.room_count, manager.accepting))

    async def _report_load(self) -> None:
        while True:
            await self._clock.sleep(self._load_every)
            if not self.channel.backed_up:  # the next report says the same, newer
                self._send_load()


async def run_worker(
    settings: Settings,
    channel: Channel,
    *,
    stop: asyncio.Event | None = None,
    service: Service = running_service,
) -> str:
    """Run the rooms and serve the supervisor on ``channel`` until told to
    stop; then leave every call. Returns why it stopped."""
    stop = stop or asyncio.Event()
    try:
        async with service(settings) as runtime:
            server = WorkerServer(runtime, channel)
            why = await server.run(stop)
            rooms = runtime.manager.room_count
            if why == "eof":
                log.warning("the supervisor is gone: leaving %d call(s)", rooms)
            else:
                log.info("stopping (%s): leaving %d call(s)", why, rooms)
        server.records.flush()  # the ends of the rooms closed on the way out
    finally:
        await channel.aclose()
    return why


async def _main(settings: Settings, channel_fd: int) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=channel_fd))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await run_worker(settings, Channel(reader, writer), stop=stop)


def worker_main(*, index: int, channel_fd: int, max_rooms: int, max_speakers: int) -> int:
    """``live-transcription worker``: the process the supervisor starts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # the supervisor is this machine's replica in a cluster: its workers are not
        settings = load_settings(
            LT_WORKERS=1, LT_MAX_ROOMS=max_rooms, LT_MAX_SPEAKERS=max_speakers, LT_NATS_URL=""
        )
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format, settings.secret_values(), worker=index)
    try:
        event_loop.run(
            _main(settings, channel_fd),
            settings.event_loop,
            settings.udp_tick_ms,
            metrics.udp_sends_dropped.inc,
        )
    finally:
        flush_repeats()
    return 0
