"""Janus (the SFU) killed and restarted under a captioned call: the speakers'
peer connections close with a reason, the room keeps working, and once Janus
is back, the publisher has republished and the participant's flags changed,
captions resume. Skips loudly without Janus."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

from live_transcription import service as service_module
from live_transcription.config import load_settings
from live_transcription.rooms.speaker import Speaker
from live_transcription.service import running_service
from live_transcription.sim.bridge import JanusBridge
from live_transcription.sim.client import SimClient
from live_transcription.sim.emulator import HpbEmulator
from tests.integration.test_faults_support import (
    BACKEND,
    PeerCensus,
    assert_no_tasks_left,
    finals,
    metric,
    no_ice_servers,
    talking_wav,
)
from tests.janus_support import running_janus
from tests.waiting import until

ROOM = "janusroom"
SLOW = 120.0  # a dead SFU is noticed by ICE consent / the peer's disconnect watchdog


async def test_janus_killed_and_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    census = PeerCensus()
    census.install(monkeypatch)
    speakers: list[Speaker] = []

    class RecordedSpeaker(Speaker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            speakers.append(self)

    monkeypatch.setattr(service_module, "Speaker", RecordedSpeaker)
    tasks_before = set(asyncio.all_tasks())
    wav = talking_wav(tmp_path / "alice.wav", 220, talk=1.5, pause=1.0)
    secret = secrets.token_hex(8)
    async with HpbEmulator(secret, BACKEND) as hpb:
        await hpb.add_participant(ROOM, session_id="alice", nextcloud_session_id="t-alice", in_call=7)
        settings = load_settings(
            LT_HPB_URL=hpb.url,
            LT_INTERNAL_SECRET=secret,
            NEXTCLOUD_URL=BACKEND,
            LT_STT_ENGINE="instant",
            APP_SECRET="x",
        )
        async with running_service(settings, ice_servers=no_ice_servers) as runtime:
            manager = runtime.manager
            async with SimClient(hpb.url, ROOM, "talk-viewer") as viewer:
                # --- first Janus: captions flow
                async with running_janus() as janus, JanusBridge(janus.ws_url) as bridge:
                    await bridge.add_publisher("alice", wav, loop=True)
                    hpb.bridge = bridge
                    await manager.transcribe(ROOM, "talk-viewer", True, "en")
                    await viewer.wait_for(lambda: finals(viewer.transcripts(), "alice") >= 1, SLOW)
                    first = speakers[-1]
                    # --- Janus dies (no goodbye): media stops, the peer notices
                    hpb.bridge = None  # offers asked meanwhile go nowhere, as with a dead SFU
                    assert janus._proc is not None  # the process itself, to kill it hard
                    janus._proc.send_signal(signal.SIGKILL)
                    await until(lambda: first.end_reason is not None, deadline=SLOW)
                    assert (first.end_reason or "").startswith("peer-"), first.end_reason
                    print(f"speaker's peer ended: {first.end_reason}")
                    with contextlib.suppress(Exception):  # its Janus is gone; only local cleanup
                        await bridge.__aexit__(None, None, None)
                    await janus.stop()
                # the room lives on, joined, without the speaker
                await until(lambda: manager.rooms() != [] and manager.rooms()[0].speakers == 0, SLOW)
                assert manager.rooms()[0].link_state == "connected"
                # the fresh offer asked for the speaker fails (no SFU): its slot is freed
                await until(lambda: manager.admission.active == 0, SLOW)
                assert census.open == 0
                reason = first.end_reason or ""
                assert metric("live_transcription_speakers_ended_total", {"reason": reason}) >= 1

                # --- Janus is back; the publisher republishes; Talk updates the flags
                async with running_janus() as janus, JanusBridge(janus.ws_url) as bridge:
                    await bridge.add_publisher("alice", wav, loop=True)
                    hpb.bridge = bridge
                    await hpb.set_in_call("alice", 1)  # in call, audio off
                    await hpb.set_in_call("alice", 7)  # audio back on
                    seen = len(viewer.transcripts())
                    await viewer.wait_for(lambda: finals(viewer.transcripts()[seen:], "alice") >= 1, SLOW)
                    assert speakers[-1] is not first and speakers[-1].end_reason is None
                    await manager.leave(ROOM)
                    await until(lambda: manager.rooms() == [], deadline=SLOW)
                    assert census.open == 0
                    await until(lambda: not bridge.subscriptions, deadline=SLOW)
                    hpb.bridge = None
        await hpb.wait_for(lambda: hpb.open_connections == 0, SLOW)
    await assert_no_tasks_left(tasks_before)
