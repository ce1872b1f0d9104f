"""The whole service over real sockets: HPB emulator, real WebRTC (direct
aiortc senders, no SFU), the real HPB link, rooms and speakers, and the
instant engine so that every utterance's words are known."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiortc import RTCIceServer

from live_transcription.api.app import Runtime
from live_transcription.config import load_settings
from live_transcription.service import running_service
from live_transcription.sim.client import SimClient
from live_transcription.sim.direct_bridge import DirectBridge, DirectPublisher
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.sim.publisher import write_wav
from tests.waiting import until

ROOM = "flowroom"


async def no_ice_servers() -> list[RTCIceServer]:
    return []


def tone(path: Path, seconds: float, freq: float) -> Path:
    t = np.arange(int(48_000 * seconds)) / 48_000
    write_wav(path, (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16), 48_000)
    return path


@dataclass
class Flow:
    hpb: HpbEmulator
    bridge: DirectBridge
    runtime: Runtime
    publishers: dict[str, DirectPublisher]


@pytest.fixture
async def flow(tmp_path: Path) -> AsyncIterator[Flow]:
    bridge = DirectBridge()
    publishers = {
        "alice": bridge.add_publisher("alice", tone(tmp_path / "a.wav", 2.0, 220), autoplay=False),
        "bob": bridge.add_publisher("bob", tone(tmp_path / "b.wav", 2.0, 330), autoplay=False),
    }
    secret = secrets.token_hex(8)
    backend = "http://backend.invalid"
    try:
        async with HpbEmulator(secret, backend, bridge=bridge) as hpb:
            for name in publishers:
                await hpb.add_participant(
                    ROOM, session_id=name, nextcloud_session_id=f"talk-{name}", in_call=7, user_id=name
                )
            settings = load_settings(
                LT_HPB_URL=hpb.url,
                LT_INTERNAL_SECRET=secret,
                NEXTCLOUD_URL=backend,
                LT_STT_ENGINE="instant",
                APP_SECRET="x",
                LT_ROOM_LINGER_SECONDS=0.5,
            )
            async with running_service(settings, ice_servers=no_ice_servers) as runtime:
                yield Flow(hpb, bridge, runtime, publishers)
    finally:
        await bridge.aclose()


def by_speaker(messages: list[dict[str, Any]], speaker: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["speakerSessionId"] == speaker]


def utterances_are_well_formed(messages: list[dict[str, Any]]) -> None:
    """Partials grow the line; every line ends with a final before the next starts."""
    open_line = ""
    for message in messages:
        text = message["message"]
        assert text == text.strip() and text
        if open_line:
            assert text.startswith(open_line) or message["final"], (open_line, text)
        open_line = "" if message["final"] else text
    assert open_line == "", "the last line was never finalised"


async def test_captions_reach_exactly_the_targets(flow: Flow) -> None:
    async with (
        SimClient(flow.hpb.url, ROOM, "talk-viewer-1") as viewer,
        SimClient(flow.hpb.url, ROOM, "talk-viewer-2") as other,
        SimClient(flow.hpb.url, ROOM, "talk-bystander") as bystander,
    ):
        manager = flow.runtime.manager
        await manager.transcribe(ROOM, "talk-viewer-1", True, "en")
        await manager.transcribe(ROOM, "talk-viewer-2", True, "en")
        await until(lambda: len(manager.rooms()) == 1 and manager.rooms()[0].speakers == 2)
        for publisher in flow.publishers.values():
            publisher.play()

        def finals(client: SimClient, speaker: str) -> int:
            return sum(1 for m in by_speaker(client.transcripts(), speaker) if m["final"])

        await viewer.wait_for(lambda: finals(viewer, "alice") >= 1 and finals(viewer, "bob") >= 1)
        await other.wait_for(lambda: finals(other, "alice") >= 1 and finals(other, "bob") >= 1)
        for client in (viewer, other):
            messages = client.transcripts()
            assert {m["langId"] for m in messages} == {"en"}
            for speaker in ("alice", "bob"):
                mine = by_speaker(messages, speaker)
                assert mine[0]["final"] is False, "partials come before the final"
                utterances_are_well_formed(mine)
                words = " ".join(m["message"] for m in mine if m["final"]).split()
                assert len(words) >= 5  # ~2 s of tone, one word per 320 ms
        assert bystander.transcripts() == []


async def test_opt_out_language_change_speaker_leave_and_room_close(flow: Flow) -> None:
    async with (
        SimClient(flow.hpb.url, ROOM, "talk-viewer-1") as viewer,
        SimClient(flow.hpb.url, ROOM, "talk-viewer-2") as quitter,
    ):
        manager = flow.runtime.manager
        await manager.transcribe(ROOM, "talk-viewer-1", True, "en")
        await manager.transcribe(ROOM, "talk-viewer-2", True, "en")
        await until(lambda: manager.rooms() != [] and manager.rooms()[0].speakers == 2)
        await manager.transcribe(ROOM, "talk-viewer-2", False)
        await until(lambda: manager.rooms()[0].targets == 1)
        await manager.set_language(ROOM, "fr")
        await until(lambda: manager.rooms()[0].language == "fr")
        flow.publishers["alice"].play()
        await viewer.wait_for(lambda: any(m["final"] for m in viewer.transcripts()))
        assert quitter.transcripts() == []
        assert {m["langId"] for m in viewer.transcripts()} == {"fr"}

        # a speaker who leaves the call is cleaned up; the other stays
        await flow.hpb.set_in_call("bob", 0)
        await until(lambda: manager.rooms()[0].speakers == 1)
        assert manager.admission.active == 1

        # the last target leaves: the room closes after the linger time
        await manager.transcribe(ROOM, "talk-viewer-1", False)
        await until(lambda: manager.rooms() == [], deadline=30)
        assert manager.admission.active == 0
        await flow.hpb.wait_for(lambda: flow.hpb.sessions_in_room(ROOM, internal=True) == [])
