"""Prometheus metrics of the service, defined in one place.

Counters are incremented where things happen; gauges that mirror state
(rooms, speakers, targets) are read at scrape time from their owners, so
there is nothing to keep in sync. Process RSS and CPU come from
prometheus_client's process collector (``process_resident_memory_bytes``,
``process_cpu_seconds_total``).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "live_transcription"

captions_sent = Counter(
    f"{PREFIX}_captions_sent",
    "Transcript messages sent to the HPB (one per target), when the link wrote them",
    ["kind"],  # partial | final
)
captions_dropped = Counter(
    f"{PREFIX}_captions_dropped",
    "Transcript messages dropped before sending (one per target)",
    ["reason"],  # throttled-superseded | hpb-down-overflow | unsent-at-close | no-target | session-gone
)
words_in = Counter(f"{PREFIX}_words", "Words received from the STT engine", ["engine"])
audio_frames_dropped = Counter(
    f"{PREFIX}_audio_frames_dropped",
    "80 ms audio frames dropped (added at each speech end and speaker end)",
    ["reason"],  # stt-behind | no-stream
)
audio_packets = Counter(
    f"{PREFIX}_audio_packets",
    "RTP audio packets (added at each speech end, every 10 s of silence and at speaker end)",
    ["kind"],  # received | silent | skipped | decoded | lost | late | concealed | decode-error
)
hpb_reconnects = Counter(
    f"{PREFIX}_hpb_reconnects",
    "HPB reconnection attempts by outcome",
    ["outcome"],  # resumed | new-session | failed
)
stt_streams = Counter(
    f"{PREFIX}_stt_stream_events",
    "STT stream opens, and stream errors by reason",
    ["engine", "event"],  # open | <reason> (non-fatal: a retry) | fatal-<reason>
)
stt_streams_reconnecting = Gauge(
    f"{PREFIX}_stt_streams_reconnecting",
    "Speakers whose STT stream lost its connection and has not recognised anything since",
)
speakers_refused = Counter(
    f"{PREFIX}_speakers_refused", "Speakers not captioned because a cap was reached", ["reason"]
)
udp_sends_dropped = Counter(
    f"{PREFIX}_udp_sends_dropped",
    "UDP datagrams (media, STUN) not sent because the socket buffer was full",
)
delivery_stalls = Counter(
    f"{PREFIX}_delivery_stalls",
    "Times a connected room had captions to send but a target pending for over 10 s (once per episode)",
)
speakers_started = Counter(f"{PREFIX}_speakers_started", "Speaker sessions started")
speakers_ended = Counter(f"{PREFIX}_speakers_ended", "Speaker sessions ended", ["reason"])
rooms_opened = Counter(f"{PREFIX}_rooms_opened", "Rooms joined (the HPB accepted the join)")
room_joins_failed = Counter(
    f"{PREFIX}_room_joins_failed",
    "Room joins that failed, by cause",
    ["cause"],  # see hpb.failures.CAUSES
)
http_connections = Gauge(f"{PREFIX}_http_connections", "Open HTTP connections")
http_connections_closed = Counter(
    f"{PREFIX}_http_connections_closed",
    "HTTP connections closed by the server's limits, by reason",
    ["reason"],  # header-timeout | body-timeout | evicted | refused
)
rooms_closed = Counter(f"{PREFIX}_rooms_closed", "Rooms left", ["reason"])
caption_latency = Histogram(
    f"{PREFIX}_caption_latency_seconds",
    "From the arrival of the audio that ended a word to its caption leaving for the HPB",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
)

translations_requested = Counter(
    f"{PREFIX}_translations_requested",
    "Translations wanted: one per final caption and target language with readers",
)
translations_delivered = Counter(
    f"{PREFIX}_translations_delivered", "Translated finals sent to their readers (one per language)"
)
translations_dropped = Counter(
    f"{PREFIX}_translations_dropped", "Translations not delivered, by reason", ["reason"]
)
translation_latency = Histogram(
    f"{PREFIX}_translation_latency_seconds",
    "From a final caption to its translation leaving for the HPB",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0),
)
translation_available = Gauge(
    f"{PREFIX}_translation_available", "1 while a Nextcloud translation provider is available"
)
TRANSLATION_DROP_REASONS = (
    "late",
    "failed",
    "error",
    "no-provider",
    "unsupported",
    "rate-limited",
    "process-busy",
    "room-busy",
    "no-listener",
    "shutdown",
)
stt_pool_streams = Gauge(
    f"{PREFIX}_stt_streams",
    "Connections to the remote STT server, by state (leased by a speaker, idle and warm, opening)",
    ["state"],
)
stt_audio_seconds = Counter(
    f"{PREFIX}_stt_audio_seconds",
    "Seconds of audio sent to the STT: speech (participant audio incl. pre-roll),"
    " flush (padding that gets the last words out), keepalive (idle pooled connections)",
    ["kind"],
)
participant_audio_seconds = Counter(
    f"{PREFIX}_participant_audio_seconds",
    "Wall-clock seconds of audio received from captioned speakers (added at speech ends)",
)
stt_lease_wait = Histogram(
    f"{PREFIX}_stt_lease_wait_seconds",
    "From a speaker's speech onset to a leased STT connection",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0),
)
stt_speakers_waiting = Gauge(
    f"{PREFIX}_stt_speakers_waiting",
    "Speakers waiting now for an STT connection (their audio is buffered, bounded)",
)
stt_lease_waits = Counter(
    f"{PREFIX}_stt_lease_waits",
    "Speech onsets that found no idle STT connection, by reason (cold, capacity, reconnect)",
    ["reason"],
)

worker_restarts = Counter(
    f"{PREFIX}_worker_restarts",
    "Worker processes that stopped without being asked to, and were started again",
    ["worker"],
)
worker_requests_refused = Counter(
    f"{PREFIX}_worker_requests_refused",
    "Requests to a worker answered 503: too many in flight, worker not running, or no answer in time",
    ["reason"],  # queue-full | worker-down | timeout
)
worker_rooms_reopened = Counter(
    f"{PREFIX}_worker_rooms_reopened",
    "Rooms of a stopped worker re-opened from their record on a running worker, by outcome",
    ["outcome"],  # reopened | failed
)


# Known label values exist from the start, so a scrape shows 0 rather than
# nothing: "no drops" must be told apart from "not instrumented".
for _pool_state in ("leased", "idle", "opening"):
    stt_pool_streams.labels(_pool_state)
for _kind in ("speech", "flush", "keepalive"):
    stt_audio_seconds.labels(_kind)
for _reason in ("cold", "capacity", "reconnect"):
    stt_lease_waits.labels(_reason)
for _reason in ("no-stream", "stt-behind"):
    audio_frames_dropped.labels(_reason)
for _reason in ("throttled-superseded", "hpb-down-overflow", "unsent-at-close", "no-target", "session-gone"):
    captions_dropped.labels(_reason)
for _outcome in ("resumed", "new-session", "failed"):
    hpb_reconnects.labels(_outcome)
for _kind in ("room-cap", "process-cap", "memory"):
    speakers_refused.labels(_kind)
for _kind in ("partial", "final"):
    captions_sent.labels(_kind)
for _reason in ("header-timeout", "body-timeout", "evicted", "refused"):
    http_connections_closed.labels(_reason)
for _reason in TRANSLATION_DROP_REASONS:
    translations_dropped.labels(_reason)
for _kind in ("received", "silent", "skipped", "decoded", "lost", "late", "concealed", "decode-error"):
    audio_packets.labels(_kind)
for _reason in ("queue-full", "worker-down", "timeout"):
    worker_requests_refused.labels(_reason)
for _outcome in ("reopened", "failed"):
    worker_rooms_reopened.labels(_outcome)


class _StateCollector:
    """Rooms, speakers and targets, read from the Manager at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], StateSnapshot] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.source is None:
            return
        snapshot = self.source()
        for name, doc, value in (
            ("rooms", "Rooms joined", snapshot.rooms),
            ("rooms_reconnecting", "Rooms whose HPB link is reconnecting", snapshot.rooms_reconnecting),
            ("speakers", "Speakers being captioned", snapshot.speakers),
            ("speakers_waiting", "Speakers in a call but not captioned", snapshot.speakers_waiting),
            ("targets", "Participants receiving captions", snapshot.targets),
            ("targets_pending", "Targets whose HPB session is not known yet", snapshot.targets_pending),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    rooms: int
    rooms_reconnecting: int
    speakers: int
    speakers_waiting: int
    targets: int
    targets_pending: int


_state = _StateCollector()
REGISTRY.register(_state)

_peer_connections: weakref.WeakSet[object] = weakref.WeakSet()


def track_peer_connection(pc: object) -> None:
    """Count ``pc`` in ``peer_connections`` for as long as it is in memory."""
    _peer_connections.add(pc)


class _LiveObjectsCollector:
    """What is alive in memory, counted at scrape time: these must come back
    to zero (or the idle level) when calls end, or something leaks."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            f"{PREFIX}_peer_connections",
            "WebRTC peer connections in memory (open, or closed and not yet freed)",
            value=len(_peer_connections),
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # scraped outside the service's loop
            return
        yield GaugeMetricFamily(
            f"{PREFIX}_event_loop_tasks",
            "asyncio tasks not finished on the service's event loop",
            value=len(asyncio.all_tasks(loop)),
        )


REGISTRY.register(_LiveObjectsCollector())


class _TranslationCollector:
    """Target languages being read and their readers, at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        languages, readers = self.source() if self.source is not None else (0, 0)
        yield GaugeMetricFamily(
            f"{PREFIX}_translation_languages",
            "Target languages with at least one reader, summed over rooms",
            value=languages,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_translation_readers", "Participants reading captions translated", value=readers
        )


_translation = _TranslationCollector()
REGISTRY.register(_translation)


def observe_translation(source: Callable[[], tuple[int, int]] | None) -> None:
    """Point the translation gauges at the running service: ``source()``
    returns (languages in use, readers)."""
    _translation.source = source


def observe_state(source: Callable[[], StateSnapshot] | None) -> None:
    """Point the state gauges at the running service (None at shutdown)."""
    _state.source = source


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    connected: bool
    rooms_owned: int
    rooms_unleased: int
    replicas: int
    forwards: int
    takeovers: int
    leases_lost: int
    disconnects: int


class _ClusterCollector:
    """This replica in the cluster (LT_NATS_URL), read from its node at
    scrape time; zeros in a single process, so every series exists."""

    def __init__(self) -> None:
        self.source: Callable[[], ClusterSnapshot] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = self.source() if self.source is not None else ClusterSnapshot(False, 0, 0, 0, 0, 0, 0, 0)
        for name, doc, value in (
            ("cluster_nats_connected", "1 while this replica is connected to NATS", int(snap.connected)),
            ("cluster_rooms_owned", "Rooms whose lease this replica holds", snap.rooms_owned),
            (
                "cluster_rooms_unleased",
                "Rooms running here whose lease expired while NATS was unreachable",
                snap.rooms_unleased,
            ),
            ("cluster_replicas", "Live replicas in the last scan of the registry", snap.replicas),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        for name, doc, count in (
            ("cluster_forwards", "Talk commands sent to the replica owning the room", snap.forwards),
            ("cluster_takeovers", "Rooms taken over from a replica that disappeared", snap.takeovers),
            (
                "cluster_leases_lost",
                "Room leases lost (another replica wrote them, or renewals failed too long)",
                snap.leases_lost,
            ),
            ("cluster_nats_disconnects", "Times the connection to NATS was lost", snap.disconnects),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=count)


_cluster = _ClusterCollector()
REGISTRY.register(_cluster)


def observe_cluster(source: Callable[[], ClusterSnapshot] | None) -> None:
    """Point the cluster metrics at this replica's node (None: no cluster)."""
    _cluster.source = source


WORKER_STATES = ("starting", "ready", "restarting", "draining", "stopped")


@dataclass(frozen=True, slots=True)
class WorkersSnapshot:
    states: Mapping[str, int]
    """Worker processes by state."""
    rooms_reopening: int


class _WorkersCollector:
    """A supervisor's worker processes (LT_WORKERS > 1), read from its pool
    at scrape time; no samples in a single process."""

    def __init__(self) -> None:
        self.source: Callable[[], WorkersSnapshot] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        workers = GaugeMetricFamily(
            f"{PREFIX}_workers", "Worker processes of this supervisor, by state", labels=["state"]
        )
        reopening = GaugeMetricFamily(
            f"{PREFIX}_worker_rooms_reopening",
            "Rooms of a stopped worker waiting to be re-opened on a running one",
        )
        if self.source is not None:
            snap = self.source()
            for state in WORKER_STATES:
                workers.add_metric([state], snap.states.get(state, 0))
            reopening.add_metric([], snap.rooms_reopening)
        yield workers
        yield reopening


_workers = _WorkersCollector()
REGISTRY.register(_workers)


def observe_workers(source: Callable[[], WorkersSnapshot] | None) -> None:
    """Point the worker gauges at the supervisor's pool (None: a single process)."""
    _workers.source = source
