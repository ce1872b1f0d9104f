"""Replicas of the service on several machines, sharing rooms through NATS.

A room lives on exactly one replica. Ownership is a lease in a JetStream
key-value bucket (``store``, ``keeper``); a Talk command reaching another
replica is forwarded to the owner by request/reply (``forwarding``); the
replicas publish their load (``registry``) and new or orphaned rooms go to
the least-loaded one (``placement``); a replica that disappears stops
renewing, its leases expire and the others re-open its rooms with their
targets and language (``leases``, ``node``). The decisions are pure
(``codec``, ``placement``, ``routing``, ``leases``); NATS I/O stays in
``store``, ``keeper``, ``registry``, ``forwarding`` and ``node``.
"""

from live_transcription.cluster.codec import (
    Command,
    LeaseValue,
    Leave,
    ReplicaLoad,
    Reply,
    RoomRecord,
    SetLanguage,
    Transcribe,
)
from live_transcription.cluster.node import ClusterNode, ClusterUnavailable, HostLoad, RoomHost
from live_transcription.cluster.options import ClusterOptions

__all__ = [
    "ClusterNode",
    "ClusterOptions",
    "ClusterUnavailable",
    "Command",
    "HostLoad",
    "LeaseValue",
    "Leave",
    "ReplicaLoad",
    "Reply",
    "RoomHost",
    "RoomRecord",
    "SetLanguage",
    "Transcribe",
]
