"""Settings from the environment: defaults, engine choice, clear errors."""

from __future__ import annotations

import os
import re

import pytest

from live_transcription import cli, config
from live_transcription.config import ConfigError, Engine, load_settings

ENV_NAMES = [
    "APP_ID",
    "APP_SECRET",
    "APP_VERSION",
    "APP_HOST",
    "APP_PORT",
    "NEXTCLOUD_URL",
    "LT_HPB_URL",
    "LT_INTERNAL_SECRET",
    "SKIP_CERT_VERIFY",
    "LT_STT_ENGINE",
    "MODAL_WORKSPACE",
    "MODAL_KEY",
    "MODAL_SECRET",
    "LT_MODAL_URL",
    "LT_MOSHI_URL",
    "LT_MOSHI_API_KEY",
    "LT_WORKERS",
    "LT_MAX_ROOMS",
    "LT_MAX_SPEAKERS",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_pick_the_embedded_engine() -> None:
    settings = load_settings()
    assert settings.app_id == "live_transcription"
    assert settings.app_port == 23000
    assert settings.engine is Engine.EMBEDDED
    assert settings.room_linger_seconds == 60
    assert settings.partial_interval_ms == 300
    assert set(settings.missing_for_calls()) == {"LT_HPB_URL", "LT_INTERNAL_SECRET", "NEXTCLOUD_URL"}


def test_modal_credentials_select_modal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_WORKSPACE", "acme")
    monkeypatch.setenv("MODAL_KEY", "k")
    monkeypatch.setenv("MODAL_SECRET", "s")
    settings = load_settings()
    assert settings.engine is Engine.MODAL
    assert (
        settings.modal_stream_url
        == "wss://acme--kyutai-stt-rust-kyutaisttrustservice-serve.modal.run/v1/stream"
    )


def test_modal_url_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LT_STT_ENGINE", "modal")
    monkeypatch.setenv("LT_MODAL_URL", "ws://127.0.0.1:9000/v1/stream")
    assert load_settings().modal_stream_url == "ws://127.0.0.1:9000/v1/stream"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"APP_PORT": "70000"}, "APP_PORT"),
        ({"APP_PORT": "abc"}, "APP_PORT"),
        ({"LT_STT_ENGINE": "whisper"}, "LT_STT_ENGINE"),
        ({"LT_STT_ENGINE": "moshi"}, "LT_MOSHI_URL"),
        ({"LT_STT_ENGINE": "modal"}, "MODAL_WORKSPACE"),
        ({"MODAL_WORKSPACE": "acme"}, "MODAL_KEY and MODAL_SECRET"),
        ({"LT_HPB_URL": "ftp://hpb"}, "LT_HPB_URL"),
        ({"LT_MOSHI_URL": "http://x", "LT_STT_ENGINE": "moshi"}, "LT_MOSHI_URL"),
        ({"SKIP_CERT_VERIFY": "perhaps"}, "SKIP_CERT_VERIFY"),
        ({"LT_MAX_TARGETS_PER_ROOM": "0"}, "LT_MAX_TARGETS_PER_ROOM"),
        ({"LT_HTTP_MAX_CONNECTIONS": "0"}, "LT_HTTP_MAX_CONNECTIONS"),
        ({"LT_HTTP_HEADER_TIMEOUT_SECONDS": "0"}, "LT_HTTP_HEADER_TIMEOUT_SECONDS"),
        ({"LT_HTTP_BODY_TIMEOUT_SECONDS": "-1"}, "LT_HTTP_BODY_TIMEOUT_SECONDS"),
        ({"LT_HTTP_KEEP_ALIVE_SECONDS": "0"}, "LT_HTTP_KEEP_ALIVE_SECONDS"),
        ({"LT_HTTP_SHUTDOWN_GRACE_SECONDS": "60"}, "LT_HTTP_SHUTDOWN_GRACE_SECONDS"),
    ],
)
def test_bad_values_say_which_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert expected in str(info.value)


def test_secrets_never_show_in_errors_or_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_WORKSPACE", "acme")
    monkeypatch.setenv("MODAL_KEY", "very-secret-key")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "very-secret-key" not in str(info.value)
    monkeypatch.setenv("MODAL_SECRET", "very-secret-value")
    monkeypatch.setenv("LT_INTERNAL_SECRET", "internal-secret")
    settings = load_settings()
    assert "very-secret" not in repr(settings)
    assert "internal-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("url", "ws"),
    [
        ("https://cloud.example/standalone-signaling", "wss://cloud.example/standalone-signaling/spreed"),
        ("http://127.0.0.1:8080/", "ws://127.0.0.1:8080/spreed"),
        ("wss://hpb.example/spreed", "wss://hpb.example/spreed"),
    ],
)
def test_hpb_url_becomes_websocket(monkeypatch: pytest.MonkeyPatch, url: str, ws: str) -> None:
    monkeypatch.setenv("LT_HPB_URL", url)
    assert load_settings().hpb_ws_url == ws


def test_workers_default_to_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "usable_cores", lambda: 6)
    assert load_settings().worker_count == 6
    # each worker needs a share of the caps: the default stays within them
    monkeypatch.setenv("LT_MAX_ROOMS", "4")
    assert load_settings().worker_count == 4


def test_usable_cores_is_the_affinity_not_the_machine() -> None:
    assert config.usable_cores() == len(os.sched_getaffinity(0))


def test_lt_workers_is_read_and_the_cli_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LT_WORKERS", "3")
    assert load_settings().worker_count == 3
    assert load_settings(LT_WORKERS=1).worker_count == 1  # what `serve --workers 1` passes
    seen: list[int | None] = []

    def fake_serve(workers: int | None = None) -> int:
        seen.append(workers)
        return 0

    monkeypatch.setattr("live_transcription.api.server.serve", fake_serve)
    assert cli.main(["serve", "--workers", "2"]) == 0
    assert cli.main(["serve"]) == 0
    assert seen == [2, None]
    with pytest.raises(SystemExit):
        cli.main(["serve", "--workers", "0"])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LT_WORKERS": "0"}, "LT_WORKERS"),
        ({"LT_WORKERS": "3", "LT_MAX_ROOMS": "2"}, "LT_WORKERS=3 is more than LT_MAX_ROOMS (2)"),
    ],
)
def test_bad_worker_counts_say_why(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings()
