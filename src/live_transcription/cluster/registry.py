"""The replicas of the cluster and their load, in a JetStream key-value bucket.

Each replica writes its own key (its id) with its load every
``publish_every`` seconds; the bucket's ``max_age`` drops the key of a
replica that stops writing, and a replica that shuts down deletes its key.
Placement reads the whole bucket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from live_transcription.clock import Clock
from live_transcription.cluster import codec
from live_transcription.cluster.codec import ReplicaLoad
from live_transcription.cluster.store import NATS_FAILURES, Bucket, scan_bucket

log = logging.getLogger(__name__)


class ReplicaRegistry:
    def __init__(
        self,
        bucket: Bucket,
        *,
        replica_id: str,
        load: Callable[[], ReplicaLoad],
        publish_every: float,
        timeout: float,
        clock: Clock,
    ) -> None:
        self._kv = bucket.kv
        self.ttl = bucket.ttl
        self.replica_id = replica_id
        self._load = load
        self._publish_every = publish_every
        self._timeout = timeout
        self._clock = clock
        self._stopped = False
        self.published = 0
        self.failures = 0

    async def publish(self) -> None:
        load = self._load()
        if load.replica != self.replica_id:
            raise ValueError(f"load of {load.replica} published by {self.replica_id}")
        async with asyncio.timeout(self._timeout):
            await self._kv.put(self.replica_id, codec.encode_load(load))
        self.published += 1

    async def run(self) -> None:
        """Publish this replica's load until stopped or cancelled."""
        while not self._stopped:
            try:
                await self.publish()
            except NATS_FAILURES as exc:
                self.failures += 1
                log.warning("publishing this replica's load failed (%s)", exc or type(exc).__name__)
            await self._clock.sleep(self._publish_every)

    def stop(self) -> None:
        """End ``run`` at its next turn."""
        self._stopped = True

    async def withdraw(self) -> None:
        """Leave the registry at once (at shutdown)."""
        async with asyncio.timeout(self._timeout):
            await self._kv.delete(self.replica_id)

    async def replicas(self) -> dict[str, ReplicaLoad]:
        """Every live replica's last published load."""
        async with asyncio.timeout(2 * self._timeout):
            found = await scan_bucket(self._kv, codec.parse_load, entry_wait=self._timeout)
        return {
            replica: load
            for replica, load in found.items()
            if load is not None and load.replica == replica  # a key speaks for its own replica only
        }
