"""The supervisor's worker processes and the rooms they run.

``WorkerPool`` starts ``count`` workers, watches each one (a task per
slot: start, read its channel, wait for its exit, start it again after the
backoff), sends each Talk command to the worker that runs its room, and
keeps, for every room, which worker runs it and its record (targets,
language) as the worker last reported it.

- Placement: a room that runs somewhere stays there (sticky); a new room
  goes to the ready worker with the fewest speakers, then rooms, that is
  not full (``cluster.placement``, the same rule as between replicas).
- Bounded: at most ``max_pending`` requests in flight per worker; one more
  gets 503 at once (``live_transcription_worker_requests_refused_total``),
  and so does a command for a worker that is not running.
- A worker that stops without being asked (crash, kill, OOM): its
  requests in flight get 503, a WARNING names it and its rooms,
  ``live_transcription_worker_restarts_total`` counts it, and each of its
  rooms with targets is re-opened from its record on a ready worker
  (placement again), with no request from Talk. The slot is started again
  after its ``RestartBackoff``.
- ``RoomHost``: with ``LT_NATS_URL`` the pool is the cluster node's room
  host (this supervisor is one replica; its load is the workers' sum) and
  passes each room's record and end on to the node.

State is changed on the event loop without an await in the middle of a
change: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from prometheus_client import REGISTRY, generate_latest

from live_transcription import metrics
from live_transcription.clock import Clock, MonotonicClock
from live_transcription.cluster.codec import Command, ReplicaLoad, Reply, RoomRecord
from live_transcription.cluster.node import HostLoad
from live_transcription.cluster.placement import choose_replica
from live_transcription.cluster.routing import opens_room
from live_transcription.config import Settings
from live_transcription.logs import short_token
from live_transcription.rooms.cluster_host import LEASE_LOST, RecordSink
from live_transcription.stt.base import Language
from live_transcription.workers import WorkersUnavailable, exposition
from live_transcription.workers.channel import Channel
from live_transcription.workers.policy import RestartBackoff, cap_share
from live_transcription.workers.protocol import (
    VERSION,
    Answer,
    Done,
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
from live_transcription.workers.protocol import Drain as DrainMessage

log = logging.getLogger(__name__)

MAX_PENDING = 256
"""Requests in flight per worker (the size of a room's inbox)."""
COMMAND_TIMEOUT = 60.0
"""A Talk command or a re-open waits this long for its worker (a join takes 30 s at most)."""
STATUS_TIMEOUT = 5.0
"""``/healthz`` and ``/metrics`` wait this long for each worker."""
START_TIMEOUT = 120.0
"""Every worker must be ready this long after the supervisor starts."""
DRAIN_TIMEOUT = 14.0
"""At shutdown, workers get this long to leave their calls, then are killed."""
READ_AFTER_EXIT = 2.0
"""What a worker wrote before it exited is read for this long after its exit."""
REOPEN_ATTEMPTS = 5
REOPEN_RETRY = 5.0

STARTING = "starting"
READY = "ready"
RESTARTING = "restarting"
DRAINING = "draining"
STOPPED = "stopped"


class WorkerUnavailable(Exception):
    """The worker cannot take a request now (stopped, restarting, or too many in flight)."""


@dataclass(slots=True)
class Launched:
    """A started worker process and its end of the channel."""

    pid: int
    channel: Channel
    wait: Callable[[], Awaitable[int]]
    """Awaitable factory: the process's exit status (negative: killed by that signal)."""
    kill: Callable[[], None]


class Launcher(Protocol):
    async def launch(self, index: int, *, max_rooms: int, max_speakers: int) -> Launched: ...


class ProcessLauncher:
    """Workers as processes: ``python -m live_transcription.cli worker``, with
    one end of a socket pair as the channel (the only descriptor it inherits)."""

    async def launch(self, index: int, *, max_rooms: int, max_speakers: int) -> Launched:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "live_transcription.cli",
                "worker",
                "--index",
                str(index),
                "--channel-fd",
                str(theirs.fileno()),
                "--max-rooms",
                str(max_rooms),
                "--max-speakers",
                str(max_speakers),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()

        return Launched(process.pid, Channel(reader, writer), process.wait, kill)


@dataclass(eq=False, slots=True)
class Worker:
    """One worker slot as the supervisor sees it."""

    index: int
    max_rooms: int
    max_speakers: int
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    state: str = STARTING
    launched: Launched | None = None
    pending: dict[int, asyncio.Future[Answer]] = field(default_factory=dict)
    hello: Hello | None = None
    speakers: int = 0
    accepting: bool = False
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    alive: bool = False
    """Its process runs (between launch and exit)."""

    @property
    def pid(self) -> int | None:
        return self.launched.pid if self.launched is not None else None

    def kill(self) -> None:
        if self.launched is not None and self.alive:
            self.launched.kill()


@dataclass(eq=False, slots=True)
class RoomEntry:
    """A room as the supervisor knows it: its worker and its last record."""

    worker: int
    record: RoomRecord | None = None
    running: bool = False
    """The worker reported the room running and has not reported its end."""
    busy: int = 0
    """Commands (or a re-open) for it in flight."""
    kept: bool = False
    """Ended by its worker's own shutdown: re-opened once that worker is gone."""


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker for ``/healthz``: the supervisor's view and what it answered."""

    index: int
    pid: int | None
    state: str
    rooms: int
    speakers: int
    restarts: int
    last_exit: str | None
    status: WorkerStatus | None
    """None: not running, or no answer within STATUS_TIMEOUT."""


def describe_exit(status: int | None) -> str:
    if status is None:
        return "could not be started"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit code {status}"


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        launcher: Launcher | None = None,
        *,
        count: int | None = None,
        clock: Clock | None = None,
        backoff: Callable[[], RestartBackoff] = RestartBackoff,
        max_pending: int = MAX_PENDING,
        command_timeout: float = COMMAND_TIMEOUT,
        status_timeout: float = STATUS_TIMEOUT,
        start_timeout: float = START_TIMEOUT,
        drain_timeout: float = DRAIN_TIMEOUT,
        reopen_retry: float = REOPEN_RETRY,
    ) -> None:
        count = count or settings.worker_count
        self.max_rooms = settings.max_rooms
        self.max_speakers = settings.max_speakers
        self.workers = [
            Worker(
                index,
                max_rooms=cap_share(settings.max_rooms, count, index),
                max_speakers=cap_share(settings.max_speakers, count, index),
                backoff=backoff(),
            )
            for index in range(count)
        ]
        self._launcher = launcher or ProcessLauncher()
        self._clock = clock or MonotonicClock()
        self._max_pending = max_pending
        self._command_timeout = command_timeout
        self._status_timeout = status_timeout
        self._start_timeout = start_timeout
        self._drain_timeout = drain_timeout
        self._reopen_retry = reopen_retry
        self.node: RecordSink | None = None
        """Told of each room's record and end (the cluster node, with LT_NATS_URL)."""
        self._rooms: dict[str, RoomEntry] = {}
        self._reopening: dict[str, asyncio.Event] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._slots: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        """Re-opens and requests nobody waits for."""
        self._accepting = False
        self._started = False
        self._stopping = False
        self._start_failure: str | None = None
        self.rooms_reopened = 0
        self.reopen_failures = 0

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        try:
            self._slots = [
                self._tasks.create_task(self._supervise(worker), name=f"worker-{worker.index}")
                for worker in self.workers
            ]
            async with asyncio.timeout(self._start_timeout):
                while not all(worker.state == READY for worker in self.workers):
                    if self._start_failure is not None:
                        raise WorkersUnavailable(self._start_failure)
                    await self._wait_change()
        except TimeoutError:
            starting = [str(w.index) for w in self.workers if w.state != READY]
            error = WorkersUnavailable(
                f"worker(s) {', '.join(starting)} not ready within {self._start_timeout:.0f} s"
            )
            await self._shutdown(type(error), error, None)
            raise error from None
        except BaseException as exc:
            await self._shutdown(type(exc), exc, exc.__traceback__)
            raise
        self._accepting = self._started = True
        log.info("%d worker(s) ready", len(self.workers))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown(exc_type, exc, tb)

    async def _shutdown(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Every worker leaves its calls (finals flushed, ``bye`` sent) and
        exits; one still running after ``drain_timeout`` is killed."""
        self._accepting = False
        self._stopping = True
        try:
            for worker in self.workers:
                if worker.alive and worker.launched is not None:
                    worker.state = DRAINING
                    worker.launched.channel.send(DrainMessage())
            self._notify()
            try:
                async with asyncio.timeout(self._drain_timeout):
                    while any(worker.alive for worker in self.workers):
                        await self._wait_change()
            except TimeoutError:
                late = [str(w.index) for w in self.workers if w.alive]
                log.warning(
                    "worker(s) %s still running %.0f s after drain: killed",
                    ", ".join(late),
                    self._drain_timeout,
                )
            for worker in self.workers:
                worker.kill()
            for task in (*self._slots, *self._side_tasks):
                task.cancel()
            for room in list(self._rooms):  # not over for their viewers: with a cluster, taken over
                del self._rooms[room]
                if self.node is not None:
                    self.node.room_ended(room, release=False)
            if self._tasks is not None:
                tasks, self._tasks = self._tasks, None
                await tasks.__aexit__(exc_type, exc, tb)
        finally:
            for worker in self.workers:  # cancelled on the way: no worker outlives the pool
                worker.kill()

    # --- one slot -----------------------------------------------------------------------------------------
    async def _supervise(self, worker: Worker) -> None:
        try:
            while not self._stopping:
                status = await self._run_once(worker)
                if self._stopping or (self._started and not self._accepting):
                    break  # shutdown has begun (a worker may see SIGTERM before the supervisor drains it)
                ran_for = self._clock.now() - worker.started_at
                if worker.hello is None and worker.restarts == 0 and self._start_failure is None:
                    self._start_failure = f"worker {worker.index} {describe_exit(status)} before it was ready"
                    self._notify()
                    return
                self._worker_stopped(worker, status)
                delay = worker.backoff.delay_after(ran_for)
                if delay > 0:
                    log.info(
                        "worker %d starts again in %.1f s",
                        worker.index,
                        delay,
                        extra={"worker": worker.index},
                    )
                    await self._clock.sleep(delay)
        finally:
            worker.kill()
            worker.state = STOPPED
            self._notify()

    async def _run_once(self, worker: Worker) -> int | None:
        """Start the worker, serve its channel until its process exits; its exit status."""
        worker.state = STARTING
        worker.hello = None
        worker.started_at = self._clock.now()
        try:
            launched = await self._launcher.launch(
                worker.index, max_rooms=worker.max_rooms, max_speakers=worker.max_speakers
            )
        except OSError as exc:
            log.error("cannot start worker %d: %s", worker.index, exc, extra={"worker": worker.index})
            return None
        worker.launched = launched
        worker.alive = True
        if self._stopping:  # the drain was sent while it was starting
            worker.state = DRAINING
            launched.channel.send(DrainMessage())
        status: int | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                reading = tasks.create_task(
                    self._read(worker, launched), name=f"worker-{worker.index}-channel"
                )
                status = await launched.wait()
                worker.alive = False
                # what it wrote before it exited is still in the socket
                await asyncio.wait({reading}, timeout=READ_AFTER_EXIT)
                launched.channel.close()
        finally:
            worker.alive = False
            launched.channel.close()
            worker.state = STOPPED if self._stopping else RESTARTING
            worker.accepting = False
            worker.speakers = 0
            for future in worker.pending.values():
                if not future.done():
                    future.set_exception(WorkerUnavailable(f"worker {worker.index} stopped"))
            worker.pending.clear()
            self._notify()
        return status

    async def _read(self, worker: Worker, launched: Launched) -> None:
        async for item in launched.channel.messages():
            match item:
                case ProtocolError():
                    log.error(
                        "worker %d sent an unreadable message (%s): stopping it",
                        worker.index,
                        item,
                        extra={"worker": worker.index},
                    )
                    launched.kill()
                    return
                case Hello():
                    if item.version != VERSION:
                        log.error(
                            "worker %d speaks version %d of the channel, the supervisor %d: stopping it",
                            worker.index,
                            item.version,
                            VERSION,
                            extra={"worker": worker.index},
                        )
                        launched.kill()
                        return
                    worker.hello = item
                    if worker.state == STARTING:
                        worker.state = READY
                    log.info(
                        "worker %d ready (pid %d)",
                        worker.index,
                        item.pid,
                        extra={"worker": worker.index, "event": "worker", "state": "ready"},
                    )
                    self._notify()
                case Load():
                    changed = (worker.speakers, worker.accepting) != (item.speakers, item.accepting)
                    worker.speakers = item.speakers
                    worker.accepting = item.accepting
                    if changed:
                        self._notify()  # a worker with room again wakes a waiting re-open
                case RoomChanged():
                    self._room_changed(worker, item.record)
                case RoomEnded():
                    self._room_ended(worker, item.room, item.release)
                case RunDone() | Resumed() | Done() | Failed() | StatusReport() | MetricsText():
                    future = worker.pending.pop(item.id, None)
                    if future is not None and not future.done():
                        future.set_result(item)
                case _:
                    log.warning("unexpected %s from worker %d", type(item).__name__, worker.index)

    def _worker_stopped(self, worker: Worker, status: int | None) -> None:
        """Its process exited on its own: count it, and re-open its rooms elsewhere."""
        how = describe_exit(status)
        worker.restarts += 1
        worker.last_exit = how
        metrics.worker_restarts.labels(str(worker.index)).inc()
        reopen: list[str] = []
        for room, entry in list(self._rooms.items()):
            if entry.worker != worker.index:
                continue
            targets = entry.record is not None and entry.record.targets
            if targets and (entry.running or entry.kept):
                entry.running = entry.kept = False
                reopen.append(room)
            else:
                entry.running = entry.kept = False
                self._settle(room, entry)
        log.warning(
            "worker %d (pid %s) stopped (%s): re-opening its %d room(s)%s",
            worker.index,
            worker.pid,
            how,
            len(reopen),
            f": {', '.join(short_token(room) for room in reopen)}" if reopen else "",
            # a state change: never held back as a repeat, however often it restarts
            extra={"worker": worker.index, "event": "worker", "state": "stopped"},
        )
        for room in reopen:
            self._start_reopen(room)

    # --- rooms --------------------------------------------------------------------------------------------
    def _room_changed(self, worker: Worker, record: RoomRecord) -> None:
        entry = self._rooms.get(record.room)
        if entry is None:
            entry = self._rooms[record.room] = RoomEntry(worker.index)
        elif entry.worker != worker.index:
            log.warning(
                "room %s reported by worker %d, which does not own it: stopping it there",
                short_token(record.room),
                worker.index,
                extra={"worker": worker.index},
            )
            self._fire(worker, lambda id: StopRoom(id, record.room, LEASE_LOST))
            return
        entry.record = record
        entry.running = True
        entry.kept = False
        if self.node is not None:
            self.node.record_changed(record)

    def _room_ended(self, worker: Worker, room: str, release: bool) -> None:
        entry = self._rooms.get(room)
        if entry is None or entry.worker != worker.index:
            return
        entry.running = False
        if not release and self._accepting:
            entry.kept = True  # its worker is stopping on its own: re-opened once it has
            return
        self._settle(room, entry, release=release)

    def _settle(self, room: str, entry: RoomEntry, *, release: bool = True) -> None:
        """Forget the room once nothing runs it or waits on it."""
        if entry.busy or entry.running or entry.kept or room in self._reopening:
            return
        if self._rooms.get(room) is entry:
            del self._rooms[room]
            if self.node is not None:
                self.node.room_ended(room, release=release)

    def _start_reopen(self, room: str) -> None:
        self._reopening[room] = asyncio.Event()
        self._side_task(self._reopen(room), f"reopen-{room[:8]}")

    def _side_task(self, work: Coroutine[Any, Any, None], name: str) -> None:
        assert self._tasks is not None
        task = self._tasks.create_task(work, name=name)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _reopen(self, room: str) -> None:
        done = self._reopening[room]
        reopened = False
        try:
            for attempt in range(1, REOPEN_ATTEMPTS + 1):
                entry = self._rooms.get(room)
                if entry is None or entry.record is None or not self._accepting:
                    return
                worker = await self._worker_for(room)
                if worker is None or entry.record is None:
                    return
                ok, why = await self._resume_on(worker, entry, entry.record)
                if ok:
                    reopened = True
                    self.rooms_reopened += 1
                    metrics.worker_rooms_reopened.labels("reopened").inc()
                    log.info(
                        "room %s re-opened on worker %d with %d target(s)",
                        short_token(room),
                        worker.index,
                        len(entry.record.targets),
                        extra={"worker": worker.index, "room": short_token(room)},
                    )
                    return
                log.warning(
                    "room %s could not be re-opened on worker %d (%s; attempt %d of %d)",
                    short_token(room),
                    worker.index,
                    why,
                    attempt,
                    REOPEN_ATTEMPTS,
                    extra={"worker": worker.index, "room": short_token(room)},
                )
                if attempt < REOPEN_ATTEMPTS:
                    await self._clock.sleep(self._reopen_retry)
            self.reopen_failures += 1
            metrics.worker_rooms_reopened.labels("failed").inc()
            log.warning(
                "room %s given up after %d attempts to re-open it", short_token(room), REOPEN_ATTEMPTS
            )
        finally:
            del self._reopening[room]
            done.set()
            entry = self._rooms.get(room)
            if entry is not None:
                # given up here: with a cluster the lease is left to expire, for another replica
                self._settle(room, entry, release=reopened)

    async def _worker_for(self, room: str) -> Worker | None:
        """The worker placement chooses for ``room``, once one can take it (None: shutting down)."""
        while self._accepting:
            worker = self._place(room)
            if worker is not None:
                return worker
            await self._wait_change()
        return None

    async def _resume_on(self, worker: Worker, entry: RoomEntry, record: RoomRecord) -> tuple[bool, str]:
        entry.worker = worker.index
        entry.busy += 1
        try:
            answer = await self._ask(worker, lambda id: Resume(id, record), self._command_timeout)
        except WorkerUnavailable as exc:
            return False, str(exc)
        except TimeoutError:
            return False, "no answer in time"
        finally:
            entry.busy -= 1
        if not isinstance(answer, Resumed):
            return False, "unexpected answer"
        entry.running = answer.running
        return answer.ok, "" if answer.ok else "the call could not be joined"

    # --- placement ----------------------------------------------------------------------------------------
    def loads(self) -> list[ReplicaLoad]:
        rooms = Counter(entry.worker for entry in self._rooms.values())
        return [
            ReplicaLoad(
                replica=str(worker.index),
                speakers=worker.speakers,
                rooms=rooms[worker.index],
                capacity=worker.max_speakers,
                accepting=worker.state == READY
                and worker.accepting
                and rooms[worker.index] < worker.max_rooms,
            )
            for worker in self.workers
        ]

    def _place(self, room: str) -> Worker | None:
        chosen = choose_replica(room, self.loads())
        return None if chosen is None else self.workers[int(chosen)]

    def _least_loaded_ready(self) -> Worker | None:
        ready = [worker for worker in self.workers if worker.state == READY]
        return min(ready, key=lambda worker: worker.speakers, default=None)

    # --- Talk's commands ------------------------------------------------------------------------------------
    async def execute(self, command: Command) -> Reply:
        """Run a Talk command on the worker that runs (or is chosen for) its room."""
        room = command.room
        reopening = self._reopening.get(room)
        if reopening is not None:
            try:
                async with asyncio.timeout(self._command_timeout):
                    await reopening.wait()
            except TimeoutError:
                return Reply.error(503, "this call is being re-opened after its worker stopped; retry")
        entry = self._rooms.get(room)
        if entry is None:
            if not opens_room(command):
                # nothing runs the room: any worker answers as a single process would
                worker = self._least_loaded_ready()
                if worker is None:
                    return Reply.error(503, "no worker is running; retry")
                return await self._run(worker, command, None)
            if not self._accepting:
                return Reply.error(503, "the service is shutting down")
            if len(self._rooms) >= self.max_rooms:
                return Reply.error(503, f"room cap of {self.max_rooms} reached")
            worker = self._place(room)
            if worker is None:
                return Reply.error(503, "every worker is at capacity")
            entry = self._rooms[room] = RoomEntry(worker.index)
        return await self._run(self.workers[entry.worker], command, entry)

    async def _run(self, worker: Worker, command: Command, entry: RoomEntry | None) -> Reply:
        if entry is not None:
            entry.busy += 1
        try:
            answer = await self._ask(worker, lambda id: Run(id, command), self._command_timeout)
        except WorkerUnavailable as exc:
            return Reply.error(503, f"{exc}; retry")
        except TimeoutError:
            metrics.worker_requests_refused.labels("timeout").inc()
            return Reply.error(503, f"worker {worker.index} did not answer in time; retry")
        finally:
            if entry is not None:
                entry.busy -= 1
        if entry is not None:
            if isinstance(answer, RunDone):
                entry.running = answer.running
            self._settle(command.room, entry)
        if not isinstance(answer, RunDone):
            return Reply.error(
                503 if isinstance(answer, Failed) else 500, "the worker could not run the command"
            )
        return answer.reply

    async def _ask(self, worker: Worker, make: Callable[[int], Request], deadline: float) -> Answer:
        launched = worker.launched
        if worker.state != READY or launched is None:
            metrics.worker_requests_refused.labels("worker-down").inc()
            raise WorkerUnavailable(f"worker {worker.index} is {worker.state}")
        if len(worker.pending) >= self._max_pending:
            metrics.worker_requests_refused.labels("queue-full").inc()
            raise WorkerUnavailable(f"worker {worker.index} has {self._max_pending} requests waiting")
        request_id = next(self._ids)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = future
        try:
            if not launched.channel.send(make(request_id)):
                metrics.worker_requests_refused.labels("worker-down").inc()
                raise WorkerUnavailable(f"worker {worker.index} stopped")
            async with asyncio.timeout(deadline):
                return await future
        finally:
            worker.pending.pop(request_id, None)

    def _fire(self, worker: Worker, make: Callable[[int], Request]) -> None:
        """A request whose answer nobody waits for."""

        async def send() -> None:
            with contextlib.suppress(WorkerUnavailable, TimeoutError):
                await self._ask(worker, make, self._command_timeout)

        if self._tasks is not None:
            self._side_task(send(), f"worker-{worker.index}-request")

    async def leave_all(self, reason: str) -> None:
        """Leave every call (the app was disabled); calls waiting to be
        re-opened are not re-opened."""
        for room in list(self._reopening):
            entry = self._rooms.get(room)
            if entry is not None:
                entry.record = None
        waiting = [event.wait() for event in self._reopening.values()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._command_timeout):
                    await asyncio.gather(*waiting)

        async def leave(worker: Worker) -> None:
            with contextlib.suppress(WorkerUnavailable, TimeoutError):
                await self._ask(worker, lambda id: LeaveAll(id, reason), self._command_timeout)

        await asyncio.gather(*(leave(worker) for worker in self.workers if worker.state == READY))

    def stop_accepting(self) -> None:
        self._accepting = False

    # --- RoomHost (the cluster node's view of this replica) -------------------------------------------------
    def load(self) -> HostLoad:
        ready = [worker for worker in self.workers if worker.state == READY]
        return HostLoad(
            speakers=sum(worker.speakers for worker in ready),
            rooms=len(self._rooms),
            accepting=self._accepting
            and len(self._rooms) < self.max_rooms
            and any(not load.full for load in self.loads()),
            capacity=self.max_speakers,
        )

    def has_room(self, room: str) -> bool:
        return room in self._rooms

    async def resume(self, record: RoomRecord) -> bool:
        """Open a room taken over from another replica, with its record."""
        entry = self._rooms.get(record.room)
        if entry is None:
            worker = self._place(record.room)
            if worker is None:
                log.warning(
                    "room %s cannot be re-opened here: every worker is full", short_token(record.room)
                )
                return False
            entry = self._rooms[record.room] = RoomEntry(worker.index, record=record)
        ok, _ = await self._resume_on(self.workers[entry.worker], entry, record)
        self._settle(record.room, entry)
        return ok

    def lost(self, room: str, reason: str) -> None:
        entry = self._rooms.get(room)
        if entry is not None:
            self._fire(self.workers[entry.worker], lambda id: StopRoom(id, room, reason))

    # --- views ----------------------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def languages(self) -> Mapping[str, Language]:
        for worker in self.workers:
            if worker.hello is not None:
                return {language.code: language for language in worker.hello.languages}
        return {}

    @property
    def engine_name(self) -> str:
        return next((w.hello.engine for w in self.workers if w.hello is not None), "unknown")

    @property
    def rooms_reopening(self) -> int:
        return len(self._reopening)

    def rooms_of(self, index: int) -> list[str]:
        return [room for room, entry in self._rooms.items() if entry.worker == index]

    def record(self, room: str) -> RoomRecord | None:
        entry = self._rooms.get(room)
        return None if entry is None else entry.record

    async def views(self) -> list[WorkerView]:
        """Every worker, with its status asked now (None when it cannot answer)."""
        rooms = Counter(entry.worker for entry in self._rooms.values())

        async def status(worker: Worker) -> WorkerStatus | None:
            try:
                answer = await self._ask(worker, StatusRequest, self._status_timeout)
            except (WorkerUnavailable, TimeoutError):
                return None
            return answer.status if isinstance(answer, StatusReport) else None

        ready = [worker for worker in self.workers if worker.state == READY]
        answers = dict(zip(ready, await asyncio.gather(*(status(worker) for worker in ready)), strict=True))
        return [
            WorkerView(
                index=worker.index,
                pid=worker.pid if worker.alive else None,
                state=worker.state,
                rooms=rooms[worker.index],
                speakers=worker.speakers,
                restarts=worker.restarts,
                last_exit=worker.last_exit,
                status=answers.get(worker),
            )
            for worker in self.workers
        ]

    async def metrics_text(self) -> bytes:
        """The supervisor's own metrics and every running worker's, as one exposition."""

        async def text(worker: Worker) -> tuple[str, str] | None:
            try:
                answer = await self._ask(worker, MetricsRequest, self._status_timeout)
            except (WorkerUnavailable, TimeoutError):
                return None
            return (str(worker.index), answer.text.decode()) if isinstance(answer, MetricsText) else None

        texts = await asyncio.gather(*(text(worker) for worker in self.workers if worker.state == READY))
        own = generate_latest(REGISTRY).decode()
        return exposition.merge(own, dict(found for found in texts if found is not None)).encode()

    def snapshot(self) -> metrics.WorkersSnapshot:
        return metrics.WorkersSnapshot(
            states=Counter(worker.state for worker in self.workers),
            rooms_reopening=len(self._reopening),
        )

    # --- internals ------------------------------------------------------------------------------------------
    def _notify(self) -> None:
        """Wake whoever waits for a worker's state to change."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()
