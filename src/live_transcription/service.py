"""The running service: engine, HPB links, speakers and rooms, built from settings.

``running_service(settings)`` is the one place where the parts meet. Entering
it loads the engine and opens the room manager; leaving it leaves every call
(finals flushed, ``bye`` sent) and releases the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import psutil
from aiortc import RTCIceServer

from live_transcription import metrics
from live_transcription.api.app import Runtime
from live_transcription.api.commands import run_command
from live_transcription.clock import Clock, MonotonicClock
from live_transcription.cluster.node import ClusterNode
from live_transcription.cluster.options import ClusterOptions
from live_transcription.config import Settings
from live_transcription.hpb.connection import HpbLinkFactory
from live_transcription.hpb.ice import app_api_headers, fetch_ice_servers
from live_transcription.rooms import ports
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.cluster_host import ManagerHost
from live_transcription.rooms.manager import Manager
from live_transcription.rooms.room import SpeakerContext, SpeakerSession
from live_transcription.rooms.speaker import Speaker
from live_transcription.stt.base import SttEngine
from live_transcription.stt.factory import create_engine
from live_transcription.translation.setup import translation_from_settings
from live_transcription.translation.translator import TaskBackend

log = logging.getLogger(__name__)

ICE_SERVERS_TTL = 600.0
"""TURN credentials from Talk expire; fetch them again after this long."""


class IceServerCache:
    """STUN/TURN servers from Nextcloud, fetched once per TTL for every
    speaker of the process; concurrent askers share one request."""

    def __init__(
        self,
        fetch: Callable[[], Any],
        *,
        ttl: float = ICE_SERVERS_TTL,
        clock: Clock | None = None,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock or MonotonicClock()
        self._value: Sequence[RTCIceServer] = ()
        self._fetched_at: float | None = None
        self._inflight: asyncio.Future[Sequence[RTCIceServer]] | None = None
        self.fetches = 0

    async def get(self) -> Sequence[RTCIceServer]:
        now = self._clock.now()
        if self._fetched_at is not None and now - self._fetched_at < self._ttl:
            return self._value
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._inflight)

    async def _refresh(self) -> Sequence[RTCIceServer]:
        try:
            self.fetches += 1
            self._value = await self._fetch()
            self._fetched_at = self._clock.now()
            return self._value
        finally:
            self._inflight = None


def ice_server_source(settings: Settings) -> Callable[[], Any]:
    if not settings.nextcloud_url or not settings.app_secret.get_secret_value():

        async def no_servers() -> Sequence[RTCIceServer]:
            return []

        return no_servers
    headers = app_api_headers(
        app_id=settings.app_id,
        app_version=settings.app_version,
        app_secret=settings.app_secret.get_secret_value(),
    )

    async def fetch() -> Sequence[RTCIceServer]:
        return await fetch_ice_servers(
            settings.nextcloud_url, headers, verify_tls=not settings.skip_cert_verify
        )

    return fetch


async def report_init_done(settings: Settings) -> None:
    """Tell AppAPI that initialisation is complete (nothing to download: the
    embedded model ships inside a package)."""
    if not settings.nextcloud_url:
        return
    url = f"{settings.nextcloud_url}/ocs/v1.php/apps/app_api/apps/status/{settings.app_id}"
    headers = app_api_headers(
        app_id=settings.app_id,
        app_version=settings.app_version,
        app_secret=settings.app_secret.get_secret_value(),
    )
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.put(
                url, json={"progress": 100}, headers=headers, ssl=not settings.skip_cert_verify
            ) as response,
        ):
            if response.status >= 300:
                log.warning("AppAPI refused the init progress: HTTP %d", response.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("could not report init progress to AppAPI: %r", exc)


@asynccontextmanager
async def running_service(
    settings: Settings,
    *,
    engine: SttEngine | None = None,
    link_factory: ports.CallLinkFactory | None = None,
    ice_servers: Callable[[], Any] | None = None,
    translation_backend: TaskBackend | None = None,
    cluster_options: ClusterOptions | None = None,
    cluster_clock: Clock | None = None,
) -> AsyncIterator[Runtime]:
    """The whole service; the keyword arguments replace parts in tests.
    With ``LT_NATS_URL`` (or ``cluster_options``) it is one replica of a
    cluster: Talk's commands go through its ``ClusterNode``."""
    engine = engine or create_engine(settings)
    process = psutil.Process()
    stack = AsyncExitStack()
    try:
        languages = engine.languages()
        admission = Admission(
            max_speakers=settings.max_speakers,
            max_speakers_per_room=settings.max_speakers_per_room,
            memory_limit_bytes=settings.memory_limit_mb << 20,
            rss_bytes=lambda: int(process.memory_info().rss),
        )
        ice = IceServerCache(ice_servers or ice_server_source(settings))
        chosen_engine = engine

        def make_speaker(context: SpeakerContext) -> SpeakerSession:
            return Speaker(
                context,
                engine=chosen_engine,
                languages=languages,
                ice_servers=ice.get,
                max_caption_seconds=settings.max_caption_seconds,
            )

        translation = await stack.enter_async_context(
            translation_from_settings(settings, backend=translation_backend)
        )
        manager = Manager(
            link_factory=link_factory or HpbLinkFactory.from_settings(settings),
            speaker_factory=make_speaker,
            languages=languages,
            admission=admission,
            default_language=settings.default_language,
            linger_seconds=settings.room_linger_seconds,
            max_rooms=settings.max_rooms,
            max_targets_per_room=settings.max_targets_per_room,
            provider_failure=engine.failure,
            translation=translation,
        )
        metrics.observe_state(lambda: _snapshot(manager))
        metrics.observe_translation(manager.translation_in_use)
        options = cluster_options or cluster_options_from(settings)
        node: ClusterNode | None = None
        if options is not None:
            host = ManagerHost(manager, run_command)
            manager.observer = host
            node = host.node = ClusterNode(host, options, clock=cluster_clock)
            metrics.observe_cluster(lambda: cluster_snapshot(node))
            # entered before the rooms and left after them: a room's lease is
            # held for as long as the room runs (a placement that reaches this
            # replica before the Manager runs gets 503)
            await stack.enter_async_context(node)
        # the engine's background work outlives the speakers, who give their
        # STT connections back as they end
        async with engine.running(), manager:
            log.info("service ready: engine %s, languages %s", engine.name, ", ".join(sorted(languages)))

            async def init_done() -> None:
                await report_init_done(settings)

            yield Runtime(
                settings=settings,
                manager=manager,
                engine_name=engine.name,
                engine_error=engine.failure,
                engine_ready=engine.ready,
                init_task=init_done,
                cluster=node,
            )
            log.info("shutting down: leaving %d room(s)", len(manager.rooms()))
    finally:
        metrics.observe_state(None)
        metrics.observe_translation(None)
        metrics.observe_cluster(None)
        await stack.aclose()
        await engine.aclose()


def cluster_options_from(settings: Settings) -> ClusterOptions | None:
    """The cluster's settings from ``LT_NATS_URL`` and its companions (None: no cluster)."""
    if not settings.nats_url:
        return None
    return ClusterOptions.scaled(
        url=settings.nats_url,
        lease_ttl=settings.cluster_lease_ttl,
        replica_id=settings.replica_id or None,
        cluster_name=settings.cluster_name,
        connect_deadline=settings.cluster_connect_timeout,
    )


def cluster_snapshot(node: ClusterNode) -> metrics.ClusterSnapshot:
    return metrics.ClusterSnapshot(
        connected=node.connected,
        rooms_owned=len(node.owned_rooms),
        rooms_unleased=len(node.unleased_rooms),
        replicas=node.replicas_seen,
        forwards=node.forwarded,
        takeovers=node.takeovers,
        leases_lost=node.leases_lost,
        disconnects=node.disconnects,
    )


def _snapshot(manager: Manager) -> metrics.StateSnapshot:
    rooms = manager.rooms()
    return metrics.StateSnapshot(
        rooms=len(rooms),
        rooms_reconnecting=sum(1 for room in rooms if room.link_state == "reconnecting"),
        speakers=sum(room.speakers for room in rooms),
        speakers_waiting=sum(room.waiting_speakers for room in rooms),
        targets=sum(room.targets for room in rooms),
        targets_pending=sum(room.pending_targets for room in rooms),
    )
