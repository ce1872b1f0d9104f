"""Scanning a key-value bucket when nats-py's "caught up" marker comes too early.

nats-py's watcher sends its marker first when the consumer info it asks for
says nothing is pending while the entries are still on their way to the
client (the server counts them as sent). A scan that stopped there missed
every key: placement then saw no other replica, and take-over no lease.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from nats.js.kv import KV_DEL

from live_transcription.cluster import codec
from live_transcription.cluster.codec import ReplicaLoad
from live_transcription.cluster.store import scan_bucket


@dataclass
class Entry:
    key: str
    value: bytes | None
    delta: int
    operation: str | None = None
    bucket: str = "replicas"


class Watcher:
    def __init__(self, updates: list[Entry | None]) -> None:
        self._updates: asyncio.Queue[Entry | None] = asyncio.Queue()
        for update in updates:
            self._updates.put_nowait(update)
        self.stopped = False

    async def updates(self, timeout: float) -> Entry | None:  # noqa: ASYNC109 - nats-py's signature
        async with asyncio.timeout(timeout):
            return await self._updates.get()

    async def stop(self) -> None:
        self.stopped = True


@dataclass
class Status:
    values: int


class FakeKv:
    def __init__(self, updates: list[Entry | None], stored: int) -> None:
        self.watcher = Watcher(updates)
        self.stored = stored

    async def watchall(self, **_: Any) -> Watcher:
        return self.watcher

    async def status(self) -> Status:
        return Status(self.stored)


def load(replica: str) -> bytes:
    return codec.encode_load(ReplicaLoad(replica, speakers=0, rooms=0, capacity=10))


async def scan(kv: FakeKv) -> dict[str, ReplicaLoad | None]:
    return await scan_bucket(kv, codec.parse_load, entry_wait=1.0)  # type: ignore[arg-type]


async def test_an_early_caught_up_marker_does_not_end_the_scan() -> None:
    kv = FakeKv([None, Entry("a", load("a"), delta=1), Entry("b", load("b"), delta=0)], stored=2)
    found = await scan(kv)
    assert set(found) == {"a", "b"}
    assert kv.watcher.stopped


async def test_an_empty_bucket_ends_at_the_marker() -> None:
    assert await scan(FakeKv([None], stored=0)) == {}


async def test_the_scan_ends_at_the_entry_with_nothing_pending_after_it() -> None:
    kv = FakeKv(
        [
            Entry("a", load("a"), delta=2),
            Entry("gone", None, delta=1, operation=KV_DEL),
            Entry("b", b"not json", delta=0),
            Entry("late", load("late"), delta=0),  # written after the scan began: not waited for
        ],
        stored=3,
    )
    found = await scan(kv)
    assert found == {"a": codec.parse_load(load("a")), "gone": None}  # a bad value is left out
