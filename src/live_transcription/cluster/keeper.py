"""Keeps one room's lease alive while the room lives.

The keeper is the only writer of its lease: it renews on a period, writes
record changes (targets, language) as soon as it is told of them, and
releases the lease when asked to stop. Run it as a task of a TaskGroup.
When the lease is lost (another replica took it, or it may have expired
because renewals kept failing) it calls ``on_lost`` once and returns: the
room must stop, since another replica may own it now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from live_transcription.clock import Clock
from live_transcription.cluster.codec import LeaseValue, RoomRecord
from live_transcription.cluster.leases import LeaseClock
from live_transcription.cluster.store import NATS_FAILURES, Lease, LeaseLost, LeaseStore
from live_transcription.logs import short_token

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        store: LeaseStore,
        lease: Lease,
        *,
        renew_every: float,
        retry_every: float,
        margin: float,
        clock: Clock,
        on_lost: Callable[[str, str], None],
        confirmed_at: float,
    ) -> None:
        self._store = store
        self._lease = lease
        self._clock = clock
        self._on_lost = on_lost
        self._time = LeaseClock(
            ttl=store.ttl,
            renew_every=renew_every,
            retry_every=retry_every,
            margin=margin,
            confirmed_at=confirmed_at,
        )
        self._pending: RoomRecord | None = None
        self._stopping = False
        self._release_at_stop = True
        self._wake = asyncio.Event()
        self.done = asyncio.Event()
        self.lost_reason: str | None = None
        self.taken = False
        """The lease was lost to another writer (not merely unrenewed)."""
        self.released = False
        self.renewals = 0
        self.failures = 0

    @property
    def room(self) -> str:
        return self._lease.room

    @property
    def stopping(self) -> bool:
        """``stop`` was called: the lease is being released or left to expire."""
        return self._stopping

    @property
    def record(self) -> RoomRecord:
        return self._pending or self._lease.value.record

    def update_record(self, record: RoomRecord) -> None:
        """Have the lease carry this record (written at once, not at the next renewal)."""
        if record.room != self.room:
            raise ValueError(f"record of {record.room} given to the keeper of {self.room}")
        self._pending = record
        self._wake.set()

    def stop(self, *, release: bool = True) -> None:
        """Stop renewing and release the lease (``done`` is set once that is
        over). ``release=False`` leaves the lease to expire instead, so that
        other replicas see an orphan and one of them takes the room."""
        self._stopping = True
        self._release_at_stop = self._release_at_stop and release
        self._wake.set()

    async def run(self) -> None:
        try:
            await self._keep()
        finally:
            self.done.set()

    async def _keep(self) -> None:
        failed = False
        while not self._stopping:
            if self._time.expired(self._clock.now()):
                self._lose("renewals failed until the lease may have expired")
                return
            if failed or self._pending is None:
                await self._wait(self._time.next_renewal(self._clock.now(), failed=failed))
                if self._stopping:
                    break
                if self._time.expired(self._clock.now()):
                    continue
            self._wake.clear()  # whatever woke us is handled by this write
            record, self._pending = self._pending, None
            value = LeaseValue(self._lease.value.owner, record or self._lease.value.record)
            sent_at = self._clock.now()
            try:
                self._lease = await self._store.renew(self._lease, value)
            except LeaseLost as exc:
                self.taken = True
                self._lose(str(exc))
                return
            except NATS_FAILURES as exc:
                self.failures += 1
                failed = True
                if record is not None and self._pending is None:
                    self._pending = record  # write it on the next attempt
                log.warning("renewing the lease of %s failed (%r); retrying", short_token(self.room), exc)
                continue
            self._time.confirmed(sent_at)
            self.renewals += 1
            failed = False
        if self._release_at_stop:
            await self._release()

    async def _wait(self, seconds: float) -> None:
        """Sleep on the clock, or less when woken by a record change or stop."""
        if self._wake.is_set():
            self._wake.clear()
            return
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._wake.clear()

    async def _release(self) -> None:
        try:
            self.released = await self._store.release(self._lease)
        except NATS_FAILURES as exc:
            log.warning(
                "releasing the lease of %s failed (%s); it expires on its own", short_token(self.room), exc
            )
            return
        if not self.released:
            log.warning("the lease of %s was no longer ours at release", short_token(self.room))

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        log.warning("lost the lease of room %s: %s", short_token(self.room), reason)
        self._on_lost(self.room, reason)
