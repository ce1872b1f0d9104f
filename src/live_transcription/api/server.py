"""``live-transcription serve``: the ExApp's HTTP server and the service under it
(the rooms in this process, or, with ``LT_WORKERS`` > 1, a supervisor of
worker processes that own them).

Shutdown on SIGTERM/SIGINT, bounded end to end by ``SHUTDOWN_SECONDS`` from
the signal, whatever clients do: the server stops accepting at once and
joins still pending are given up; requests in flight get
``LT_HTTP_SHUTDOWN_GRACE_SECONDS`` (a second signal ends the grace), then
every connection left is cut; then leaving ``running_service`` leaves every
call (finals flushed, ``bye`` sent) in the time that remains.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import FrameType

import uvicorn

from live_transcription import loop as event_loop
from live_transcription import metrics
from live_transcription.api.app import OPEN_PATHS, ServiceRuntime, create_app
from live_transcription.api.http_front import FrontLimits, HttpFront
from live_transcription.cluster.node import ClusterUnavailable
from live_transcription.config import ConfigError, Settings, load_settings
from live_transcription.logs import flush_repeats, setup_logging
from live_transcription.service import running_service
from live_transcription.workers import WorkersUnavailable

log = logging.getLogger(__name__)

Service = Callable[[Settings], AbstractAsyncContextManager[ServiceRuntime]]

SHUTDOWN_SECONDS = 20.0
_UVICORN_MARGIN = 2.0
"""How long uvicorn may take to finish after our grace cut every connection."""


class _Server(uvicorn.Server):
    """uvicorn's server, telling us the moment a signal arrives (so the
    shutdown bound starts then, not when uvicorn is done), and ending the
    grace on a second signal of either kind (uvicorn does so for SIGINT only)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.signalled = asyncio.Event()
        self.signalled_again = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        again = self.should_exit
        if again:
            self.force_exit = True
        super().handle_exit(sig, frame)
        # a signal handler runs between bytecodes: hand over to the loop
        event = self.signalled_again if again else self.signalled
        self._loop.call_soon_threadsafe(event.set)


async def run_server(
    settings: Settings,
    *,
    started: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    service: Service = running_service,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then leave every call;
    everything after the signal takes SHUTDOWN_SECONDS at most. ``started``
    is set once the port accepts requests."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(None) as deadline:
            async with service(settings) as runtime:
                front = HttpFront(FrontLimits.from_settings(settings, OPEN_PATHS))
                config = uvicorn.Config(
                    create_app(runtime),
                    host=settings.app_host,
                    port=settings.app_port,
                    http=front.protocol_class(),
                    ws="none",  # no WebSocket route: an upgrade request is plain HTTP (404)
                    timeout_keep_alive=settings.http_keep_alive,
                    timeout_graceful_shutdown=settings.http_shutdown_grace + int(_UVICORN_MARGIN),
                    log_config=None,
                    access_log=False,
                    lifespan="off",
                )
                server = _Server(config)
                serving = asyncio.create_task(server.serve())
                if started is not None:
                    while not server.started and not serving.done():  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                    started.set()
                waits = {serving, asyncio.create_task(server.signalled.wait())}
                if stop is not None:
                    waits.add(asyncio.create_task(stop.wait()))
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waits - {serving}:
                    waiter.cancel()
                deadline.reschedule(loop.time() + SHUTDOWN_SECONDS)
                log.info("shutting down: %d HTTP connection(s) open", len(front.connections))
                runtime.stop_accepting()
                server.should_exit = True
                again = asyncio.create_task(server.signalled_again.wait())
                await asyncio.wait({serving, again}, timeout=settings.http_shutdown_grace)
                again.cancel()

                def cut_connections() -> None:
                    cut = front.abort_all()
                    if cut:
                        why = "second signal" if server.signalled_again.is_set() else "grace over"
                        log.warning("shutdown: cut %d HTTP connection(s) still open (%s)", cut, why)

                if not serving.done():
                    # requests still in flight see a disconnect (they end by themselves);
                    # uvicorn notices within 0.1 s, its own grace is a backstop
                    cut_connections()
                    await asyncio.wait({serving}, timeout=_UVICORN_MARGIN)
                if not serving.done():
                    server.force_exit = True
                    serving.cancel()
                    await asyncio.wait({serving})
                cut_connections()
                if serving.done() and not serving.cancelled() and serving.exception() is not None:
                    log.error("the HTTP server failed: %r", serving.exception())
    except TimeoutError:
        log.error("shutdown took longer than %.0f s: calls cut short", SHUTDOWN_SECONDS)
    log.info("stopped")


def _ignore_signal(signum: int, frame: object) -> None:
    """uvicorn restores the previous handler and re-raises the signal after
    its graceful stop; with this one the process then finishes its own
    shutdown (leaving calls) instead of dying at once."""


def serve(workers: int | None = None) -> int:
    """``workers`` (``--workers``) overrides ``LT_WORKERS``."""
    try:
        settings = load_settings() if workers is None else load_settings(LT_WORKERS=workers)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format, settings.secret_values())
    missing = settings.missing_for_calls()
    if missing:
        log.warning("not configured for calls yet: %s", ", ".join(missing))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _ignore_signal)
    service: Service = running_service
    if settings.worker_count > 1:
        from live_transcription.workers.supervisor import supervised_service  # noqa: PLC0415

        service = supervised_service
    try:
        event_loop.run(
            run_server(settings, service=service),
            settings.event_loop,
            settings.udp_tick_ms,
            metrics.udp_sends_dropped.inc,
        )
    except ClusterUnavailable as exc:
        log.error("cannot start: %s (LT_NATS_URL)", exc)
        return 1
    except WorkersUnavailable as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        flush_repeats()  # counts of repeats held back until now are written, not lost
    return 0
