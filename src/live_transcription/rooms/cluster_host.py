"""This process's rooms as one replica of a cluster (the ``RoomHost`` of a
``ClusterNode``), or as one worker process of a supervisor.

The Manager keeps running the rooms exactly as in a single process; this
adapter runs the commands routed here, re-opens rooms taken over from a
replica (or worker) that disappeared, stops rooms whose lease went
elsewhere, and tells its ``RecordSink`` (the cluster node, or the channel to
the supervisor) of each room's record (targets, language) and of its end.

A room that ends while a command for it runs here (a ``transcribe`` waiting
for a lingering room to close before opening it again) keeps its lease: the
lease is released only if no room runs once the command is done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

from live_transcription.cluster.codec import Command, Reply, RoomRecord
from live_transcription.cluster.node import HostLoad
from live_transcription.rooms.manager import Manager

SHUTDOWN = "shutdown"
LEASE_LOST = "lease-lost"
"""The ``rooms_closed`` reason of a room stopped because another replica owns it."""


class RecordSink(Protocol):
    """Who keeps each room's record outside this process: the cluster node
    (in the room's lease) or the supervisor of this worker."""

    def record_changed(self, record: RoomRecord) -> None: ...

    def room_ended(self, room: str, *, release: bool = True) -> None:
        """The room is gone here. ``release=False``: it closed because this
        process is shutting down, and is not over for its viewers."""
        ...


class ManagerHost:
    def __init__(self, manager: Manager, run_command: Callable[[Manager, Command], Awaitable[Reply]]) -> None:
        self.manager = manager
        self._run_command = run_command
        self.node: RecordSink | None = None
        """Set once the node exists (it needs this host to be built)."""
        self._busy: Counter[str] = Counter()
        """Rooms with a command (or a re-open) running here, and how many."""
        self._ended_while_busy: set[str] = set()

    # --- RoomHost -----------------------------------------------------------------------------------------
    def load(self) -> HostLoad:
        manager = self.manager
        admission = manager.admission
        return HostLoad(
            speakers=admission.active,
            rooms=manager.room_count,
            accepting=manager.accepting and manager.room_count < manager.max_rooms,
            capacity=admission.max_speakers,
        )

    def has_room(self, room: str) -> bool:
        return self.manager.room(room) is not None

    async def execute(self, command: Command) -> Reply:
        self._busy[command.room] += 1
        try:
            return await self._run_command(self.manager, command)
        finally:
            self._settled(command.room)

    async def resume(self, record: RoomRecord) -> bool:
        self._busy[record.room] += 1
        try:
            return await self.manager.resume(record.room, record.language, record.targets)
        finally:
            self._settled(record.room)

    def lost(self, room: str, reason: str) -> None:
        self.manager.stop_room(room, LEASE_LOST)

    # --- RoomObserver (the Manager's rooms) ----------------------------------------------------------------
    def room_changed(self, token: str, language: str, targets: frozenset[str]) -> None:
        if self.node is not None:
            self.node.record_changed(RoomRecord(token, language, targets))

    def room_ended(self, token: str, reason: str) -> None:
        if self._busy[token]:
            self._ended_while_busy.add(token)  # decided when the command is done
        elif self.node is not None:
            # a room closed by this replica's shutdown is not over for its
            # viewers: its lease expires and another replica takes it over
            self.node.room_ended(token, release=reason != SHUTDOWN)

    # --- internals ----------------------------------------------------------------------------------------
    def _settled(self, room: str) -> None:
        self._busy[room] -= 1
        if self._busy[room] > 0:
            return
        del self._busy[room]
        if room in self._ended_while_busy:
            self._ended_while_busy.discard(room)
            if not self.has_room(room) and self.node is not None:
                self.node.room_ended(room)
