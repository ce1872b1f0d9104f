"""One replica's membership in the cluster: the leases of its rooms, its
entry in the registry, the forwarded commands it serves, and the rooms it
takes over from replicas that disappeared.

The rooms themselves stay with the ``RoomHost`` (the process's room
manager): the node only decides where a Talk command runs and keeps the
leases of the rooms the host runs. The host tells the node when a room's
record changes (``record_changed``) and when a room closes
(``room_closed``); the node tells the host to stop a room whose lease it
lost (``RoomHost.lost``) and to re-open a room it took over
(``RoomHost.resume``).

State (leases held, rooms being taken over, the last scan) is owned by the
node and changed on the event loop without an await in the middle of a
change; keepers and loops are tasks of the node's TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import nats
from nats.aio.client import Client

from live_transcription.clock import Clock, MonotonicClock
from live_transcription.cluster.codec import (
    Command,
    Forwarded,
    LeaseValue,
    ReplicaLoad,
    Reply,
    RoomRecord,
    SetLanguage,
    Transcribe,
)
from live_transcription.cluster.forwarding import (
    CommandServer,
    ForwardFailure,
    command_subject,
    forward,
)
from live_transcription.cluster.keeper import LeaseKeeper
from live_transcription.cluster.leases import ExpiryTracker, Orphan
from live_transcription.cluster.options import ClusterOptions
from live_transcription.cluster.placement import choose_replica
from live_transcription.cluster.registry import ReplicaRegistry
from live_transcription.cluster.routing import (
    ExecuteHere,
    ForwardTo,
    PlaceRoom,
    TooManyHops,
    opens_room,
    route,
)
from live_transcription.cluster.store import NATS_FAILURES, Lease, LeaseStore, open_bucket
from live_transcription.logs import short_token

log = logging.getLogger(__name__)

DISPATCH_ATTEMPTS = 4
"""Reads of a room's lease per command: ownership may move while a command
is routed (a race lost, an owner gone); past this the command gets 503."""


@dataclass(frozen=True, slots=True)
class HostLoad:
    speakers: int
    rooms: int
    accepting: bool = True
    capacity: int | None = None
    """Speakers this replica takes at most; None: ``ClusterOptions.capacity``."""


class RoomHost(Protocol):
    """What the cluster layer needs from this replica's rooms."""

    def load(self) -> HostLoad: ...

    def has_room(self, room: str) -> bool:
        """True while a room runs here (opening, joined or lingering)."""
        ...

    async def execute(self, command: Command) -> Reply:
        """Run a Talk command on this replica, as for a single process."""
        ...

    async def resume(self, record: RoomRecord) -> bool:
        """Re-open a room taken over from a replica that disappeared, with its
        targets and language; False when it cannot be opened here."""
        ...

    def lost(self, room: str, reason: str) -> None:
        """Stop the room now without waiting: another replica may own it."""
        ...


class ClusterUnavailable(RuntimeError):
    """NATS could not be reached at start."""


class ClusterNode:
    def __init__(self, host: RoomHost, options: ClusterOptions, *, clock: Clock | None = None) -> None:
        self.host = host
        self.options = options
        self.replica_id = options.replica_id
        self._clock = clock or MonotonicClock()
        self._subject = command_subject(options.subject_prefix, options.replica_id)
        self._nc: Client | None = None
        self._store: LeaseStore | None = None
        self._registry: ReplicaRegistry | None = None
        self._tracker: ExpiryTracker | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._keepers: dict[str, LeaseKeeper] = {}
        self._taking_over: set[str] = set()
        self._acquiring: dict[str, asyncio.Event] = {}
        """Rooms whose lease this replica is taking: set once the keeper runs
        (or the attempt failed). The lease is visible on the server before
        the acquiring call returns here."""
        self._takeover_tasks: set[asyncio.Task[None]] = set()
        self._resume_failed: dict[str, float] = {}
        """Rooms this replica could not re-open, and when: while another
        replica may take them it leaves them alone (grabbing them again would
        starve the others), and alone it retries later."""
        # the lease this replica left expires (one TTL), then the others see
        # the orphan and, after their grace, take it: leave them all of that
        self._retry_resume_after = options.lease_ttl + 2 * (options.takeover_grace + options.scan_every)
        self._loads: dict[str, ReplicaLoad] = {}
        self._unleased: dict[str, RoomRecord] = {}
        """Rooms still running here whose lease expired while NATS was
        unreachable: re-claimed once it is back, or stopped if another
        replica took them meanwhile."""
        self._accepting = False
        self._closing = False
        self.scans = 0
        self.forwarded = 0
        self.takeovers = 0
        self.leases_lost = 0
        self.disconnects = 0

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        opts = self.options
        try:
            # the client retries forever (max_reconnect_attempts=-1), also at
            # the first connect: bound the start, keep retrying once connected
            async with asyncio.timeout(opts.connect_deadline):
                self._nc = await nats.connect(
                    servers=[url.strip() for url in opts.url.split(",") if url.strip()],
                    name=f"live-transcription {self.replica_id}",
                    connect_timeout=max(1, round(opts.nats_timeout)),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=self._nats_error,
                    disconnected_cb=self._nats_disconnected,
                    reconnected_cb=self._nats_reconnected,
                )
        except TimeoutError:
            raise ClusterUnavailable(
                f"cannot reach NATS at {_without_credentials(opts.url)} within {opts.connect_deadline:.0f} s"
            ) from None
        try:
            js = self._nc.jetstream(timeout=opts.nats_timeout)
            lease_bucket = await open_bucket(js, opts.lease_bucket, opts.lease_ttl)
            registry_bucket = await open_bucket(js, opts.registry_bucket, opts.registry_ttl)
            self._store = LeaseStore(lease_bucket, timeout=opts.nats_timeout)
            self._tracker = ExpiryTracker(
                ttl=lease_bucket.ttl,
                takeover_grace=opts.takeover_grace,
                forget_after=opts.forget_orphan_after,
            )
            self._registry = ReplicaRegistry(
                registry_bucket,
                replica_id=self.replica_id,
                load=self.load,
                publish_every=opts.publish_every,
                timeout=opts.nats_timeout,
                clock=self._clock,
            )
            self._accepting = True
            await self._registry.publish()
            server = CommandServer(self._nc, self._subject, self._serve, max_inflight=opts.max_inflight)
            self._tasks = asyncio.TaskGroup()
            await self._tasks.__aenter__()
            self._loops = [
                self._tasks.create_task(server.run(), name="cluster-commands"),
                self._tasks.create_task(self._registry.run(), name="cluster-registry"),
                self._tasks.create_task(self._watch(), name="cluster-watch"),
            ]
            async with asyncio.timeout(opts.nats_timeout):
                await server.ready.wait()
        except BaseException as exc:
            await self._shutdown(type(exc), exc, exc.__traceback__)
            raise
        log.info("replica %s joined the cluster at %s", self.replica_id, opts.url)
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
        """Leave the registry, release every lease still held, stop the loops,
        close the connection. Exit the node after the rooms have closed:
        a lease released while its room still runs invites a second owner."""
        self._accepting = False
        self._closing = True  # the loops stop even if the client library swallows a cancellation
        try:
            if self._registry is not None and self._nc is not None and self._nc.is_connected:
                try:
                    await self._registry.withdraw()
                except NATS_FAILURES as error:
                    log.warning("leaving the replica registry failed: %s", error)
            keepers = list(self._keepers.values())
            for keeper in keepers:
                keeper.stop()
            for keeper in keepers:
                await keeper.done.wait()  # each release is bounded by nats_timeout
            if self._registry is not None:
                self._registry.stop()
            for task in (*self._loops, *self._takeover_tasks):
                task.cancel()
            if self._tasks is not None:
                await self._tasks.__aexit__(exc_type, exc, tb)
                self._tasks = None
        finally:
            if self._nc is not None and not self._nc.is_closed:
                await self._nc.close()

    # --- what the host calls ------------------------------------------------------------------------------
    @property
    def nats(self) -> Client:
        if self._nc is None:
            raise RuntimeError("the node is not started")
        return self._nc

    @property
    def owned_rooms(self) -> frozenset[str]:
        return frozenset(self._keepers)

    @property
    def unleased_rooms(self) -> frozenset[str]:
        """Rooms running here without a lease while NATS is (or was) unreachable."""
        return frozenset(self._unleased)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def _reconnecting(self) -> bool:
        """Disconnected, and the client is trying to connect again (not closed for good)."""
        return self._nc is not None and not self._nc.is_connected and not self._nc.is_closed

    @property
    def replicas_seen(self) -> int:
        """Live replicas in the last scan of the registry, this one included."""
        return len(self._loads.keys() | {self.replica_id})

    def load(self) -> ReplicaLoad:
        host = self.host.load()
        return ReplicaLoad(
            replica=self.replica_id,
            speakers=host.speakers,
            rooms=host.rooms,
            capacity=self.options.capacity if host.capacity is None else host.capacity,
            accepting=host.accepting and self._accepting,
        )

    async def replicas(self) -> dict[str, ReplicaLoad]:
        """Every live replica's last published load, read now."""
        if self._registry is None:
            raise RuntimeError("the node is not started")
        return await self._registry.replicas()

    async def submit(self, command: Command) -> Reply:
        """Run a Talk command where its room lives: here, or on its owner."""
        return await self._dispatch(command, hops=0)

    def record_changed(self, record: RoomRecord) -> None:
        """The room's targets or language changed: the lease carries them."""
        keeper = self._keepers.get(record.room)
        if keeper is not None:
            keeper.update_record(record)
        elif record.room in self._unleased:
            self._unleased[record.room] = record

    async def room_closed(self, room: str) -> None:
        """The room closed here: release its lease now, so it is free at once."""
        self._unleased.pop(room, None)
        await self._stop_keeper(room, release=True)

    def room_ended(self, room: str, *, release: bool = True) -> None:
        """``room_closed`` without waiting for the release (from a callback).
        ``release=False``: the lease is left to expire, and another replica
        takes the room over (this replica is shutting down)."""
        self._unleased.pop(room, None)
        keeper = self._keepers.get(room)
        if keeper is not None:
            keeper.stop(release=release)

    def stop_accepting(self) -> None:
        """Shutdown begins: no new room is placed here (published with the load)."""
        self._accepting = False

    # --- routing ------------------------------------------------------------------------------------------
    async def _serve(self, forwarded: Forwarded) -> Reply:
        if not self._accepting and opens_room(forwarded.command):
            return Reply.error(503, "this replica is shutting down; retry")
        return await self._dispatch(forwarded.command, hops=forwarded.hops)

    async def _dispatch(self, command: Command, *, hops: int) -> Reply:
        room = command.room
        if not self.connected:
            # a room this replica runs keeps taking Talk's commands while NATS is away
            if self.host.has_room(room) and (room in self._keepers or room in self._unleased):
                return await self.host.execute(command)
            return Reply.error(503, "the cluster is unreachable (NATS); retry")
        try:
            return await self._route(command, hops)
        except NATS_FAILURES as exc:
            log.warning("routing %s for a room failed: %s", type(command).__name__, exc or type(exc).__name__)
            if self.host.has_room(room) and room in self._keepers:
                return await self.host.execute(command)
            return Reply.error(503, "the cluster is unreachable; retry")

    async def _route(self, command: Command, hops: int) -> Reply:
        store = self._started_store()
        room = command.room
        for _attempt in range(DISPATCH_ATTEMPTS):
            state = await store.state(room)
            lease = state if isinstance(state, Lease) else None
            owner = lease.value.owner if lease is not None else None
            # no key at all: the owner's lease expired, unless nobody ever had it
            orphan = self._vanished(room) if state is None else None
            match route(command, owner, self_id=self.replica_id, hops=hops, max_hops=self.options.max_hops):
                case ExecuteHere():
                    keeper = self._keepers.get(room)
                    if keeper is not None and keeper.stopping:
                        await keeper.done.wait()  # the room closed here: its lease is being released
                        continue
                    if owner == self.replica_id and room not in self._keepers:
                        acquiring = self._acquiring.get(room)
                        if acquiring is None:
                            return Reply.error(503, "this room is changing owner; retry")
                        await acquiring.wait()  # our own acquire is returning: route again
                        continue
                    if orphan is not None:  # its owner is gone: take it over, then run the command
                        reply = await self._open_here(orphan.record, command, resume=True)
                        if reply is not None:
                            return reply
                        continue
                    return await self.host.execute(command)
                case TooManyHops(owner=owner):
                    return Reply.error(503, f"room ownership keeps moving (last owner {owner}); retry")
                case ForwardTo(owner=owner):
                    result = await self._forward(owner, command, hops)
                    if isinstance(result, Reply):
                        return result
                    again = await store.read(room)
                    if again is not None and again.value.owner == owner:
                        return Reply.error(
                            503, f"the replica owning this room is unreachable ({result.kind.value}); retry"
                        )
                    # the lease expired (take the room over) or moved: route again
                case PlaceRoom():
                    reply = await self._place_and_open(command, hops, orphan)
                    if reply is not None:
                        return reply
        return Reply.error(503, "room ownership kept changing; retry")

    async def _place_and_open(self, command: Command, hops: int, orphan: Orphan | None) -> Reply | None:
        room = command.room
        unreachable: set[str] = set()
        for _attempt in range(DISPATCH_ATTEMPTS):
            chosen = choose_replica(room, self._current_loads(), exclude=unreachable)
            if chosen is None or len(self._loads) <= 1 or unreachable:
                # none free in the last scan, none scanned yet, or one gone since: look again
                assert self._registry is not None
                self._loads = await self._registry.replicas()
                chosen = choose_replica(room, self._current_loads(), exclude=unreachable)
            if chosen is None:
                return Reply.error(503, "every replica is at capacity")
            if chosen == self.replica_id or hops > 0:  # a forwarded placement: this replica was chosen
                break
            result = await self._forward(chosen, command, hops)
            if isinstance(result, Reply):
                return result
            log.warning("replica %s chosen for a room is unreachable (%s)", chosen, result.kind)
            unreachable.add(chosen)
        else:
            return Reply.error(503, "no replica with capacity answered; retry")
        if not self._accepting:
            return Reply.error(503, "this replica is shutting down; retry")
        if orphan is not None:  # its owner is gone: re-open it with its targets, then run the command
            return await self._open_here(orphan.record, command, resume=True)
        return await self._open_here(RoomRecord(room, language=_language_of(command)), command, resume=False)

    async def _forward(self, owner: str, command: Command, hops: int) -> Reply | ForwardFailure:
        self.forwarded += 1
        subject = command_subject(self.options.subject_prefix, owner)
        return await forward(
            self.nats, subject, Forwarded(command, hops + 1), deadline=self.options.forward_timeout
        )

    def _vanished(self, room: str) -> Orphan | None:
        tracker = self._tracker
        return tracker.vanished(room, self._clock.now()) if tracker is not None else None

    # --- leases -------------------------------------------------------------------------------------------
    async def _open_here(self, record: RoomRecord, command: Command | None, *, resume: bool) -> Reply | None:
        """Take the room's lease and open it here: re-opened from ``record``
        (``resume``, a take-over) and/or by ``command``; None when another
        replica took the lease first."""
        store = self._started_store()
        room = record.room
        acquired = self._acquiring[room] = asyncio.Event()
        try:
            sent_at = self._clock.now()
            lease = await store.acquire(LeaseValue(self.replica_id, record))
            if lease is None:
                return None
            if self._closing:  # shutdown began meanwhile: no new keeper may start
                await store.release(lease)
                return Reply.error(503, "this replica is shutting down; retry")
            self._start_keeper(lease, sent_at)
        finally:
            acquired.set()
            if self._acquiring.get(room) is acquired:
                del self._acquiring[room]
        reply: Reply | None = Reply(200, {})
        resumed = True
        try:
            if resume:
                self.takeovers += 1
                log.info(
                    "%s takes room %s over (%d targets)",
                    self.replica_id,
                    short_token(room),
                    len(record.targets),
                )
                resumed = await self.host.resume(record)
                if not resumed:
                    self._resume_failed[room] = self._clock.now()
                    log.warning("room %s taken over could not be re-opened here", short_token(room))
            if command is not None:
                reply = await self.host.execute(command)
        finally:
            if not self.host.has_room(room):
                # a room that could not be re-opened here stays an orphan for
                # another replica; one Talk's command did not open is closed
                await self._stop_keeper(room, release=resumed)
        return reply

    def _start_keeper(self, lease: Lease, sent_at: float) -> None:
        assert self._tasks is not None and self._store is not None
        keeper = LeaseKeeper(
            self._store,
            lease,
            renew_every=self.options.renew_every,
            retry_every=self.options.renew_retry,
            margin=self.options.lease_margin,
            clock=self._clock,
            on_lost=self._lease_lost,
            confirmed_at=sent_at,
        )
        self._keepers[lease.room] = keeper
        self._tasks.create_task(self._keep(keeper), name=f"lease-{lease.room[:8]}")

    async def _keep(self, keeper: LeaseKeeper) -> None:
        try:
            await keeper.run()
        except Exception:
            log.exception("the lease keeper of room %s failed", short_token(keeper.room))
            if keeper.lost_reason is None:
                self._lease_lost(keeper.room, "lease keeper failed")
        finally:
            if self._keepers.get(keeper.room) is keeper:
                del self._keepers[keeper.room]

    async def _stop_keeper(self, room: str, *, release: bool) -> None:
        keeper = self._keepers.get(room)
        if keeper is None:
            return
        keeper.stop(release=release)
        await keeper.done.wait()

    def _lease_lost(self, room: str, reason: str) -> None:
        self.leases_lost += 1
        keeper = self._keepers.get(room)
        if keeper is not None and not keeper.taken and self._reconnecting and not self._closing:
            # NATS is away for every replica as far as this one can tell: the
            # room keeps captioning here, and is re-claimed (or stopped, if
            # another replica took it meanwhile) once NATS is back
            self._unleased[room] = keeper.record
            log.warning(
                "room %s keeps running without its lease while NATS is unreachable (%s)",
                short_token(room),
                reason,
            )
            return
        try:
            self.host.lost(room, reason)
        except Exception:
            log.exception("stopping room %s after its lease was lost failed", short_token(room))

    async def reclaim_once(self) -> None:
        """Take the leases of the rooms that kept running while NATS was
        unreachable; stop those another replica took meanwhile."""
        store = self._started_store()
        for room, record in list(self._unleased.items()):
            if self._closing or not self.connected:
                return
            if not self.host.has_room(room):
                self._unleased.pop(room, None)
                continue
            sent_at = self._clock.now()
            try:
                lease = await store.acquire(LeaseValue(self.replica_id, record))
                if lease is None:  # still ours on the server (NATS was away for less than a TTL)?
                    held = await store.read(room)
                    lease = held if held is not None and held.value.owner == self.replica_id else None
            except NATS_FAILURES as exc:
                log.warning("re-claiming room %s failed: %s", short_token(room), exc or type(exc).__name__)
                return
            latest = self._unleased.pop(room, None)  # record changes kept coming meanwhile
            if latest is None or self._closing:  # the room closed meanwhile
                if lease is not None:
                    with contextlib.suppress(*NATS_FAILURES):
                        await store.release(lease)
                continue
            if lease is not None:
                self._start_keeper(lease, sent_at)
                self._keepers[room].update_record(latest)  # written at once, restarting the TTL
                log.info("room %s re-claimed after NATS came back", short_token(room))
                continue
            log.warning(
                "room %s was taken over while NATS was unreachable: stopping it here", short_token(room)
            )
            try:
                self.host.lost(room, "taken over while NATS was unreachable")
            except Exception:
                log.exception("stopping room %s failed", short_token(room))

    # --- take-over ----------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Scan the leases and the registry; take over orphans placed here."""
        while not self._closing:
            await self._clock.sleep(self.options.scan_every)
            if self._unleased:
                await self.reclaim_once()
            await self.scan_once()

    async def scan_once(self) -> None:
        """One scan of the leases and the registry (the watch loop runs it
        every ``scan_every``); starts a take-over for each orphan placed here."""
        store, registry, tracker = self._started_store(), self._registry, self._tracker
        assert registry is not None and tracker is not None
        if self._closing:
            return
        started = self._clock.now()
        try:
            scan = await store.scan()
            self._loads = await registry.replicas()
        except NATS_FAILURES as exc:
            log.warning("scanning the cluster failed: %s", exc or type(exc).__name__)
            return
        self.scans += 1
        now = self._clock.now()
        loads = self._current_loads()
        for room, failed_at in list(self._resume_failed.items()):
            value = scan.get(room)
            elsewhere = room in scan and (value is None or value.owner != self.replica_id)
            if elsewhere or now - failed_at >= self._retry_resume_after:
                del self._resume_failed[room]  # taken or closed by another, or time to retry
        for orphan in tracker.observe(scan, now, started=started):
            if orphan.room in self._keepers or orphan.room in self._taking_over:
                continue
            if not self._accepting or self._tasks is None:
                break
            if not orphan.record.targets:
                continue  # nobody to caption for: the room was about to close anyway
            if orphan.room in self._resume_failed and any(
                load.replica not in (self.replica_id, orphan.previous_owner) for load in loads
            ):
                continue
            chosen = choose_replica(orphan.room, loads, exclude={orphan.previous_owner})
            if chosen == self.replica_id or tracker.overdue(orphan, now):
                self._taking_over.add(orphan.room)
                task = self._tasks.create_task(self._take_over(orphan), name=f"takeover-{orphan.room[:8]}")
                self._takeover_tasks.add(task)
                task.add_done_callback(self._takeover_tasks.discard)

    async def _take_over(self, orphan: Orphan) -> None:
        try:
            await self._open_here(orphan.record, None, resume=True)
        except NATS_FAILURES as exc:
            log.warning("taking room %s over failed: %s", short_token(orphan.room), exc or type(exc).__name__)
        except Exception:
            log.exception("taking room %s over failed", short_token(orphan.room))
        finally:
            self._taking_over.discard(orphan.room)

    # --- internals ----------------------------------------------------------------------------------------
    def _current_loads(self) -> list[ReplicaLoad]:
        """The last scanned loads, with this replica's own as it is now."""
        loads = dict(self._loads)
        loads[self.replica_id] = self.load()
        return list(loads.values())

    def _started_store(self) -> LeaseStore:
        if self._store is None:
            raise RuntimeError("the node is not started")
        return self._store

    async def _nats_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", exc or type(exc).__name__)

    async def _nats_disconnected(self) -> None:
        if self._closing:
            return
        self.disconnects += 1
        log.warning(
            "NATS connection lost: the %d room(s) owned here keep running; no room is placed,"
            " forwarded or taken over until it is back",
            len(self._keepers),
        )

    async def _nats_reconnected(self) -> None:
        log.info("NATS connection restored (%d room(s) owned here)", len(self._keepers))


def _language_of(command: Command) -> str | None:
    return command.language if isinstance(command, Transcribe | SetLanguage) else None


def _without_credentials(url: str) -> str:
    """The URL as logs may show it: no user or password."""
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"
