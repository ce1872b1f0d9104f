"""The benchmark's fake STT over TLS, reached by the service's production
engine clients trusting its CA through ``SSL_CERT_FILE`` only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bench.stt_server import open_server, server_tls
from bench.tls import make_local_tls

from live_transcription.config import load_settings
from live_transcription.stt.base import StreamError, SttEvent
from live_transcription.stt.factory import create_engine
from live_transcription.stt.modal import ModalEngine
from live_transcription.stt.remote import RemoteOptions
from tests.fakes.streams import collect_until, count_words, words

VOICED = np.full(1920, 0.1, dtype=np.float32)
SILENT = np.zeros(1920, dtype=np.float32)


def _settings(engine: str, url: str) -> dict[str, str]:
    if engine == "modal":
        return {"LT_STT_ENGINE": "modal", "LT_MODAL_URL": url, "MODAL_KEY": "k", "MODAL_SECRET": "s"}
    return {"LT_STT_ENGINE": "moshi", "LT_MOSHI_URL": url, "LT_MOSHI_API_KEY": "k"}


@pytest.mark.parametrize("engine", ["modal", "moshi"])
async def test_the_production_client_gets_words_over_verified_tls_and_the_fake_counts_the_load(
    engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = make_local_tls(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))
    running = await open_server(engine, server_tls(tls.cert_file, tls.key_file), key="k", secret="s")
    try:
        assert running.url.startswith("wss://127.0.0.1:")
        # no warm headroom: the one connection the fake counts is the leased one
        stt = create_engine(load_settings(**_settings(engine, running.url), LT_STT_POOL_HEADROOM="0"))
        try:
            async with stt.open_stream("en") as stream:
                for frame in [SILENT, *[VOICED] * 8, SILENT]:
                    stream.push(frame)
                events = await collect_until(stream, count_words(2))
                assert words(events) == ["w4", "w8"]
                snapshot = running.load.snapshot(0.0, reset=False)
                assert snapshot["connections_opened"] == 1
                assert snapshot["open_now"] == 1
                assert snapshot["words"] == snapshot["words_total"] == 2
                assert snapshot["voiced_seconds"] == pytest.approx(8 * 0.08)
                assert snapshot["audio_seconds"] >= 9 * 0.08
        finally:
            await stt.aclose()
    finally:
        running.server.close()
        await running.server.wait_closed()


async def test_tls_is_verified_a_server_the_client_does_not_trust_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusted = make_local_tls(tmp_path / "trusted")
    other = make_local_tls(tmp_path / "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted.ca_file))
    running = await open_server("modal", server_tls(other.cert_file, other.key_file), key="k", secret="s")
    try:
        # the default SSL context (no ssl_context given), short waits on close
        stt = ModalEngine(
            running.url,
            {"Modal-Key": "k", "Modal-Secret": "s"},
            options=RemoteOptions(close_grace_seconds=0.5, backoff_initial_seconds=0.1, backoff_jitter=0.0),
        )
        try:
            async with stt.open_stream("en") as stream:
                stream.push(VOICED)

                def refused(events: list[SttEvent]) -> bool:
                    return any(isinstance(e, StreamError) for e in events)

                events = await collect_until(stream, refused)
                error = next(e for e in events if isinstance(e, StreamError))
                assert "CERTIFICATE_VERIFY_FAILED" in error.message
                assert running.load.connections_opened == 0
        finally:
            await stt.aclose()
    finally:
        running.server.close()
        await running.server.wait_closed()
