"""STT faults through the whole service (HPB emulator, rooms, speakers, the
Modal engine) against the fake Modal-Kyutai server: the connection dropped
mid-word, and the credentials revoked.

The fake recognises exact synthetic frames (tests/fakes), which a lossy
Opus round trip cannot carry, so the frames are handed to each speaker where
its audio path hands them on (``Speaker._on_frame`` / ``_on_speech_end``);
everything from there on is the real service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from live_transcription import service as service_module
from live_transcription.api.app import Runtime
from live_transcription.config import load_settings
from live_transcription.rooms.speaker import Speaker
from live_transcription.service import running_service
from live_transcription.sim.client import SimClient
from live_transcription.sim.direct_bridge import DirectBridge
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.sim.publisher import write_wav
from tests.fakes import VOCABULARY, speech
from tests.fakes.modal_kyutai import FakeModalKyutai
from tests.integration.test_faults_support import (
    BACKEND,
    DEADLINE,
    PeerCensus,
    assert_no_tasks_left,
    metric,
    no_ice_servers,
)
from tests.waiting import until, wait_event

ROOM = "sttroom"
KEY, SECRET = "test-key", "test-secret"
STT_EVENTS = "live_transcription_stt_stream_events_total"


@dataclass
class SttCall:
    fake: FakeModalKyutai
    hpb: HpbEmulator
    runtime: Runtime
    speakers: list[Speaker]
    viewer: SimClient

    def speaker(self) -> Speaker:
        live = [s for s in self.speakers if s.end_reason is None]
        assert len(live) == 1
        return live[-1]

    def say(self, word_ids: list[int]) -> None:
        speaker = self.speaker()
        for frame in speech(word_ids):
            speaker._on_frame(frame)
        speaker._on_speech_end()

    def final_words(self) -> list[str]:
        return " ".join(m["message"] for m in self.viewer.transcripts() if m["final"]).split()


@asynccontextmanager
async def stt_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeModalKyutai
) -> AsyncIterator[SttCall]:
    census = PeerCensus()
    census.install(monkeypatch)
    created: list[Speaker] = []

    class RecordedSpeaker(Speaker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(service_module, "Speaker", RecordedSpeaker)

    tasks_before = set(asyncio.all_tasks())
    bridge = DirectBridge()
    silence = tmp_path / "silence.wav"
    write_wav(silence, np.zeros(48_000, dtype=np.int16), 48_000)
    bridge.add_publisher("alice", silence, autoplay=False)  # media flows, no speech
    try:
        async with HpbEmulator("hpb-secret-123", BACKEND, bridge=bridge) as hpb:
            await hpb.add_participant(ROOM, session_id="alice", in_call=7)
            settings = load_settings(
                LT_HPB_URL=hpb.url,
                LT_INTERNAL_SECRET="hpb-secret-123",
                NEXTCLOUD_URL=BACKEND,
                APP_SECRET="x",
                LT_STT_ENGINE="modal",
                LT_MODAL_URL=fake.url,
                MODAL_KEY=KEY,
                MODAL_SECRET=SECRET,
                # connections open when speech needs them, so each utterance
                # after the server closed the idle one makes a handshake
                LT_STT_POOL_HEADROOM="0",
            )
            async with (
                running_service(settings, ice_servers=no_ice_servers) as runtime,
                SimClient(hpb.url, ROOM, "talk-viewer") as viewer,
            ):
                await runtime.manager.transcribe(ROOM, "talk-viewer", True, "en")
                await until(lambda: any(s._stream is not None for s in created), deadline=DEADLINE)
                yield SttCall(fake, hpb, runtime, created, viewer)
                await runtime.manager.leave(ROOM)
                await until(lambda: runtime.manager.rooms() == [], deadline=DEADLINE)
            assert census.open == 0
            assert metric("live_transcription_stt_streams_reconnecting") == 0
            await hpb.wait_for(lambda: hpb.open_connections == 0, DEADLINE)
    finally:
        await bridge.aclose()
    await assert_no_tasks_left(tasks_before)


async def test_stt_connection_dropped_mid_word_loses_no_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    words = list(range(8))
    # word 2 occupies frames 8-10: the first connection is cut inside it
    async with (
        FakeModalKyutai(drop_after_frames=10) as fake,
        stt_call(tmp_path, monkeypatch, fake) as call,
    ):
        lost_before = metric(
            "live_transcription_stt_stream_events_total", {"engine": "modal", "event": "connection"}
        )
        call.say(words)
        expected = [VOCABULARY[w] for w in words]
        await call.viewer.wait_for(lambda: len(call.final_words()) >= len(expected), deadline=DEADLINE)
        assert call.final_words() == expected, "a word was lost or repeated"
        assert fake.drops == 1 and fake.connections >= 2
        assert metric(STT_EVENTS, {"engine": "modal", "event": "connection"}) > lost_before
        assert call.speaker().stt_reconnecting is False
        assert call.runtime.health()[0].status == "ok"


async def test_stt_credentials_revoked_fail_clearly_without_a_reconnect_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        FakeModalKyutai(idle_close_seconds=1.0) as fake,
        stt_call(tmp_path, monkeypatch, fake) as call,
    ):
        fatal_before = metric(
            "live_transcription_stt_stream_events_total", {"engine": "modal", "event": "fatal-auth"}
        )
        call.say([0, 1])  # 8 frames: works
        await call.viewer.wait_for(lambda: call.final_words() == ["alpha", "bravo"], deadline=DEADLINE)

        await wait_event(fake.idle_closed, DEADLINE)  # the server closed the idle socket
        fake.key = "revoked"  # the next handshake gets HTTP 401
        call.say([2, 3, 4])  # the stream connects again for this speech: refused
        speaker = call.speaker()
        await until(lambda: speaker.engine_failure is not None, deadline=DEADLINE)
        assert "rejected the credentials" in (speaker.engine_failure or "")
        assert fake.rejected == 1
        assert metric(STT_EVENTS, {"engine": "modal", "event": "fatal-auth"}) == fatal_before + 1
        # no hot loop: a new stream (language change) does not even try the server
        handshakes = fake.handshakes
        await call.runtime.manager.set_language(ROOM, "fr")
        await until(lambda: speaker.engine_failure is not None and speaker._stream is None, deadline=DEADLINE)
        assert fake.handshakes == handshakes
        assert speaker.stt_reconnecting is False
        # health says why, and Talk gets HTTP 550 while it lasts
        health, _ = call.runtime.health()
    # outside the service's task groups, which would wrap pytest's outcome
    assert health.status == "failing"
    assert any("credentials" in reason for reason in health.reasons)


async def test_stt_server_gone_marks_the_stream_reconnecting_in_health(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeModalKyutai(idle_close_seconds=1.0)
    async with fake, stt_call(tmp_path, monkeypatch, fake) as call:
        call.say([0, 1])
        await call.viewer.wait_for(lambda: call.final_words() == ["alpha", "bravo"], deadline=DEADLINE)
        await wait_event(fake.idle_closed, DEADLINE)
        await fake.__aexit__(None, None, None)  # the STT server goes away for good
        call.say([2, 3])
        speaker = call.speaker()
        await until(lambda: speaker.stt_reconnecting, deadline=DEADLINE)
        assert metric("live_transcription_stt_streams_reconnecting") == 1
        health, _ = call.runtime.health()
        assert health.status == "degraded"
        assert "1 STT stream(s) reconnecting" in health.reasons
        assert call.runtime.manager.rooms()[0].speakers_reconnecting == 1
