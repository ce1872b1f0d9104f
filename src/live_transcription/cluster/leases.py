"""Lease decisions without I/O: when the owner renews or gives a room up,
and which rooms other replicas should take over.

A lease is a key in a JetStream key-value bucket whose ``max_age`` is the
lease TTL: every write starts a new TTL, and a key nobody rewrites vanishes
(the server keeps no trace of an expiry, so expiries are found by comparing
scans). A release writes a delete marker, which lives for one TTL: a scan
that sees the marker knows the room was closed, not abandoned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from live_transcription.cluster.codec import LeaseValue, RoomRecord

RELEASED = None
"""In a scan, a room whose key holds a delete marker (closed by its owner)."""

Scan = Mapping[str, LeaseValue | None]
"""A scan of the bucket: room -> its lease, or RELEASED. An absent room has no
key at all (never leased, or expired)."""


class LeaseClock:
    """The owner's view of one lease's time.

    The server expires the lease ``ttl`` after the last write it accepted.
    The owner counts from the moment it *sent* its last confirmed write,
    which is never later, and gives the room up ``margin`` before that TTL
    runs out: after that moment another replica may own the room.
    """

    __slots__ = ("_confirmed_at", "margin", "renew_every", "retry_every", "ttl")

    def __init__(
        self, *, ttl: float, renew_every: float, retry_every: float, margin: float, confirmed_at: float
    ) -> None:
        if not 0 < renew_every < ttl - margin:
            raise ValueError("renew_every must be positive and below ttl - margin")
        self.ttl = ttl
        self.renew_every = renew_every
        self.retry_every = retry_every
        self.margin = margin
        self._confirmed_at = confirmed_at

    def confirmed(self, sent_at: float) -> None:
        """A write sent at ``sent_at`` was accepted by the server."""
        self._confirmed_at = max(self._confirmed_at, sent_at)

    def expired(self, now: float) -> bool:
        """True once the lease may have expired on the server."""
        return now >= self._confirmed_at + self.ttl - self.margin

    def next_renewal(self, now: float, *, failed: bool) -> float:
        """Seconds to wait before the next write: the regular period, or a
        retry after a failed one; never past the moment the lease may expire."""
        due = now + self.retry_every if failed else self._confirmed_at + self.renew_every
        return max(0.0, min(due, self._confirmed_at + self.ttl - self.margin) - now)


@dataclass(frozen=True, slots=True)
class Orphan:
    """A room whose lease expired: its owner stopped renewing."""

    record: RoomRecord
    previous_owner: str
    since: float

    @property
    def room(self) -> str:
        return self.record.room


class ExpiryTracker:
    """Finds expired leases by comparing scans of the lease bucket.

    A room leased in the previous scan and absent from this one expired:
    its owner is gone (a released room leaves a delete marker for one TTL).
    That holds only if this scan ended less than a TTL after the previous
    one started; after a longer gap (a stalled process) a vanished room may
    just as well have been released and its marker expired, so it is not
    taken over (``uncertain`` counts those). The last record seen for each
    lease is what a take-over restores.
    """

    def __init__(self, *, ttl: float, takeover_grace: float, forget_after: float) -> None:
        self.ttl = ttl
        self.takeover_grace = takeover_grace
        self.forget_after = forget_after
        self._leased: dict[str, LeaseValue] = {}
        self._orphans: dict[str, Orphan] = {}
        self._last_started: float | None = None
        self.expired_seen = 0
        self.uncertain = 0
        self.forgotten = 0

    def observe(self, scan: Scan, now: float, *, started: float | None = None) -> list[Orphan]:
        """Take one scan, read between ``started`` (default ``now``) and
        ``now``; return every room waiting to be taken over."""
        trusted = self._last_started is not None and now - self._last_started < self.ttl
        for room, value in self._leased.items():
            if room in scan:
                continue
            if trusted:
                self._orphans[room] = Orphan(value.record, value.owner, since=now)
                self.expired_seen += 1
            else:
                self.uncertain += 1
        for room in list(self._orphans):
            if room in scan:
                del self._orphans[room]  # leased again, or closed
            elif now - self._orphans[room].since >= self.forget_after:
                del self._orphans[room]
                self.forgotten += 1
        self._leased = {room: value for room, value in scan.items() if value is not RELEASED}
        self._last_started = now if started is None else started
        return list(self._orphans.values())

    def overdue(self, orphan: Orphan, now: float) -> bool:
        """True once the replica placement chose has had time to take the
        room and has not: then any replica may try."""
        return now - orphan.since >= self.takeover_grace

    def orphan(self, room: str) -> Orphan | None:
        """The room's orphan, if its lease expired and nobody took it yet."""
        return self._orphans.get(room)

    def vanished(self, room: str, now: float) -> Orphan | None:
        """``room`` was found with no key at all (no lease, no delete marker)
        before the next scan: an orphan if the last scan, recent enough to
        trust, saw it leased; else None."""
        orphan = self._orphans.get(room)
        if orphan is not None:
            return orphan
        value = self._leased.get(room)
        if value is None or self._last_started is None or now - self._last_started >= self.ttl:
            return None
        return Orphan(value.record, value.owner, since=now)
