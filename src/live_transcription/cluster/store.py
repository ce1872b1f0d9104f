"""Room leases in a JetStream key-value bucket (thin I/O around nats-py).

One key per room; its value is an encoded ``LeaseValue``. The bucket's
``max_age`` is the lease TTL (servers before 2.11 have no per-key TTL, so
every write restarts the whole TTL of the key and a key nobody rewrites
vanishes). Every change is conditional on the key's last revision:

- acquire: create (succeeds only when no live lease exists: exactly one of
  two racing replicas wins);
- renew / update the record: update with the revision we wrote last (fails
  when the lease expired or someone else wrote it);
- release: delete with that revision (leaves a delete marker for one TTL).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from live_transcription.cluster import codec
from live_transcription.cluster.codec import LeaseValue
from live_transcription.cluster.leases import RELEASED
from live_transcription.logs import short_token

log = logging.getLogger(__name__)

WRONG_LAST_SEQUENCE = (10071, 10164)
"""JetStream error codes: the expected last revision of the key did not match."""
STREAM_NAME_IN_USE = 10058
"""JetStream error code: the bucket exists with another configuration."""
SCAN_CONSUMER_IDLE = 1.0
"""The server drops a finished scan's ephemeral consumer this long after the
scan stops listening (a scan every few seconds would otherwise leave a trail
of idle consumers); it never drops one that is still being read."""

T = TypeVar("T")


class LeaseLost(Exception):
    """The lease is no longer ours: it expired or another replica wrote it."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease this replica holds at ``revision`` (the last write it made)."""

    room: str
    revision: int
    value: LeaseValue


@dataclass(frozen=True, slots=True)
class Released:
    """The room's key holds a delete marker: its owner closed the room (within the last TTL)."""

    room: str


@dataclass(frozen=True, slots=True)
class Bucket:
    kv: KeyValue
    ttl: float
    """The bucket's own max_age, which may differ from what this replica asked for."""


async def open_bucket(js: JetStreamContext, name: str, ttl: float) -> Bucket:
    """Bind to bucket ``name``, creating it with ``max_age=ttl`` if missing.

    Replicas that start together may race to create it; an identical
    configuration is accepted by the server, a different one is not, and
    then the existing bucket (and its TTL) wins, with a warning."""
    try:
        kv = await js.create_key_value(
            KeyValueConfig(bucket=name, ttl=ttl, history=1, storage=StorageType.FILE)
        )
    except nats.js.errors.APIError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        kv = await js.key_value(name)
    status = await kv.status()
    actual = status.ttl or 0.0
    if abs(actual - ttl) > 1e-3:
        log.warning("bucket %s exists with a TTL of %.1f s, not %.1f s: the bucket's wins", name, actual, ttl)
    if actual <= 0:
        raise RuntimeError(f"bucket {name} has no TTL: leases in it would never expire")
    return Bucket(kv, actual)


async def scan_bucket(
    kv: KeyValue, parse: Callable[[bytes], T | codec.CodecError], *, entry_wait: float
) -> dict[str, T | None]:
    """The newest entry of every key: its parsed value, or None for a delete
    marker. Keys whose value does not parse are left out with a warning.
    ``entry_wait``: the longest wait for the next entry.

    The scan ends with the entry the server sent with nothing pending after
    it. nats-py's own "caught up" marker is not trusted when it comes first:
    it is also sent when the server had already sent every entry but none had
    reached the client yet (its consumer info said 0 pending before the
    entries arrived; nats-io/nats.py issue 842), and a scan ending there would
    miss every key. Then the bucket's message count decides whether it is
    really empty."""
    watcher = await kv.watchall(inactive_threshold=SCAN_CONSUMER_IDLE)
    found: dict[str, T | None] = {}
    received = 0
    try:
        while True:
            # nats-py leaves the watcher's methods unannotated
            entry: KeyValue.Entry | None = await watcher.updates(timeout=entry_wait)  # type: ignore[no-untyped-call]
            if entry is None:
                if received or (await kv.status()).values == 0:
                    return found
                continue  # entries are on their way: read until the last one
            received += 1
            if entry.operation in (KV_DEL, KV_PURGE):
                found[entry.key] = None
            else:
                parsed = parse(entry.value or b"")
                if isinstance(parsed, codec.CodecError):
                    log.warning(
                        "bucket %s: key %s holds a bad value (%s)",
                        entry.bucket,
                        short_token(entry.key),
                        parsed,
                    )
                else:
                    found[entry.key] = parsed
            if entry.delta == 0:  # nothing pending after it on the server: caught up
                return found
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


def _wrong_last_sequence(exc: nats.js.errors.APIError) -> bool:
    return isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or exc.err_code in WRONG_LAST_SEQUENCE


class LeaseStore:
    def __init__(self, bucket: Bucket, *, timeout: float) -> None:
        self._kv = bucket.kv
        self.ttl = bucket.ttl
        self._timeout = timeout

    async def acquire(self, value: LeaseValue) -> Lease | None:
        """Take the room's lease; None when another replica holds it."""
        room = value.record.room
        try:
            async with asyncio.timeout(self._timeout):
                revision = await self._kv.create(room, codec.encode_lease(value))
        except nats.js.errors.APIError as exc:
            if _wrong_last_sequence(exc):
                return None
            raise
        return Lease(room, revision, value)

    async def renew(self, lease: Lease, value: LeaseValue | None = None) -> Lease:
        """Rewrite the lease (optionally with a new record); raises LeaseLost
        when it is not ours any more. Other errors (timeouts, a lost
        connection) propagate: the lease may still be ours."""
        value = value or lease.value
        try:
            async with asyncio.timeout(self._timeout):
                revision = await self._kv.update(lease.room, codec.encode_lease(value), last=lease.revision)
        except nats.js.errors.APIError as exc:
            if _wrong_last_sequence(exc):
                raise LeaseLost(f"lease of {lease.room} was taken or expired") from None
            raise
        return Lease(lease.room, revision, value)

    async def release(self, lease: Lease) -> bool:
        """Delete the lease if it is still ours; False when it was not."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._kv.delete(lease.room, last=lease.revision)
        except nats.js.errors.APIError as exc:
            if _wrong_last_sequence(exc):
                return False
            raise
        return True

    async def read(self, room: str) -> Lease | None:
        """The room's live lease; None when nobody holds it (or its value is unreadable)."""
        state = await self.state(room)
        return state if isinstance(state, Lease) else None

    async def state(self, room: str) -> Lease | Released | None:
        """The room's live lease, Released when its owner closed it, or None
        when the key has nothing (never leased, or the lease expired)."""
        try:
            async with asyncio.timeout(self._timeout):
                entry = await self._kv.get(room)
        except nats.js.errors.KeyNotFoundError as exc:
            return Released(room) if exc.op in (KV_DEL, KV_PURGE) else None
        parsed = codec.parse_lease(entry.value or b"")
        if isinstance(parsed, codec.CodecError):
            log.warning("lease of %s holds a bad value (%s); treated as free", short_token(room), parsed)
            return None
        return Lease(room, entry.revision or 0, parsed)

    async def scan(self) -> dict[str, LeaseValue | None]:
        """Every room with a key: its lease, or RELEASED (a delete marker)."""
        async with asyncio.timeout(2 * self._timeout):
            found = await scan_bucket(self._kv, codec.parse_lease, entry_wait=self._timeout)
        return {room: value if value is not None else RELEASED for room, value in found.items()}


NATS_FAILURES: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError, OSError)
"""What a NATS round trip raises when the server or the network fails."""
