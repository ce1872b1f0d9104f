"""Signaling and SFU faults end to end with real parts: a private Janus,
publishers looping recorded speech into it, the HPB emulator bridging offers
to Janus, the service with the embedded recognizer. One call lives through
every fault in turn (one Janus for the module: starting one is slow); after
each, the viewer must receive new finals of every speaker, addressed to its
current session and naming the speakers' current sessions.

Faults: HPB socket drop (resumed), our session expired (resume refused, full
reconnect), the viewer's session replaced while captions flow, HPB restart
(every HPB session id new, Talk's kept, publishers re-publish under their new
sessions), Janus restart (publishers re-publish into the new Janus).

STT faults, in a second call of the same kind with the Modal engine against
the fake Modal server's energy model (a word per four voiced frames of the
Opus-decoded speech; exact words do not survive Opus): the connections
dropped while their speakers are inside a word, the server refusing the
credentials (HTTP 401) for a while, and an engine that stops answering
(connections open, audio read, nothing back). After each, every speaker's
new finals reach the viewer, the first of them within 10 s of the speaker's
audio after the recovery (counted in the RTP packets the speaker received,
not in wall-clock time, so a loaded machine does not make it flaky)."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from live_transcription import service as service_module
from live_transcription.config import load_settings
from live_transcription.rooms import speaker as speaker_module
from live_transcription.rooms.speaker import Speaker
from live_transcription.service import running_service
from live_transcription.sim.bridge import JanusBridge
from live_transcription.sim.client import SimClient
from live_transcription.sim.demo import bundled_speech
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.sim.janus_process import JanusProcess
from live_transcription.stt.modal import ModalEngine
from live_transcription.stt.pool import PoolOptions
from live_transcription.stt.remote import RemoteOptions
from tests.fakes.modal_kyutai import FakeModalKyutai
from tests.integration.test_faults_support import BACKEND, metric, no_ice_servers
from tests.janus_support import running_janus
from tests.waiting import until

pytestmark = pytest.mark.e2e
ROOM = "e2efaults"
RECOVERY = 90.0
"""Generous: CPU recognition of two looping speakers on a shared machine."""
RECONNECTS = "live_transcription_hpb_reconnects_total"
STT_EVENTS = "live_transcription_stt_stream_events_total"
KEY, SECRET = "e2e-key", "e2e-secret"
PACKET_SECONDS = 0.02
WITHIN_SECONDS = 10.0
"""A speaker's first new final after recovery comes within this much of its audio."""


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


class SpeakerRecorder:
    """The service's speakers, as it creates them (to read their audio counts)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.created: list[Speaker] = []
        created = self.created

        class RecordedSpeaker(Speaker):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                created.append(self)

        monkeypatch.setattr(service_module, "Speaker", RecordedSpeaker)

    def packets(self, session: str) -> int:
        """RTP packets (20 ms each) the live speaker of ``session`` has received."""
        live = [s for s in self.created if s.context.session_id == session and s.end_reason is None]
        audio = live[-1]._audio if live else None
        return audio.packets_in if audio is not None else 0


async def stt_recovered(
    fault: str, viewer: SimClient, speakers: Iterable[str], recorder: SpeakerRecorder
) -> dict[str, float]:
    """Call at the moment the STT is usable again. Every speaker's first new
    final must come within ``WITHIN_SECONDS`` of its audio; then two new
    finals each must reach the viewer (``captions_resume``). Returns the
    audio seconds each speaker took (for the record)."""
    wanted = sorted(speakers)
    mark = len(viewer.transcripts())
    packets_at = {s: recorder.packets(s) for s in wanted}
    started = time.monotonic()
    took: dict[str, float] = {}

    def first_finals_in() -> bool:
        for s in wanted:
            if s not in took and finals_after(viewer, mark, s):
                took[s] = (recorder.packets(s) - packets_at[s]) * PACKET_SECONDS
        return len(took) == len(wanted)

    try:
        await viewer.wait_for(first_finals_in, deadline=RECOVERY)
    except TimeoutError:
        raise AssertionError(f"{fault}: no new final for some speaker: got {took}") from None
    print(f"{fault}: first new final after {took} s of audio ({time.monotonic() - started:.1f} s)")
    slow = {s: t for s, t in took.items() if t > WITHIN_SECONDS}
    assert not slow, f"{fault}: the first new final took more than {WITHIN_SECONDS} s of audio: {slow}"
    await captions_resume(fault, viewer, wanted, mark=mark)
    return took


async def test_captions_survive_stt_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    # a speaker whose stream failed for bad credentials tries again after 1 s
    # (60 s in production), and the engine's own cool-off is as short
    monkeypatch.setattr(speaker_module, "ENGINE_RETRY_SECONDS", 1.0)
    recorder = SpeakerRecorder(monkeypatch)
    wavs = bundled_speech()[:2]
    speech = {f"speaker-{i + 1}": wav for i, wav in enumerate(wavs)}
    secret = secrets.token_hex(8)
    engine_events = {"engine": "modal"}
    async with AsyncExitStack() as stack:
        janus: JanusProcess = await stack.enter_async_context(running_janus())
        bridge = await stack.enter_async_context(JanusBridge(janus.ws_url))
        await publish(bridge, speech)
        fake = await stack.enter_async_context(FakeModalKyutai(model="energy", key=KEY, secret=SECRET))
        hpb = await stack.enter_async_context(HpbEmulator(secret, BACKEND, bridge=bridge))
        for session in speech:
            await hpb.add_participant(
                ROOM, session_id=session, nextcloud_session_id=f"talk-{session}", in_call=7
            )
        settings = load_settings(
            LT_HPB_URL=hpb.url,
            LT_INTERNAL_SECRET=secret,
            NEXTCLOUD_URL=BACKEND,
            LT_STT_ENGINE="modal",
            LT_MODAL_URL=fake.url,
            MODAL_KEY=KEY,
            MODAL_SECRET=SECRET,
            APP_SECRET="x",
            LT_ROOM_LINGER_SECONDS=1,
            # the looping speech has no pause the audio gate ends an utterance
            # at: lines are finalised by length, every 2 s
            LT_MAX_CAPTION_SECONDS=2,
        )
        engine = ModalEngine(
            fake.url,
            {"Modal-Key": KEY, "Modal-Secret": SECRET},
            options=RemoteOptions(auth_retry_seconds=1.0),
            pool=PoolOptions(headroom=1),
        )
        runtime = await stack.enter_async_context(
            running_service(settings, engine=engine, ice_servers=no_ice_servers)
        )
        manager = runtime.manager
        viewer = await stack.enter_async_context(SimClient(hpb.url, ROOM, "talk-viewer"))
        await manager.transcribe(ROOM, "talk-viewer", True, "en")
        await captions_resume("start", viewer, speech, mark=0)

        async def healthy_again(fault: str) -> None:
            try:
                await until(lambda: runtime.health()[0].status == "ok", deadline=RECOVERY)
            except TimeoutError:
                raise AssertionError(f"{fault}: health stays {runtime.health()[0]}") from None
            assert metric("live_transcription_stt_streams_reconnecting") == 0

        # --- 1. the STT connections drop while both speakers are inside a word;
        # the server accepts new ones at once
        lost = metric(STT_EVENTS, engine_events | {"event": "connection"})
        await until(lambda: fake.answering_mid_word() >= 2, deadline=RECOVERY)
        assert fake.drop_open_connections() >= 2
        await stt_recovered("STT connection dropped mid-word", viewer, speech, recorder)
        assert metric(STT_EVENTS, engine_events | {"event": "connection"}) >= lost + 2
        await healthy_again("STT connection dropped mid-word")

        # --- 2. the server refuses the credentials (HTTP 401) for a while: the
        # streams end with a clear error, the speakers retry; then it accepts again
        refused = metric(STT_EVENTS, engine_events | {"event": "fatal-auth"})
        fake.key = "rotated"
        rejected = fake.rejected
        fake.drop_open_connections()  # the next handshakes meet the 401
        await until(
            lambda: metric(STT_EVENTS, engine_events | {"event": "fatal-auth"}) >= refused + 2,
            deadline=RECOVERY,
        )
        assert fake.rejected > rejected

        # health says why while the refusal is recent (the speakers keep trying)
        def failing_for_credentials() -> bool:
            health = runtime.health()[0]
            return health.status == "failing" and any("credentials" in r for r in health.reasons)

        await until(failing_for_credentials, deadline=RECOVERY)
        fake.key = KEY
        await stt_recovered("STT refusing with 401, then recovering", viewer, speech, recorder)
        await healthy_again("STT refusing with 401, then recovering")

        # --- 3. the engine stops answering: every open connection keeps
        # reading audio and sends nothing back; new connections work
        stalled = metric(STT_EVENTS, engine_events | {"event": "stalled"})
        assert fake.silence_open_connections() >= 2
        await stt_recovered("STT engine stops answering", viewer, speech, recorder)
        assert metric(STT_EVENTS, engine_events | {"event": "stalled"}) >= stalled + 2
        await healthy_again("STT engine stops answering")

        await manager.leave(ROOM)
        await until(lambda: manager.rooms() == [], deadline=RECOVERY)
