"""The engine factory builds the remote engines from settings."""

from __future__ import annotations

from live_transcription.config import load_settings
from live_transcription.stt.factory import create_engine
from live_transcription.stt.modal import ModalEngine
from live_transcription.stt.moshi import MoshiEngine


def test_modal_from_workspace_sends_both_headers() -> None:
    settings = load_settings(MODAL_WORKSPACE="acme", MODAL_KEY="k", MODAL_SECRET="s")
    engine = create_engine(settings)
    assert isinstance(engine, ModalEngine)
    assert engine.url == ("wss://acme--kyutai-stt-rust-kyutaisttrustservice-serve.modal.run/v1/stream")
    assert engine.headers == {"Modal-Key": "k", "Modal-Secret": "s"}
    assert set(engine.languages()) == {"en", "fr"}


def test_modal_url_override_without_credentials_sends_no_headers() -> None:
    settings = load_settings(LT_STT_ENGINE="modal", LT_MODAL_URL="ws://127.0.0.1:9/v1/stream")
    engine = create_engine(settings)
    assert isinstance(engine, ModalEngine)
    assert engine.url == "ws://127.0.0.1:9/v1/stream"
    assert engine.headers == {}


def test_moshi_path_and_key_header() -> None:
    settings = load_settings(
        LT_STT_ENGINE="moshi", LT_MOSHI_URL="ws://127.0.0.1:8080", LT_MOSHI_API_KEY="secret"
    )
    engine = create_engine(settings)
    assert isinstance(engine, MoshiEngine)
    assert engine.url == "ws://127.0.0.1:8080/api/asr-streaming"
    assert engine.headers == {"kyutai-api-key": "secret"}
    # moshi-server closes after 20 s with nothing received: idle pooled
    # connections get their keep-alive frame well before
    assert engine.pool_options.keepalive_seconds < 20


def test_pool_settings_reach_the_remote_engines() -> None:
    settings = load_settings(
        LT_STT_ENGINE="modal",
        LT_MODAL_URL="ws://127.0.0.1:9/v1/stream",
        LT_STT_POOL_HEADROOM="3",
        LT_STT_POOL_MAX="7",
    )
    engine = create_engine(settings)
    assert isinstance(engine, ModalEngine)
    assert (engine.pool_options.headroom, engine.pool_options.max_connections) == (3, 7)
    assert engine.pool_options.keepalive_seconds < 30  # Modal: 30 s without a binary frame
