"""Settings from the environment, validated once at start.

Variable names follow the official live_transcription ExApp and AppAPI
(``APP_ID``, ``APP_SECRET``, ``NEXTCLOUD_URL``, ``LT_HPB_URL``, ...). Every
variable is documented in the README; keep both in step.
"""

from __future__ import annotations

import os
from enum import StrEnum
from typing import Any, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Engine(StrEnum):
    MODAL = "modal"
    MOSHI = "moshi"
    EMBEDDED = "embedded"
    INSTANT = "instant"
    """A zero-delay stand-in that turns audio into numbered words: for
    benchmarks and tests of the service's own cost, never for real calls."""


MAX_WORKERS = 256


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


class ConfigError(Exception):
    """The environment is wrong; the message says which variable and why."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=True, extra="ignore", populate_by_name=True
    )

    # --- AppAPI / ExApp ---------------------------------------------------
    app_id: str = Field("live_transcription", alias="APP_ID")
    app_secret: SecretStr = Field(SecretStr(""), alias="APP_SECRET")
    app_version: str = Field("0.1.0", alias="APP_VERSION")
    app_host: str = Field("0.0.0.0", alias="APP_HOST")
    app_port: int = Field(23000, alias="APP_PORT", ge=1, le=65535)
    nextcloud_url: str = Field("", alias="NEXTCLOUD_URL")

    # --- High-performance backend -------------------------------------------
    hpb_url: str = Field("", alias="LT_HPB_URL")
    internal_secret: SecretStr = Field(SecretStr(""), alias="LT_INTERNAL_SECRET")
    hpb_backend_url: str = Field(
        "",
        alias="LT_HPB_BACKEND_URL",
        description="backend URL sent in the internal hello; defaults to NEXTCLOUD_URL",
    )
    skip_cert_verify: bool = Field(False, alias="SKIP_CERT_VERIFY")

    # --- Speech-to-text -------------------------------------------------------
    stt_engine: Engine | None = Field(None, alias="LT_STT_ENGINE")
    modal_workspace: str = Field("", alias="MODAL_WORKSPACE")
    modal_key: SecretStr = Field(SecretStr(""), alias="MODAL_KEY")
    modal_secret: SecretStr = Field(SecretStr(""), alias="MODAL_SECRET")
    modal_app_label: str = Field("kyutai-stt-rust-kyutaisttrustservice-serve", alias="LT_MODAL_APP")
    modal_url: str = Field("", alias="LT_MODAL_URL")
    moshi_url: str = Field("", alias="LT_MOSHI_URL")
    moshi_api_key: SecretStr = Field(SecretStr(""), alias="LT_MOSHI_API_KEY")
    embedded_threads: int = Field(1, alias="LT_EMBEDDED_THREADS", ge=1, le=64)
    embedded_model_dir: str = Field("", alias="LT_EMBEDDED_MODEL_DIR")
    stt_pool_headroom: int = Field(1, alias="LT_STT_POOL_HEADROOM", ge=0, le=1000)
    stt_pool_max: int = Field(512, alias="LT_STT_POOL_MAX", ge=1, le=10_000)
    stt_stall_seconds: float = Field(4.0, alias="LT_STT_STALL_SECONDS", gt=0, le=300)

    # --- Rooms and captions -----------------------------------------------------
    room_linger_seconds: float = Field(60.0, alias="LT_ROOM_LINGER_SECONDS", ge=0)
    partial_interval_ms: int = Field(300, alias="LT_PARTIAL_INTERVAL_MS", ge=0, le=10_000)
    max_caption_seconds: float = Field(10.0, alias="LT_MAX_CAPTION_SECONDS", gt=0)
    max_speakers_per_room: int = Field(50, alias="LT_MAX_SPEAKERS_PER_ROOM", ge=1)
    max_speakers: int = Field(500, alias="LT_MAX_SPEAKERS", ge=1)
    max_rooms: int = Field(200, alias="LT_MAX_ROOMS", ge=1)
    max_targets_per_room: int = Field(1000, alias="LT_MAX_TARGETS_PER_ROOM", ge=1)
    memory_limit_mb: int = Field(0, alias="LT_MEMORY_LIMIT_MB", ge=0)
    default_language: str = Field("en", alias="LT_DEFAULT_LANGUAGE")

    # --- Live translation (Nextcloud Task Processing; needs NEXTCLOUD_URL and APP_SECRET) ---
    translation_timeout_seconds: float = Field(15.0, alias="LT_TRANSLATION_TIMEOUT_SECONDS", gt=0, le=300)
    translation_languages_ttl_seconds: float = Field(
        300.0, alias="LT_TRANSLATION_LANGUAGES_TTL_SECONDS", gt=0
    )
    translation_max_tasks: int = Field(16, alias="LT_TRANSLATION_MAX_TASKS", ge=1, le=256)
    translation_max_tasks_per_room: int = Field(8, alias="LT_TRANSLATION_MAX_TASKS_PER_ROOM", ge=1, le=256)
    event_loop: str = Field("uvloop", alias="LT_EVENT_LOOP", pattern="^(uvloop|asyncio)$")
    udp_tick_ms: int = Field(10, alias="LT_UDP_TICK_MS", ge=0, le=40)
    # --- HTTP front (slow and hostile clients, shutdown) ---------------------------
    http_max_connections: int = Field(1000, alias="LT_HTTP_MAX_CONNECTIONS", ge=1)
    http_header_timeout: float = Field(10.0, alias="LT_HTTP_HEADER_TIMEOUT_SECONDS", gt=0, le=300)
    http_body_timeout: float = Field(10.0, alias="LT_HTTP_BODY_TIMEOUT_SECONDS", gt=0, le=300)
    http_keep_alive: int = Field(5, alias="LT_HTTP_KEEP_ALIVE_SECONDS", ge=1, le=300)
    http_shutdown_grace: int = Field(3, alias="LT_HTTP_SHUTDOWN_GRACE_SECONDS", ge=0, le=15)
    # --- Cluster of replicas through NATS (off unless LT_NATS_URL is set) ------------
    nats_url: str = Field("", alias="LT_NATS_URL")
    replica_id: str = Field(
        "", alias="LT_REPLICA_ID", pattern=r"^[A-Za-z0-9_-]{0,64}$", description="default: host-pid-random"
    )
    cluster_lease_ttl: float = Field(15.0, alias="LT_CLUSTER_LEASE_TTL_SECONDS", ge=3, le=300)
    cluster_name: str = Field("live_transcription", alias="LT_CLUSTER_NAME", pattern=r"^[A-Za-z0-9_-]{1,50}$")
    cluster_connect_timeout: float = Field(30.0, alias="LT_CLUSTER_CONNECT_TIMEOUT_SECONDS", gt=0, le=600)
    # --- Worker processes on this machine -------------------------------------------
    workers: int | None = Field(
        None,
        alias="LT_WORKERS",
        ge=1,
        le=MAX_WORKERS,
        description="default: the cores this process may use (at most LT_MAX_ROOMS and LT_MAX_SPEAKERS)",
    )
    log_level: str = Field("INFO", alias="LT_LOG_LEVEL")
    log_format: str = Field("json", alias="LT_LOG_FORMAT", pattern="^(json|text)$")

    @field_validator("nextcloud_url", "hpb_url", "hpb_backend_url", "modal_url", "moshi_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.strip().rstrip("/")

    @field_validator("nats_url")
    @classmethod
    def _nats_scheme(cls, value: str) -> str:
        value = value.strip()
        for url in filter(None, (part.strip() for part in value.split(","))):
            if not url.startswith(("nats://", "tls://")) or len(url.split("://", 1)[1]) == 0:
                raise ValueError("must be nats://host:port or tls://host:port (comma-separated for several)")
        return value

    @field_validator("hpb_url")
    @classmethod
    def _hpb_scheme(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError("must start with http://, https://, ws:// or wss://")
        return value

    @field_validator("modal_url", "moshi_url")
    @classmethod
    def _ws_scheme(cls, value: str) -> str:
        if value and not value.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @model_validator(mode="after")
    def _engine_settings(self) -> Self:
        if self.stt_engine is None:
            modal_set = bool(
                self.modal_workspace
                or self.modal_key.get_secret_value()
                or self.modal_secret.get_secret_value()
            )
            self.stt_engine = Engine.MODAL if modal_set else Engine.EMBEDDED
        if self.stt_engine is Engine.MODAL and not (self.modal_url or self.modal_workspace):
            raise ValueError(
                "LT_STT_ENGINE=modal needs MODAL_WORKSPACE (with MODAL_KEY and MODAL_SECRET) or LT_MODAL_URL"
            )
        modal_credentials = bool(self.modal_key.get_secret_value() and self.modal_secret.get_secret_value())
        if (
            self.stt_engine is Engine.MODAL
            and self.modal_workspace
            and not self.modal_url
            and not modal_credentials
        ):
            raise ValueError("MODAL_WORKSPACE is set: MODAL_KEY and MODAL_SECRET are needed too")
        if self.stt_engine is Engine.MOSHI and not self.moshi_url:
            raise ValueError("LT_STT_ENGINE=moshi needs LT_MOSHI_URL (ws://host:port)")
        return self

    @model_validator(mode="after")
    def _worker_count(self) -> Self:
        # each worker gets a share of the room and speaker caps: at least one of each
        most = min(self.max_rooms, self.max_speakers)
        if self.workers is None:
            self.workers = min(usable_cores(), most, MAX_WORKERS)
        elif self.workers > most:
            raise ValueError(
                f"LT_WORKERS={self.workers} is more than LT_MAX_ROOMS ({self.max_rooms}) or "
                f"LT_MAX_SPEAKERS ({self.max_speakers}): each worker needs a share of both"
            )
        return self

    # --- derived ------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        assert self.stt_engine is not None  # set by the validator
        return self.stt_engine

    @property
    def worker_count(self) -> int:
        """Worker processes: 1 is the single process (no supervisor)."""
        assert self.workers is not None  # set by the validator
        return self.workers

    @property
    def hpb_ws_url(self) -> str:
        """``LT_HPB_URL`` as a WebSocket URL ending in ``/spreed``."""
        url = self.hpb_url
        if url.startswith("https://"):
            url = "wss://" + url.removeprefix("https://")
        elif url.startswith("http://"):
            url = "ws://" + url.removeprefix("http://")
        if not url.endswith("/spreed"):
            url += "/spreed"
        return url

    @property
    def backend_url(self) -> str:
        return self.hpb_backend_url or self.nextcloud_url

    @property
    def modal_stream_url(self) -> str:
        if self.modal_url:
            return self.modal_url
        return f"wss://{self.modal_workspace}--{self.modal_app_label}.modal.run/v1/stream"

    def secret_values(self) -> list[str]:
        """The secrets' values, for the logs to mask."""
        return [
            secret.get_secret_value()
            for secret in (
                self.app_secret,
                self.internal_secret,
                self.modal_key,
                self.modal_secret,
                self.moshi_api_key,
            )
        ]

    def missing_for_translation(self) -> list[str]:
        """Variables that live translation needs and that are not set."""
        missing = []
        if not self.nextcloud_url:
            missing.append("NEXTCLOUD_URL")
        if not self.app_secret.get_secret_value():
            missing.append("APP_SECRET")
        return missing

    def missing_for_calls(self) -> list[str]:
        """Variables that joining a call needs and that are not set."""
        missing = []
        if not self.hpb_url:
            missing.append("LT_HPB_URL")
        if not self.internal_secret.get_secret_value():
            missing.append("LT_INTERNAL_SECRET")
        if not self.backend_url:
            missing.append("NEXTCLOUD_URL")
        return missing


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus ``overrides``, by variable name) or raise
    ``ConfigError`` with one line per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "configuration"
            lines.append(f"{where}: {error['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
