"""What ``/healthz`` says, computed from the real state (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from live_transcription.rooms.joins import JoinReport
from live_transcription.rooms.manager import RoomSummary


@dataclass(frozen=True, slots=True)
class ClusterState:
    """This replica in the cluster of replicas sharing rooms through NATS."""

    replica: str
    connected: bool
    rooms_owned: int
    rooms_unleased: int = 0
    """Rooms kept running here after their lease expired while NATS was away."""
    replicas: int = 1


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """One worker process as its supervisor sees it."""

    index: int
    pid: int | None
    state: str
    """starting | ready | restarting (stopped, to be started again) | draining"""
    rooms: int
    speakers: int
    restarts: int
    answering: bool = True
    """False: a ready worker that did not answer the status request in time."""
    last_exit: str | None = None
    """How the worker's previous process ended (``killed by SIGKILL``, ``exit code 1``)."""
    rss_bytes: int = 0


@dataclass(frozen=True, slots=True)
class WorkersState:
    """The worker processes of a supervisor (``LT_WORKERS`` > 1)."""

    workers: tuple[WorkerHealth, ...]
    rooms_reopening: int = 0
    """Rooms of a worker that stopped, not yet re-opened on another."""

    @property
    def ready(self) -> int:
        return sum(1 for worker in self.workers if worker.state == "ready")


@dataclass(frozen=True, slots=True)
class HealthInputs:
    rooms: list[RoomSummary]
    missing_config: list[str]
    engine_name: str
    engine_error: str | None
    """Set when the engine cannot work at all (e.g. rejected credentials)."""
    engine_ready: bool
    speakers_active: int
    speakers_cap: int
    speakers_refused: int
    rss_bytes: int
    enabled: bool
    accepting: bool
    joins: JoinReport | None = None
    """Recent room joins: failures (with their cause) and joins stuck pending."""
    rooms_cap: int = 0
    cluster: ClusterState | None = None
    """None in a single process (no LT_NATS_URL)."""
    workers: WorkersState | None = None
    """None in a single process (LT_WORKERS=1)."""


@dataclass(frozen=True, slots=True)
class Health:
    status: str  # ok | degraded | failing
    ready: bool
    reasons: list[str] = field(default_factory=list)


def assess(inputs: HealthInputs) -> Health:
    failing: list[str] = []
    degraded: list[str] = []
    if inputs.missing_config:
        failing.append("not configured: " + ", ".join(inputs.missing_config))
    if inputs.engine_error:
        failing.append(f"STT engine {inputs.engine_name}: {inputs.engine_error}")
    if inputs.rooms and all(room.link_state in ("reconnecting", "closed") for room in inputs.rooms):
        failing.append("no room is connected to the HPB")
    joins = inputs.joins
    if joins is not None and joins.failing_for is not None:
        failing.append(f"every HPB join failed for {joins.failing_for:.0f} s ({joins.cause})")
    reconnecting = [room for room in inputs.rooms if room.link_state == "reconnecting"]
    if reconnecting:
        degraded.append(f"{len(reconnecting)} room(s) reconnecting to the HPB")
    stalled = [room for room in inputs.rooms if room.delivery_stalled]
    if stalled:
        degraded.append(
            f"{len(stalled)} room(s) have captions to send but a target without an HPB session for over 10 s"
        )
    stt_reconnecting = sum(room.speakers_reconnecting for room in inputs.rooms)
    if stt_reconnecting:
        degraded.append(f"{stt_reconnecting} STT stream(s) reconnecting")
    if joins is not None and joins.failures and joins.failing_for is None:
        degraded.append(
            f"{joins.failures} HPB join(s) failed in the last {joins.window:.0f} s ({joins.cause})"
        )
    if joins is not None and joins.stalled:
        degraded.append(
            f"{joins.stalled} room(s) waiting more than {joins.stalled_after:.0f} s for the HPB to join them"
        )
    if inputs.rooms_cap and len(inputs.rooms) >= inputs.rooms_cap:
        degraded.append(f"room cap of {inputs.rooms_cap} reached")
    waiting = sum(room.waiting_speakers for room in inputs.rooms)
    if inputs.speakers_active >= inputs.speakers_cap:
        degraded.append(f"speaker cap of {inputs.speakers_cap} reached")
    elif waiting:
        degraded.append(f"{waiting} speaker(s) waiting for captioning")
    cluster = inputs.cluster
    if cluster is not None and not cluster.connected:
        degraded.append(
            "NATS unreachable: rooms running here keep going; no room is placed, forwarded or taken over"
        )
    elif cluster is not None and cluster.rooms_unleased:
        degraded.append(f"{cluster.rooms_unleased} room(s) running here without a lease, being re-claimed")
    workers = inputs.workers
    if workers is not None:
        if workers.ready == 0:
            failing.append("no worker process is running")
        for worker in workers.workers:
            if worker.state == "restarting":
                why = f" ({worker.last_exit})" if worker.last_exit else ""
                degraded.append(f"worker {worker.index} stopped{why} and is being restarted")
            elif worker.state != "ready":
                degraded.append(f"worker {worker.index} is {worker.state}")
            elif not worker.answering:
                degraded.append(f"worker {worker.index} does not answer")
        if workers.rooms_reopening:
            degraded.append(f"{workers.rooms_reopening} room(s) being re-opened after their worker stopped")
    if not inputs.engine_ready:
        degraded.append(f"STT engine {inputs.engine_name} is starting")
    if not inputs.enabled:
        degraded.append("the app is disabled in Nextcloud")
    status = "failing" if failing else "degraded" if degraded else "ok"
    ready = not failing and inputs.engine_ready and inputs.enabled and inputs.accepting
    return Health(status=status, ready=ready, reasons=failing + degraded)
