"""The supervisor: what the HTTP routes see when worker processes own the rooms.

``supervised_service(settings)`` starts the worker pool (and, with
``LT_NATS_URL``, the cluster node whose room host the pool is) and yields a
``SupervisorRuntime``. Talk's commands go to the pool (or the node);
``/healthz`` combines every worker's state (``combine``, pure) with the
workers section; ``/metrics`` merges every process's exposition. Leaving
drains every worker: each leaves its calls (finals flushed, ``bye`` sent)
and exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

from live_transcription import metrics
from live_transcription.api.app import cluster_state
from live_transcription.api.health import (
    ClusterState,
    Health,
    HealthInputs,
    WorkerHealth,
    WorkersState,
    assess,
)
from live_transcription.clock import Clock
from live_transcription.cluster.codec import Command, Reply
from live_transcription.cluster.node import ClusterNode
from live_transcription.cluster.options import ClusterOptions
from live_transcription.config import Settings
from live_transcription.rooms.joins import JoinReport
from live_transcription.service import cluster_options_from, cluster_snapshot, report_init_done
from live_transcription.stt.base import Language
from live_transcription.translation.room import TranslationSetup
from live_transcription.translation.setup import translation_from_settings
from live_transcription.translation.translator import TaskBackend
from live_transcription.workers.pool import READY, Launcher, WorkerPool, WorkerView

log = logging.getLogger(__name__)

_PROCESS = psutil.Process()


@dataclass
class SupervisorRuntime:
    """The routes' view of a supervisor and its workers."""

    settings: Settings
    pool: WorkerPool
    translation: TranslationSetup | None
    """The supervisor's own, for ``/capabilities`` and the translation languages
    (each worker translates its rooms' captions with its own)."""
    cluster: ClusterNode | None = None
    init_task: Callable[[], Coroutine[Any, Any, None]] | None = None
    enabled: bool = True
    started_at: float = field(default_factory=time.time)
    background: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def languages(self) -> Mapping[str, Language]:
        return self.pool.languages

    async def submit(self, command: Command) -> Reply:
        if self.cluster is not None:
            return await self.cluster.submit(command)
        return await self.pool.execute(command)

    async def leave_all(self, reason: str) -> None:
        await self.pool.leave_all(reason)

    async def assess_health(self) -> tuple[Health, HealthInputs]:
        inputs = combine(
            await self.pool.views(),
            missing_config=self.settings.missing_for_calls(),
            engine_name=self.pool.engine_name,
            enabled=self.enabled,
            accepting=self.pool.accepting,
            speakers_cap=self.settings.max_speakers,
            rooms_cap=self.settings.max_rooms,
            supervisor_rss=_PROCESS.memory_info().rss,
            rooms_reopening=self.pool.rooms_reopening,
            cluster=cluster_state(self.cluster),
        )
        return assess(inputs), inputs

    async def metrics_text(self) -> bytes:
        return await self.pool.metrics_text()

    def stop_accepting(self) -> None:
        self.pool.stop_accepting()
        if self.cluster is not None:
            self.cluster.stop_accepting()


def combine_joins(reports: Sequence[JoinReport]) -> JoinReport | None:
    """The workers' recent joins as one report. Every worker talks to the same
    HPB: one whose every join has failed for the window says the HPB refuses us."""
    if not reports:
        return None
    failing = [report.failing_for for report in reports if report.failing_for is not None]
    by_failures = sorted(reports, key=lambda report: report.failures, reverse=True)
    return JoinReport(
        pending=sum(report.pending for report in reports),
        stalled=sum(report.stalled for report in reports),
        stalled_after=reports[0].stalled_after,
        failures=sum(report.failures for report in reports),
        cause=next((report.cause for report in by_failures if report.cause), None),
        failing_for=max(failing) if failing else None,
        window=reports[0].window,
    )


def combine(
    views: Sequence[WorkerView],
    *,
    missing_config: list[str],
    engine_name: str,
    enabled: bool,
    accepting: bool,
    speakers_cap: int,
    rooms_cap: int,
    supervisor_rss: int,
    rooms_reopening: int = 0,
    cluster: ClusterState | None = None,
) -> HealthInputs:
    """``/healthz``'s inputs for the whole service from each worker's answer (pure)."""
    statuses = [view.status for view in views if view.status is not None]
    workers = WorkersState(
        tuple(
            WorkerHealth(
                index=view.index,
                pid=view.pid,
                state=view.state,
                rooms=view.rooms,
                speakers=view.status.speakers_active if view.status is not None else view.speakers,
                restarts=view.restarts,
                answering=view.state != READY or view.status is not None,
                last_exit=view.last_exit,
                rss_bytes=view.status.rss_bytes if view.status is not None else 0,
            )
            for view in views
        ),
        rooms_reopening=rooms_reopening,
    )
    return HealthInputs(
        rooms=[room for status in statuses for room in status.rooms],
        missing_config=missing_config,
        engine_name=engine_name,
        engine_error=next((status.engine_error for status in statuses if status.engine_error), None),
        engine_ready=bool(statuses) and all(status.engine_ready for status in statuses),
        speakers_active=sum(status.speakers_active for status in statuses),
        speakers_cap=speakers_cap,
        speakers_refused=sum(status.speakers_refused for status in statuses),
        rss_bytes=supervisor_rss + sum(status.rss_bytes for status in statuses),
        enabled=enabled,
        accepting=accepting and any(status.accepting for status in statuses),
        joins=combine_joins([status.joins for status in statuses if status.joins is not None]),
        rooms_cap=rooms_cap,
        cluster=cluster,
        workers=workers,
    )


@asynccontextmanager
async def supervised_service(
    settings: Settings,
    *,
    launcher: Launcher | None = None,
    pool_options: Mapping[str, Any] | None = None,
    cluster_options: ClusterOptions | None = None,
    cluster_clock: Clock | None = None,
    translation_backend: TaskBackend | None = None,
) -> AsyncIterator[SupervisorRuntime]:
    """The supervisor of ``settings.worker_count`` workers; the keyword
    arguments replace parts in tests (``pool_options``: ``WorkerPool``'s)."""
    stack = AsyncExitStack()
    try:
        translation = await stack.enter_async_context(
            translation_from_settings(settings, backend=translation_backend)
        )
        pool = WorkerPool(settings, launcher, **(pool_options or {}))
        metrics.observe_workers(pool.snapshot)
        options = cluster_options or cluster_options_from(settings)
        node: ClusterNode | None = None
        if options is not None:
            node = pool.node = ClusterNode(pool, options, clock=cluster_clock)
            metrics.observe_cluster(lambda: cluster_snapshot(node))
            # entered before the workers, left after them (as in a single process)
            await stack.enter_async_context(node)
        await stack.enter_async_context(pool)
        log.info(
            "supervisor ready: %d workers, engine %s, languages %s",
            len(pool.workers),
            pool.engine_name,
            ", ".join(sorted(pool.languages)),
        )

        async def init_done() -> None:
            await report_init_done(settings)

        yield SupervisorRuntime(
            settings=settings, pool=pool, translation=translation, cluster=node, init_task=init_done
        )
        log.info(
            "shutting down: %d worker(s) leave their %d room(s)",
            sum(1 for worker in pool.workers if worker.alive),
            pool.load().rooms,
        )
    finally:
        try:
            await stack.aclose()
        finally:
            metrics.observe_workers(None)
            metrics.observe_cluster(None)
