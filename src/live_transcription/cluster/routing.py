"""Where a Talk command for a room is executed: pure decision, no I/O.

The room's lease says who owns it. The owner executes; any other replica
forwards to the owner. A room nobody owns is placed (only a command that
opens it: ``transcribe`` with enable); other commands for it are answered
locally ("no active transcription").
"""

from __future__ import annotations

from dataclasses import dataclass

from live_transcription.cluster.codec import Command, Transcribe


@dataclass(frozen=True, slots=True)
class ExecuteHere:
    pass


@dataclass(frozen=True, slots=True)
class ForwardTo:
    owner: str


@dataclass(frozen=True, slots=True)
class PlaceRoom:
    pass


@dataclass(frozen=True, slots=True)
class TooManyHops:
    owner: str


Route = ExecuteHere | ForwardTo | PlaceRoom | TooManyHops


def opens_room(command: Command) -> bool:
    return isinstance(command, Transcribe) and command.enable


def route(command: Command, owner: str | None, *, self_id: str, hops: int, max_hops: int) -> Route:
    """``owner``: the replica holding the room's lease, None when nobody does;
    ``hops``: how many replicas the command has passed already."""
    if owner == self_id:
        return ExecuteHere()
    if owner is not None:
        return ForwardTo(owner) if hops < max_hops else TooManyHops(owner)
    return PlaceRoom() if opens_room(command) else ExecuteHere()
