"""The lean load generator through the HPB emulator into the real service:
aiortc only sets the connections up, then pre-protected SRTP on one tick;
the service decodes it and captions reach the viewer, for as long as the
streams run (consent freshness still answered)."""

from __future__ import annotations

import secrets
from typing import Any

import aioice.ice
import pytest
from aiortc import RTCIceServer
from bench.lean_bridge import LeanBridge, SendTicker
from bench.patterns import build_pattern

from live_transcription.config import load_settings
from live_transcription.service import running_service
from live_transcription.sim.client import SimClient
from live_transcription.sim.emulator import HpbEmulator
from tests.waiting import until

ROOM = "leanroom"
ACTIVE = ("alice", "bob")
SCHEDULED = "carol"
LOOPS = 4


async def no_ice_servers() -> list[RTCIceServer]:
    return []


def finals(messages: list[dict[str, Any]], speaker: str) -> list[str]:
    return [m["message"] for m in messages if m["speakerSessionId"] == speaker and m["final"]]


async def test_lean_streams_are_decoded_and_captioned_while_consent_checks_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # consent checks every ~0.2 s on both sides: a peer that stopped
    # answering them would be closed after six misses, ~1.2 s
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)
    pattern = build_pattern(1000, 600, seed=1)
    ticker = SendTicker(ahead=10)
    ticker.start()
    bridge = LeanBridge(ticker)
    for name in ACTIVE:
        # start in the pause, as the harness does, so each utterance is whole
        bridge.add_publisher(name, pattern, pattern.talk_packets)
    # a meeting participant: 1.2 s turns after 1 s of silence
    bridge.add_publisher(SCHEDULED, pattern, 0, schedule=bytes(50) + b"\x01" * 60)
    secret = secrets.token_hex(8)
    backend = "http://backend.invalid"
    try:
        async with HpbEmulator(secret, backend, bridge=bridge) as hpb:
            for name in (*ACTIVE, SCHEDULED):
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
            async with (
                running_service(settings, ice_servers=no_ice_servers) as runtime,
                SimClient(hpb.url, ROOM, "talk-viewer") as viewer,
            ):
                await runtime.manager.transcribe(ROOM, "talk-viewer", True, "en")
                await until(lambda: bridge.connected() == 3, deadline=60, what="all streams up")
                speakers = (*ACTIVE, SCHEDULED)

                # several loops of talk: well past the time an unanswered
                # consent check would have closed the connections
                def every_speaker_has(count: int) -> bool:
                    messages = viewer.transcripts()
                    return all(len(finals(messages, s)) >= count for s in speakers)

                await viewer.wait_for(lambda: every_speaker_has(LOOPS), deadline=90)
                messages = viewer.transcripts()
                for speaker in speakers:
                    words = " ".join(finals(messages, speaker)).split()
                    assert len(words) >= 2 * LOOPS, (speaker, words)
                assert {m["speakerSessionId"] for m in messages} == set(speakers)
                assert bridge.connected() == 3
                assert runtime.manager.rooms()[0].speakers == 3
                assert ticker.send_errors == 0
                assert ticker.reports_sent > 0 and ticker.report_errors == 0
                assert bridge.takeover_failures == 0
    finally:
        ticker.stop()
        await bridge.aclose()
