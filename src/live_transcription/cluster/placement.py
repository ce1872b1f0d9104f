"""Which replica should own a room: pure, the same answer on every replica
that sees the same loads.

- Sticky: a live owner keeps its room (moving a room costs a re-join).
- Least-loaded by speakers (the expensive part), then by rooms.
- A full replica (speaker cap reached, or not accepting) is never chosen.
- Ties are broken per room by a stable hash of (room, replica), so a burst of
  new rooms spreads over equally loaded replicas instead of piling onto one
  until the next load report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable

from live_transcription.cluster.codec import ReplicaLoad


def _tie_break(room: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{room}\x00{replica}".encode(), digest_size=8).digest()


def choose_replica(
    room: str,
    loads: Iterable[ReplicaLoad],
    *,
    current_owner: str | None = None,
    exclude: Collection[str] = (),
) -> str | None:
    """The replica that should own ``room``; None when every candidate is full."""
    live = {load.replica: load for load in loads if load.replica not in exclude}
    if current_owner is not None and current_owner in live:
        return current_owner
    candidates = [load for load in live.values() if not load.full]
    if not candidates:
        return None
    best = min(candidates, key=lambda load: (load.speakers, load.rooms, _tie_break(room, load.replica)))
    return best.replica
