"""The process's translation, built from settings: Nextcloud's Task
Processing client and the Translator, or a Translator that says why
translation is off."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from live_transcription.config import Settings
from live_transcription.hpb.ice import app_api_headers
from live_transcription.translation.ocs import TaskProcessingClient
from live_transcription.translation.room import TranslationSetup
from live_transcription.translation.translator import TaskBackend, Translator

log = logging.getLogger(__name__)


@asynccontextmanager
async def translation_from_settings(
    settings: Settings, *, backend: TaskBackend | None = None
) -> AsyncIterator[TranslationSetup]:
    """``backend`` replaces the HTTP client in tests."""
    async with AsyncExitStack() as stack:
        missing = settings.missing_for_translation()
        off_reason = ""
        if backend is None and not missing:
            headers = app_api_headers(
                app_id=settings.app_id,
                app_version=settings.app_version,
                app_secret=settings.app_secret.get_secret_value(),
            ) | {"User-Agent": f"ExApp/{settings.app_id}/{settings.app_version}"}  # as nc_py_api names itself
            backend = await stack.enter_async_context(
                TaskProcessingClient(
                    settings.nextcloud_url,
                    headers,
                    app_id=settings.app_id,
                    verify_tls=not settings.skip_cert_verify,
                    request_timeout=min(15.0, settings.translation_timeout_seconds),
                    max_connections=settings.translation_max_tasks,
                )
            )
        if backend is None:
            off_reason = f"the service is not set up to reach Nextcloud ({', '.join(missing)} not set)"
            log.info("live translation off: %s", off_reason)
        translator = await stack.enter_async_context(
            Translator(
                backend,
                off_reason=off_reason,
                languages_ttl=settings.translation_languages_ttl_seconds,
                max_tasks=settings.translation_max_tasks,
                queue_size=16 * settings.translation_max_tasks,
            )
        )
        yield TranslationSetup(
            translator,
            timeout=settings.translation_timeout_seconds,
            max_jobs=settings.translation_max_tasks_per_room,
        )
