"""Signaling and SFU faults end to end with real parts: a private Janus,
publishers looping recorded speech into it, the HPB emulator bridging offers
to Janus, the service with the embedded recognizer. One call lives through
every fault in turn (one Janus for the module: starting one is slow); after
each, the viewer must receive new finals of every speaker, addressed to its
current session and naming the speakers' current sessions.

Faults: HPB socket drop (resumed), our session expired (resume refused, full
reconnect), the viewer's session replaced while captions flow, HPB restart
(every HPB session id new, Talk's kept, publishers re-publish under their new
sessions), Janus restart (publishers re-publish into the new Janus)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from live_transcription.config import load_settings
from live_transcription.service import running_service
from live_transcription.sim.bridge import JanusBridge
from live_transcription.sim.client import SimClient
from live_transcription.sim.demo import bundled_speech
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.sim.janus_process import JanusProcess
from tests.integration.test_faults_support import BACKEND, metric, no_ice_servers
from tests.janus_support import running_janus
from tests.waiting import until

pytestmark = pytest.mark.e2e
ROOM = "e2efaults"
RECOVERY = 90.0
"""Generous: CPU recognition of two looping speakers on a shared machine."""
RECONNECTS = "live_transcription_hpb_reconnects_total"


def finals_after(viewer: SimClient, mark: int, speaker: str) -> list[str]:
    return [
        m["message"]
        for m in viewer.transcripts()[mark:]
        if m["speakerSessionId"] == speaker and m["final"] and m["message"].strip()
    ]


async def captions_resume(fault: str, viewer: SimClient, speakers: Iterable[str], mark: int = -1) -> None:
    """New finals (two each: one may have been on its way before the fault)
    of every speaker reach ``viewer``; nothing names anybody else."""
    start = len(viewer.transcripts()) if mark < 0 else mark
    wanted = sorted(speakers)
    try:
        await viewer.wait_for(
            lambda: all(len(finals_after(viewer, start, s)) >= 2 for s in wanted), deadline=RECOVERY
        )
    except TimeoutError:
        got = {s: finals_after(viewer, start, s) for s in wanted}
        raise AssertionError(f"{fault}: captions did not resume for every speaker: {got}") from None
    named = {m["speakerSessionId"] for m in viewer.transcripts()[start:]}
    assert named <= set(wanted), f"{fault}: captions name sessions that are gone: {named - set(wanted)}"


async def close_quietly(bridge: JanusBridge) -> None:
    """Once: the bridge of a Janus that may be gone (only local cleanup left)."""
    if getattr(bridge, "_closed_by_test", False):
        return
    bridge._closed_by_test = True  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        await bridge.__aexit__(None, None, None)


async def publish(bridge: JanusBridge, speech: dict[str, Path]) -> None:
    for session, wav in speech.items():
        await bridge.add_publisher(session, wav, loop=True)


async def test_captions_survive_signaling_and_sfu_faults(tmp_path: Path) -> None:
    wavs = bundled_speech()[:2]
    speech = {f"speaker-{i + 1}": wav for i, wav in enumerate(wavs)}
    secret = secrets.token_hex(8)
    async with AsyncExitStack() as stack:
        janus: JanusProcess = await stack.enter_async_context(running_janus())
        bridge = JanusBridge(janus.ws_url)
        await bridge.__aenter__()
        stack.push_async_callback(close_quietly, bridge)
        await publish(bridge, speech)
        hpb = await stack.enter_async_context(HpbEmulator(secret, BACKEND, bridge=bridge))
        for session in speech:
            await hpb.add_participant(
                ROOM, session_id=session, nextcloud_session_id=f"talk-{session}", in_call=7
            )
        settings = load_settings(
            LT_HPB_URL=hpb.url,
            LT_INTERNAL_SECRET=secret,
            NEXTCLOUD_URL=BACKEND,
            LT_STT_ENGINE="embedded",
            APP_SECRET="x",
            LT_ROOM_LINGER_SECONDS=1,
        )
        runtime = await stack.enter_async_context(running_service(settings, ice_servers=no_ice_servers))
        manager = runtime.manager
        viewer = await stack.enter_async_context(SimClient(hpb.url, ROOM, "talk-viewer"))
        await manager.transcribe(ROOM, "talk-viewer", True, "en")
        await captions_resume("start", viewer, speech, mark=0)

        def ours() -> list[str]:
            return hpb.sessions_in_room(ROOM, internal=True)

        def healthy() -> bool:
            rooms = manager.rooms()
            return len(rooms) == 1 and rooms[0].link_state == "connected" and not rooms[0].delivery_stalled

        # --- 1. the HPB socket drops; the session is resumed
        [session] = ours()
        resumed = metric(RECONNECTS, {"outcome": "resumed"})
        hpb.drop(session)
        await hpb.wait_for(lambda: not hpb.connected(session), RECOVERY)
        await hpb.wait_for(lambda: hpb.connected(session), RECOVERY)
        await captions_resume("socket drop", viewer, speech)
        assert ours() == [session] and metric(RECONNECTS, {"outcome": "resumed"}) == resumed + 1

        # --- 2. our session expired: resume refused, new hello, join, offers
        renewed = metric(RECONNECTS, {"outcome": "new-session"})
        hpb.refuse_resume = True
        hpb.drop(session)
        await hpb.wait_for(lambda: ours() not in ([], [session]), RECOVERY)
        hpb.refuse_resume = False
        await captions_resume("session expired", viewer, speech)
        assert metric(RECONNECTS, {"outcome": "new-session"}) == renewed + 1
        assert healthy()

        # --- 3. the viewer's browser reconnects: a new HPB session, the same
        # Talk session; the old one lingers (no bye) until the HPB drops it
        async with SimClient(hpb.url, ROOM, "talk-viewer") as replacement:
            await viewer.__aexit__(None, None, None)
            await captions_resume("viewer session replaced", replacement, speech)

            # --- 4. the HPB restarts: every session id is new, Talk's are kept;
            # each publisher's media is now published by its new session
            await hpb.stop()
            await until(lambda: manager.rooms()[0].link_state == "reconnecting", deadline=RECOVERY)
            renamed: dict[str, Path] = {}
            for old, wav in speech.items():
                await hpb.remove_participant(old)
                await bridge.remove_publisher(old)
                new = f"{old}-after-restart"
                await hpb.add_participant(ROOM, session_id=new, nextcloud_session_id=f"talk-{old}", in_call=7)
                renamed[new] = wav
            speech = renamed
            await publish(bridge, speech)
            await hpb.start()
        async with SimClient(hpb.url, ROOM, "talk-viewer") as viewer:
            await captions_resume("HPB restart", viewer, speech)
            assert healthy()

            # --- 5. Janus restarts: the speakers' media ends; the publishers
            # re-publish into the new Janus and Talk re-announces their flags
            hpb.bridge = None  # offers asked meanwhile find no SFU
            await close_quietly(bridge)
            await janus.stop()
            await until(lambda: manager.rooms()[0].speakers == 0, deadline=RECOVERY * 2)
            async with running_janus() as janus2, JanusBridge(janus2.ws_url) as bridge2:
                await publish(bridge2, speech)
                hpb.bridge = bridge2
                for session in speech:
                    await hpb.set_in_call(session, 1)
                    await hpb.set_in_call(session, 7)
                await captions_resume("Janus restart", viewer, speech)
                assert healthy()
                await manager.leave(ROOM)
                await until(lambda: manager.rooms() == [], deadline=RECOVERY)
                hpb.bridge = None
