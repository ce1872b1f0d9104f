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
from live_transcription.rooms import speaker as speaker_module
from live_transcription.rooms.speaker import Speaker
from live_transcription.service import running_service
from live_transcription.sim.client import SimClient
from live_transcription.sim.direct_bridge import DirectBridge
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.sim.publisher import write_wav
from live_transcription.stt.modal import ModalEngine
from live_transcription.stt.pool import PoolOptions
from live_transcription.stt.remote import RemoteOptions
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
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake: FakeModalKyutai,
    options: RemoteOptions | None = None,
    pool: PoolOptions | None = None,
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
            engine = ModalEngine(
                fake.url,
                {"Modal-Key": KEY, "Modal-Secret": SECRET},
                options=options,
                # connections open when speech needs them, so each utterance
                # after the server closed the idle one makes a handshake
                pool=pool or PoolOptions(headroom=0),
            )
            async with (
                running_service(settings, engine=engine, ice_servers=no_ice_servers) as runtime,
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


async def test_stt_refusing_with_401_then_recovering_captions_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient 401 (the provider's auth hiccups): the speaker backs off,
    then captions resume once the server accepts the credentials again."""
    monkeypatch.setattr(speaker_module, "ENGINE_RETRY_SECONDS", 0.2)
    options = RemoteOptions(auth_retry_seconds=0.2)
    # no warm connection is kept: the next utterance must handshake (and meet the 401)
    pool = PoolOptions(headroom=0, surplus_seconds=0.3)
    async with (
        FakeModalKyutai() as fake,
        stt_call(tmp_path, monkeypatch, fake, options, pool) as call,
    ):
        call.say([0, 1])
        await call.viewer.wait_for(lambda: call.final_words() == ["alpha", "bravo"], deadline=DEADLINE)
        await until(lambda: fake.client_closes >= 1, deadline=DEADLINE)  # idle: the socket is closed
        fake.key = "revoked"
        refused = {"engine": "modal", "event": "fatal-auth"}
        refusals = metric(STT_EVENTS, refused)
        call.say([2, 3])  # refused: these words are lost, the speaker backs off
        await until(lambda: metric(STT_EVENTS, refused) > refusals, deadline=DEADLINE)
        fake.key = KEY  # the provider accepts us again
        speaker = call.speaker()
        await until(lambda: speaker.engine_failure is None and speaker._stream is not None, DEADLINE)
        call.say([4, 5])
        await call.viewer.wait_for(lambda: call.final_words()[-2:] == ["echo", "foxtrot"], DEADLINE)
        assert "charlie" not in call.final_words()
        assert call.runtime.health()[0].status == "ok"


async def test_an_engine_that_stops_answering_is_left_while_the_speaker_talks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first connection takes audio and never answers. The speaker talks
    on without a pause: after the stall bound the stream replays the audio on
    a new connection, the words arrive before any pause, the stall is counted,
    and after the pause the viewer has every word once."""
    options = RemoteOptions(stall_seconds=0.5)
    async with (
        FakeModalKyutai(silent_connections=frozenset({1})) as fake,
        stt_call(tmp_path, monkeypatch, fake, options, PoolOptions(headroom=0)) as call,
    ):
        stalled = {"engine": "modal", "event": "stalled"}
        stalls_before = metric(STT_EVENTS, stalled)
        speaker = call.speaker()
        ids = list(range(8))
        for frame in speech(ids):  # 32 frames: the words of 0-5 are due within them
            speaker._on_frame(frame)
        await until(lambda: speaker.words >= 6, deadline=DEADLINE)  # no pause yet
        assert metric(STT_EVENTS, stalled) == stalls_before + 1
        assert fake.connections == 2 and 1 not in fake.words_by_connection
        speaker._on_speech_end()
        expected = [VOCABULARY[w] for w in ids]
        await call.viewer.wait_for(lambda: len(call.final_words()) >= len(expected), deadline=DEADLINE)
        assert call.final_words() == expected, "a word was lost or repeated"
        assert speaker.stt_reconnecting is False
        assert call.runtime.health()[0].status == "ok"


async def test_after_our_hpb_session_expired_an_stt_drop_loses_no_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume is refused (new HPB session, the same participants), then the
    STT server drops the new stream mid-word: the viewer gets every word."""
    async with (
        FakeModalKyutai(drop_after_frames=10) as fake,
        stt_call(tmp_path, monkeypatch, fake) as call,
    ):
        first = call.speaker()
        [ours] = call.hpb.sessions_in_room(ROOM, internal=True)
        call.hpb.refuse_resume = True
        call.hpb.drop(ours)
        await call.hpb.wait_for(lambda: call.hpb.sessions_in_room(ROOM, internal=True) not in ([], [ours]))
        call.hpb.refuse_resume = False
        await until(
            lambda: (
                first.end_reason is not None
                and any(
                    s is not first and s.end_reason is None and s._stream is not None for s in call.speakers
                )
            ),
            deadline=DEADLINE,
        )
        await until(lambda: call.runtime.manager.rooms()[0].pending_targets == 0, deadline=DEADLINE)
        words = list(range(8))
        call.say(words)
        expected = [VOCABULARY[w] for w in words]
        await call.viewer.wait_for(lambda: len(call.final_words()) >= len(expected), deadline=DEADLINE)
        assert call.final_words() == expected, "a word was lost or repeated"
        assert fake.drops == 1
