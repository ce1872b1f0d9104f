"""End to end with real parts: a private Janus (the SFU), publishers reading
recorded speech into it, the HPB emulator bridging ``requestoffer`` to Janus,
the service as an internal client, and the embedded recognizer producing
real text. Skipped loudly where Janus cannot run."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiortc import RTCIceServer

from live_transcription.api.app import Runtime
from live_transcription.config import load_settings
from live_transcription.service import running_service
from live_transcription.sim.bridge import JanusBridge
from live_transcription.sim.client import SimClient
from live_transcription.sim.demo import bundled_speech
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.sim.janus_process import JanusProcess
from live_transcription.sim.publisher import WavAudioTrack
from tests.janus_support import janus_fixture  # noqa: F401 - the fixture that skips loudly
from tests.waiting import until

pytestmark = pytest.mark.e2e
ROOM = "e2eroom"
KEY_WORDS = {
    "speech_1": {"quick", "fox", "lazy", "dog", "report", "finance", "friday"},
    "speech_2": {"morning", "meeting", "minutes", "call"},
}


async def no_ice_servers() -> list[RTCIceServer]:
    return []


def words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@dataclass
class E2E:
    hpb: HpbEmulator
    runtime: Runtime
    tracks: dict[str, WavAudioTrack]
    speech: dict[str, str]  # session id -> fixture name


@pytest.fixture
async def e2e(janus: JanusProcess) -> AsyncIterator[E2E]:
    wavs = bundled_speech()
    assert len(wavs) >= 2, "the bundled speech is missing"
    secret = secrets.token_hex(8)
    backend = "http://backend.invalid"
    async with JanusBridge(janus.ws_url) as bridge, HpbEmulator(secret, backend, bridge=bridge) as hpb:
        tracks: dict[str, WavAudioTrack] = {}
        speech: dict[str, str] = {}
        for index, wav in enumerate(wavs[:2]):
            session = f"speaker-{index + 1}"
            publisher = await bridge.add_publisher(session, wav, autoplay=False, start_delay_s=0.5)
            tracks[session] = publisher.track
            speech[session] = wav.stem
            await hpb.add_participant(
                ROOM, session_id=session, nextcloud_session_id=f"talk-{session}", in_call=7
            )
        settings = load_settings(
            LT_HPB_URL=hpb.url,
            LT_INTERNAL_SECRET=secret,
            NEXTCLOUD_URL=backend,
            LT_STT_ENGINE="embedded",
            APP_SECRET="x",
            LT_ROOM_LINGER_SECONDS=1,
        )
        async with running_service(settings, ice_servers=no_ice_servers) as runtime:
            yield E2E(hpb, runtime, tracks, speech)


def finals(messages: list[dict[str, Any]], speaker: str) -> list[str]:
    return [m["message"] for m in messages if m["speakerSessionId"] == speaker and m["final"]]


async def test_real_speech_through_janus_becomes_captions(e2e: E2E) -> None:
    manager = e2e.runtime.manager
    async with (
        SimClient(e2e.hpb.url, ROOM, "talk-viewer") as viewer,
        SimClient(e2e.hpb.url, ROOM, "talk-quitter") as quitter,
        SimClient(e2e.hpb.url, ROOM, "talk-bystander") as bystander,
    ):
        await manager.transcribe(ROOM, "talk-viewer", True, "en")
        await manager.transcribe(ROOM, "talk-quitter", True, "en")
        await until(lambda: manager.rooms() != [] and manager.rooms()[0].speakers == 2, deadline=60)
        # one viewer opts out before anybody speaks: it must receive nothing more
        await manager.transcribe(ROOM, "talk-quitter", False)
        await until(lambda: manager.rooms()[0].targets == 1)
        quitter_before = len(quitter.transcripts())
        # speech sent before a speaker's media connection is up is lost, as in any call
        await until(lambda: manager.rooms()[0].speakers_connected == 2, deadline=60)
        for track in e2e.tracks.values():
            track.play()
        for track in e2e.tracks.values():
            await until(track.finished.is_set, deadline=60)

        def heard_all() -> bool:
            messages = viewer.transcripts()
            for session, name in e2e.speech.items():
                spoken = words_of(" ".join(finals(messages, session)))
                if len(spoken & KEY_WORDS[name]) < len(KEY_WORDS[name]) - 1:
                    return False
            return True

        await viewer.wait_for(heard_all, deadline=90)
        messages = viewer.transcripts()
        for session, name in e2e.speech.items():
            mine = [m for m in messages if m["speakerSessionId"] == session]
            assert mine[0]["final"] is False, "partials precede the final"
            assert {m["langId"] for m in mine} == {"en"}
            heard = words_of(" ".join(finals(messages, session)))
            missing = KEY_WORDS[name] - heard
            assert len(missing) <= 1, f"{name}: missing {missing} in {finals(messages, session)}"
        assert len(quitter.transcripts()) == quitter_before
        assert bystander.transcripts() == []

        # a speaker who leaves is cleaned up
        await e2e.hpb.set_in_call("speaker-2", 0)
        await until(lambda: manager.rooms()[0].speakers == 1)
        # the room closes after its last target
        await manager.transcribe(ROOM, "talk-viewer", False)
        await until(lambda: manager.rooms() == [], deadline=30)
        assert manager.admission.active == 0
