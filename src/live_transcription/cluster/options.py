"""Settings of the cluster layer, with the defaults a production cluster uses.

Times are in seconds. The lease TTL bounds how long a dead replica's rooms
stay without captions; renewals come well within it so a busy event loop or
a slow NATS round trip does not lose a live room.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import dataclass, field

from live_transcription.cluster.codec import MAX_HOPS, REPLICA_ID

_NOT_ID = re.compile(r"[^A-Za-z0-9_-]+")


def default_replica_id() -> str:
    """host-pid-random: unique per process, readable in logs and in the buckets."""
    host = _NOT_ID.sub("-", socket.gethostname())[:32].strip("-") or "replica"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    url: str = "nats://127.0.0.1:4222"
    replica_id: str = field(default_factory=default_replica_id)
    lease_bucket: str = "live_transcription_rooms"
    registry_bucket: str = "live_transcription_replicas"
    subject_prefix: str = "live_transcription"
    lease_ttl: float = 15.0
    renew_every: float = 5.0
    renew_retry: float = 1.0
    lease_margin: float = 2.0
    """The owner gives a room up this long before its lease may expire."""
    scan_every: float = 3.0
    takeover_grace: float = 6.0
    """After this, any replica may take over an orphan the chosen one left."""
    forget_orphan_after: float = 120.0
    registry_ttl: float = 15.0
    publish_every: float = 5.0
    forward_timeout: float = 40.0
    """Above the owner's join timeout: a first transcribe waits for the join."""
    nats_timeout: float = 5.0
    """One NATS round trip (a key-value read or write) at most."""
    connect_deadline: float = 30.0
    """Joining the cluster at start fails after this without a NATS server."""
    max_hops: int = 2
    max_inflight: int = 64
    """Forwarded commands one replica serves at once; more get 503 busy."""
    capacity: int = 150
    """Speakers this replica takes, unless its room host reports its own cap;
    placement never chooses a full replica."""

    def __post_init__(self) -> None:
        if REPLICA_ID.fullmatch(self.replica_id) is None:
            raise ValueError(f"replica_id must match {REPLICA_ID.pattern}")
        for name in ("lease_bucket", "registry_bucket", "subject_prefix"):
            if REPLICA_ID.fullmatch(getattr(self, name)) is None:
                raise ValueError(f"{name} must match {REPLICA_ID.pattern}")
        if not 0 < self.lease_margin < self.lease_ttl:
            raise ValueError("lease_margin must be between 0 and lease_ttl")
        if not 0 < self.renew_every <= (self.lease_ttl - self.lease_margin) / 2:
            raise ValueError("renew_every must allow two renewals within lease_ttl - lease_margin")
        if not 0 < self.renew_retry <= self.renew_every:
            raise ValueError("renew_retry must be positive and at most renew_every")
        # a released room's delete marker lives one TTL: scans must see it
        if not 0 < self.scan_every <= self.lease_ttl / 2:
            raise ValueError("scan_every must be at most half of lease_ttl")
        if self.takeover_grace < self.scan_every:
            raise ValueError("takeover_grace must be at least scan_every")
        if not 0 < self.publish_every <= self.registry_ttl / 2:
            raise ValueError("publish_every must be at most half of registry_ttl")
        if min(self.forward_timeout, self.nats_timeout, self.connect_deadline) <= 0:
            raise ValueError("timeouts must be positive")
        if not 1 <= self.max_hops <= MAX_HOPS:
            raise ValueError(f"max_hops must be from 1 to {MAX_HOPS}")
        if self.max_inflight < 1 or self.capacity < 0:
            raise ValueError("max_inflight must be >= 1, capacity >= 0")

    @classmethod
    def scaled(
        cls,
        *,
        url: str,
        lease_ttl: float = 15.0,
        replica_id: str | None = None,
        cluster_name: str | None = None,
        connect_deadline: float = 30.0,
    ) -> ClusterOptions:
        """Options for a lease TTL, with every period in the same proportion
        to it as the defaults are to 15 s (renew a third of it, scan a fifth)."""
        scale = lease_ttl / 15.0
        renew_every = 5.0 * scale
        extra: dict[str, str] = {}
        if replica_id:
            extra["replica_id"] = replica_id
        if cluster_name:  # replicas of one cluster share the name; another cluster uses its own
            extra["lease_bucket"] = f"{cluster_name}_rooms"
            extra["registry_bucket"] = f"{cluster_name}_replicas"
            extra["subject_prefix"] = cluster_name
        return cls(
            url=url,
            lease_ttl=lease_ttl,
            renew_every=renew_every,
            renew_retry=min(1.0, renew_every),
            lease_margin=2.0 * scale,
            scan_every=3.0 * scale,
            takeover_grace=6.0 * scale,
            registry_ttl=lease_ttl,
            publish_every=5.0 * scale,
            connect_deadline=connect_deadline,
            **extra,  # type: ignore[arg-type]
        )
