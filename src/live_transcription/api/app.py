"""The ExApp HTTP contract Talk and AppAPI call (thin: the rooms do the work).

Routes and answers follow PROTOCOLS.md section 1; errors are JSON
``{"error": ...}``. ``/heartbeat``, ``/healthz``, ``/readyz`` and ``/metrics``
are open (orchestrators and Prometheus call them); every other route
requires AppAPI authentication.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import psutil
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

from live_transcription.api.appapi import AppApiAuth, BodyLimit
from live_transcription.api.commands import run_command
from live_transcription.api.health import ClusterState, Health, HealthInputs, WorkersState, assess
from live_transcription.cluster.codec import (
    Command,
    Leave,
    Reply,
    SetLanguage,
    SetTargetLanguage,
    Transcribe,
)
from live_transcription.config import Settings
from live_transcription.rooms.manager import Manager
from live_transcription.stt.base import Language
from live_transcription.translation.languages import TranslationLanguages
from live_transcription.translation.room import TranslationSetup
from live_transcription.translation.translator import (
    TranslationTemporarilyUnavailable,
    TranslationUnavailable,
)

if TYPE_CHECKING:
    from live_transcription.cluster.node import ClusterNode

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
CAPABILITY_CHECK_SECONDS = 5.0
"""Longest /capabilities waits for Nextcloud's translation languages."""
OPEN_PATHS = ("/heartbeat", "/healthz", "/readyz", "/metrics")
_PROCESS = psutil.Process()


class ServiceRuntime(Protocol):
    """What the routes need from the service: a single process (``Runtime``)
    or a supervisor of worker processes (``workers.supervisor``)."""

    settings: Settings
    enabled: bool
    started_at: float
    background: set[asyncio.Task[None]]
    init_task: Callable[[], Coroutine[Any, Any, None]] | None

    @property
    def languages(self) -> Mapping[str, Language]: ...

    @property
    def translation(self) -> TranslationSetup | None: ...

    async def submit(self, command: Command) -> Reply:
        """Run a Talk command where its room lives."""
        ...

    async def leave_all(self, reason: str) -> None:
        """Leave every call (the app was disabled)."""
        ...

    async def assess_health(self) -> tuple[Health, HealthInputs]: ...

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition of the whole service."""
        ...

    def stop_accepting(self) -> None:
        """Shutdown begins: no new room; joins still pending are given up."""
        ...


@dataclass
class Runtime:
    """The routes' view of a single process: the rooms, the engine's state,
    and the switches AppAPI flips."""

    settings: Settings
    manager: Manager
    engine_name: str
    engine_error: Callable[[], str | None] = lambda: None
    engine_ready: Callable[[], bool] = lambda: True
    init_task: Callable[[], Coroutine[Any, Any, None]] | None = None
    enabled: bool = True
    started_at: float = field(default_factory=time.time)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    cluster: ClusterNode | None = None
    """This replica's node when replicas share rooms through NATS."""

    async def submit(self, command: Command) -> Reply:
        """Run a Talk command where its room lives: here, or (in a cluster) on its owner."""
        if self.cluster is not None:
            return await self.cluster.submit(command)
        return await run_command(self.manager, command)

    @property
    def languages(self) -> Mapping[str, Language]:
        return self.manager.languages

    @property
    def translation(self) -> TranslationSetup | None:
        return self.manager.translation

    async def leave_all(self, reason: str) -> None:
        for room in self.manager.rooms():
            await self.manager.leave(room.token, reason)

    async def assess_health(self) -> tuple[Health, HealthInputs]:
        return self.health()

    async def metrics_text(self) -> bytes:
        return generate_latest(REGISTRY)

    def stop_accepting(self) -> None:
        self.manager.stop_accepting()
        if self.cluster is not None:
            self.cluster.stop_accepting()

    def cluster_state(self) -> ClusterState | None:
        return cluster_state(self.cluster)

    def health(self) -> tuple[Health, HealthInputs]:
        inputs = HealthInputs(
            rooms=self.manager.rooms(),
            missing_config=self.settings.missing_for_calls(),
            engine_name=self.engine_name,
            engine_error=self.engine_error(),
            engine_ready=self.engine_ready(),
            speakers_active=self.manager.admission.active,
            speakers_cap=self.manager.admission.max_speakers,
            speakers_refused=self.manager.admission.refused,
            rss_bytes=_PROCESS.memory_info().rss,
            enabled=self.enabled,
            accepting=self.manager.accepting,
            joins=self.manager.joins.report(),
            rooms_cap=self.manager.max_rooms,
            cluster=self.cluster_state(),
        )
        return assess(inputs), inputs


def cluster_state(node: ClusterNode | None) -> ClusterState | None:
    if node is None:
        return None
    return ClusterState(
        replica=node.replica_id,
        connected=node.connected,
        rooms_owned=len(node.owned_rooms),
        rooms_unleased=len(node.unleased_rooms),
        replicas=node.replicas_seen,
    )


# --- request bodies ----------------------------------------------------------------------

_TOKEN = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
_SESSION = Annotated[str, Field(min_length=1, max_length=512)]
_LANG = Annotated[str, Field(min_length=1, max_length=16)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TranscribeBody(_Body):
    roomToken: _TOKEN
    ncSessionId: _SESSION
    enable: StrictBool = True
    langId: _LANG | None = None
    translationTargetLangId: _LANG | None = None


class SetTargetLanguageBody(_Body):
    roomToken: _TOKEN
    ncSessionId: _SESSION
    langId: _LANG | None = None


class SetLanguageBody(_Body):
    roomToken: _TOKEN
    langId: _LANG


class LeaveBody(_Body):
    roomToken: _TOKEN


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _answer(reply: Reply) -> JSONResponse:
    return JSONResponse(dict(reply.body), status_code=reply.status)


def create_app(runtime: ServiceRuntime) -> FastAPI:
    settings = runtime.settings
    app = FastAPI(title="live_transcription", version=settings.app_version, docs_url=None, redoc_url=None)
    app.state.runtime = runtime

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return _error(400, "bad request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in a request")
        return _error(500, "internal error")

    # --- AppAPI lifecycle ------------------------------------------------------------------
    @app.head("/heartbeat", include_in_schema=False)
    @app.get("/heartbeat")
    async def heartbeat() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/init")
    async def init() -> dict[str, object]:
        if runtime.init_task is not None:
            task = asyncio.create_task(runtime.init_task())
            runtime.background.add(task)
            task.add_done_callback(runtime.background.discard)
        return {}

    @app.get("/enabled")
    async def get_enabled() -> dict[str, object]:
        return {"enabled": runtime.enabled}

    @app.put("/enabled")
    async def put_enabled(enabled: Annotated[int, Query(ge=0, le=1)]) -> dict[str, object]:
        runtime.enabled = bool(enabled)
        state = "enabled" if runtime.enabled else "disabled"
        log.info("app %s", state, extra={"state": state})
        if not runtime.enabled:
            await runtime.leave_all("disabled")
        return {"error": ""}

    @app.get("/capabilities")
    async def capabilities() -> dict[str, object]:
        body: dict[str, object] = {
            "version": settings.app_version,
            "features": ["live_transcription"],
            "live_transcription": {"supported_languages": _languages(runtime.languages)},
        }
        translation = await _translation_languages(runtime.translation)
        if translation is not None:  # only while a provider serves at least one target
            body["features"] = ["live_transcription", "live_translation"]
            body["live_translation"] = {"supported_translation_languages": translation.as_talk()}
        return {"live_transcription": body}

    # --- Talk's API -------------------------------------------------------------------------------
    @app.get("/api/v1/languages")
    async def languages() -> dict[str, object]:
        return _languages(runtime.languages)

    @app.post("/api/v1/call/transcribe", response_model=None)
    async def transcribe(body: TranscribeBody) -> JSONResponse:
        if not runtime.enabled and body.enable:
            return _error(503, "the app is disabled")
        command = Transcribe(
            body.roomToken,
            body.ncSessionId,
            body.enable,
            body.langId,
            translate_to=body.translationTargetLangId if body.enable else None,
        )
        return _answer(await runtime.submit(command))

    @app.post("/api/v1/call/set-language", response_model=None)
    async def set_language(body: SetLanguageBody) -> JSONResponse:
        return _answer(await runtime.submit(SetLanguage(body.roomToken, body.langId)))

    @app.get("/api/v1/translation/languages", response_model=None)
    async def translation_languages(
        roomToken: Annotated[str | None, Query(max_length=128, pattern=r"^[A-Za-z0-9_-]+$")] = None,
    ) -> JSONResponse | dict[str, object]:
        translation = runtime.translation
        if translation is None:
            return _error(550, "translation is not configured")
        try:
            languages = await translation.translator.languages()
        except TranslationUnavailable as exc:
            return _error(550, f"translation provider unavailable: {exc}")
        except TranslationTemporarilyUnavailable as exc:
            return _error(500, str(exc))
        return languages.as_talk()

    @app.post("/api/v1/translation/set-target-language", response_model=None)
    async def set_target_language(body: SetTargetLanguageBody) -> JSONResponse:
        command = SetTargetLanguage(body.roomToken, body.ncSessionId, body.langId)
        return _answer(await runtime.submit(command))

    @app.post("/api/v1/call/leave", response_model=None)
    async def leave(body: LeaveBody) -> JSONResponse:
        return _answer(await runtime.submit(Leave(body.roomToken)))

    # --- operations ---------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        health, inputs = await runtime.assess_health()
        body = {
            "status": health.status,
            "ready": health.ready,
            "reasons": health.reasons,
            "version": settings.app_version,
            "engine": inputs.engine_name,
            "rooms": len(inputs.rooms),
            "speakers": inputs.speakers_active,
            "speakers_connected": sum(room.speakers_connected for room in inputs.rooms),
            "speakers_cap": inputs.speakers_cap,
            "speakers_refused": inputs.speakers_refused,
            "targets": sum(room.targets for room in inputs.rooms),
            "rss_bytes": inputs.rss_bytes,
            "uptime_seconds": round(time.time() - runtime.started_at, 1),
        }
        if inputs.cluster is not None:
            body["cluster"] = {
                "replica": inputs.cluster.replica,
                "nats": "connected" if inputs.cluster.connected else "disconnected",
                "rooms_owned": inputs.cluster.rooms_owned,
                "rooms_without_lease": inputs.cluster.rooms_unleased,
                "replicas": inputs.cluster.replicas,
            }
        if inputs.workers is not None:
            body["workers"] = _workers_body(inputs.workers)
        return JSONResponse(body, status_code=503 if health.status == "failing" else 200)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        health, _ = await runtime.assess_health()
        return JSONResponse(
            {"ready": health.ready, "reasons": health.reasons},
            status_code=200 if health.ready else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await runtime.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(
        AppApiAuth,
        app_id=settings.app_id,
        secret=settings.app_secret.get_secret_value(),
        open_paths=OPEN_PATHS,
    )
    return app


async def _translation_languages(translation: TranslationSetup | None) -> TranslationLanguages | None:
    """The provider's languages, or None while translation is off (no provider,
    Nextcloud unreachable, or no answer within CAPABILITY_CHECK_SECONDS)."""
    if translation is None:
        return None
    try:
        async with asyncio.timeout(CAPABILITY_CHECK_SECONDS):
            languages = await translation.translator.languages()
    except (TranslationUnavailable, TranslationTemporarilyUnavailable, TimeoutError):
        return translation.translator.cached()
    return languages if languages.target else None


def _workers_body(state: WorkersState) -> dict[str, object]:
    return {
        "count": len(state.workers),
        "ready": state.ready,
        "restarts": sum(worker.restarts for worker in state.workers),
        "rooms_reopening": state.rooms_reopening,
        "processes": [
            {
                "worker": worker.index,
                "pid": worker.pid,
                "state": worker.state,
                "answering": worker.answering,
                "rooms": worker.rooms,
                "speakers": worker.speakers,
                "restarts": worker.restarts,
                "last_exit": worker.last_exit,
                "rss_bytes": worker.rss_bytes,
            }
            for worker in state.workers
        ],
    }


def _languages(languages: Mapping[str, Language]) -> dict[str, object]:
    return {code: lang.as_talk_entry() for code, lang in languages.items()}
