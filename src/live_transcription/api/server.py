"""``live-transcription serve``: the ExApp's HTTP server and the service under it.

Shutdown on SIGTERM/SIGINT: uvicorn stops accepting requests, then leaving
``running_service`` leaves every call (finals flushed, ``bye`` sent), bounded
by ``SHUTDOWN_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvicorn

from live_transcription import loop as event_loop
from live_transcription import metrics
from live_transcription.api.app import create_app
from live_transcription.config import ConfigError, Settings, load_settings
from live_transcription.logs import setup_logging
from live_transcription.service import running_service

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 20.0


async def run_server(
    settings: Settings,
    *,
    started: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then leave every call within
    SHUTDOWN_SECONDS. ``started`` is set once the port accepts requests."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(None) as deadline:
            async with running_service(settings) as runtime:
                config = uvicorn.Config(
                    create_app(runtime),
                    host=settings.app_host,
                    port=settings.app_port,
                    log_config=None,
                    access_log=False,
                    lifespan="off",
                )
                server = uvicorn.Server(config)
                serving = asyncio.create_task(server.serve())
                if started is not None:
                    while not server.started and not serving.done():  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                    started.set()
                if stop is not None:
                    stopper = asyncio.create_task(stop.wait())
                    await asyncio.wait((serving, stopper), return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    server.should_exit = True
                await serving
                deadline.reschedule(loop.time() + SHUTDOWN_SECONDS)
    except TimeoutError:
        log.error("shutdown took longer than %.0f s: calls cut short", SHUTDOWN_SECONDS)
    log.info("stopped")


def _ignore_signal(signum: int, frame: object) -> None:
    """uvicorn restores the previous handler and re-raises the signal after
    its graceful stop; with this one the process then finishes its own
    shutdown (leaving calls) instead of dying at once."""


def serve() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    secrets = [
        s.get_secret_value()
        for s in (
            settings.app_secret,
            settings.internal_secret,
            settings.modal_key,
            settings.modal_secret,
            settings.moshi_api_key,
        )
    ]
    setup_logging(settings.log_level, settings.log_format, secrets)
    missing = settings.missing_for_calls()
    if missing:
        log.warning("not configured for calls yet: %s", ", ".join(missing))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _ignore_signal)
    event_loop.run(
        run_server(settings),
        settings.event_loop,
        settings.udp_tick_ms,
        metrics.udp_sends_dropped.inc,
    )
    return 0
