"""HPB faults over real sockets: the socket cut mid-call, the server restarted,
and many rooms opened and closed at once. Each test checks what must survive
and, on leaving (``captioned_call``), that nothing is left behind."""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from live_transcription.api.app import Runtime, create_app
from live_transcription.clock import ManualClock
from live_transcription.config import load_settings
from live_transcription.hpb.connection import HpbLinkFactory
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import Manager
from live_transcription.service import running_service
from live_transcription.sim.client import SimClient
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.stt.base import Language
from tests.fake_link import SpeakerFactory
from tests.integration.test_faults_sigterm import APP_SECRET
from tests.integration.test_faults_sigterm import auth as app_api_auth
from tests.integration.test_faults_support import (
    BACKEND,
    DEADLINE,
    assert_no_tasks_left,
    captioned_call,
    finals,
    metric,
    no_ice_servers,
)
from tests.waiting import until

ROOM = "faultroom"


def sent_by(hpb: HpbEmulator, session: str, kind: str, data_type: str | None = None) -> list[dict[str, Any]]:
    out = []
    for message in hpb.received(session):
        if message.get("type") != kind:
            continue
        if data_type is not None:
            data = message.get("message", {}).get("data", {})
            if data.get("type") != data_type:
                continue
        out.append(message)
    return out


async def test_hpb_socket_cut_mid_call_resumes_without_rejoin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        captioned_call(tmp_path, monkeypatch, ROOM) as call,
        SimClient(call.hpb.url, ROOM, "talk-viewer") as viewer,
    ):
        manager = call.runtime.manager
        await manager.transcribe(ROOM, "talk-viewer", True, "en")
        await until(lambda: manager.rooms()[0].speakers == 2, deadline=DEADLINE)
        await viewer.wait_for(lambda: finals(viewer.transcripts(), "alice") >= 1, deadline=DEADLINE)
        [ours] = call.hpb.sessions_in_room(ROOM, internal=True)
        offers_before = len(sent_by(call.hpb, ours, "message", "requestoffer"))
        resumed_before = metric("live_transcription_hpb_reconnects_total", {"outcome": "resumed"})
        sent_before = metric("live_transcription_captions_sent_total", {"kind": "final"})
        peers_before = call.census.opened

        call.hpb.drop(ours)
        await call.hpb.wait_for(lambda: not call.hpb.connected(ours))
        await call.hpb.wait_for(lambda: call.hpb.connected(ours))
        seen = len(viewer.transcripts())
        await viewer.wait_for(
            lambda: (
                finals(viewer.transcripts()[seen:], "alice") >= 2
                and finals(viewer.transcripts()[seen:], "bob") >= 2
            ),
            deadline=DEADLINE,
        )

        # the same HPB session, joined once, the same media: a resume, not a restart
        assert call.hpb.sessions_in_room(ROOM, internal=True) == [ours]
        assert len(sent_by(call.hpb, ours, "room")) == 1, "the room was joined again"
        assert len(sent_by(call.hpb, ours, "message", "requestoffer")) == offers_before
        assert call.census.opened == peers_before
        assert manager.rooms()[0].link_state == "connected"
        assert metric("live_transcription_hpb_reconnects_total", {"outcome": "resumed"}) == resumed_before + 1
        assert metric("live_transcription_captions_sent_total", {"kind": "final"}) > sent_before
        # captions of the same line never went to anybody else
        assert {m["speakerSessionId"] for m in viewer.transcripts()} == {"alice", "bob"}
        assert (await _leave(call.runtime.manager)) is True


async def test_hpb_restart_starts_a_new_session_and_resubscribes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with captioned_call(tmp_path, monkeypatch, ROOM) as call:
        manager = call.runtime.manager
        hpb = call.hpb
        async with SimClient(hpb.url, ROOM, "talk-viewer") as viewer:
            await manager.transcribe(ROOM, "talk-viewer", True, "en")
            await until(lambda: manager.rooms()[0].speakers == 2, deadline=DEADLINE)
            await viewer.wait_for(lambda: finals(viewer.transcripts(), "alice") >= 1, deadline=DEADLINE)
            [old] = hpb.sessions_in_room(ROOM, internal=True)
            new_sessions_before = metric(
                "live_transcription_hpb_reconnects_total", {"outcome": "new-session"}
            )
            peers_before = call.census.opened

            await hpb.stop()  # every socket cut, every session forgotten
            await until(lambda: manager.rooms()[0].link_state == "reconnecting", deadline=DEADLINE)
            health = call.runtime.health()[0]
            assert health.status == "failing" and "no room is connected to the HPB" in health.reasons
            await hpb.start()

        # the viewer's browser reconnects too, with the same Talk session
        async with SimClient(hpb.url, ROOM, "talk-viewer") as viewer:
            await hpb.wait_for(lambda: len(hpb.sessions_in_room(ROOM, internal=True)) == 1, DEADLINE)
            [new] = hpb.sessions_in_room(ROOM, internal=True)
            assert new != old
            await viewer.wait_for(
                lambda: (
                    finals(viewer.transcripts(), "alice") >= 1 and finals(viewer.transcripts(), "bob") >= 1
                ),
                deadline=DEADLINE,
            )
            # re-subscribed: fresh offers for both speakers on the new session
            requests = sent_by(hpb, new, "message", "requestoffer")
            offered = {m["message"]["recipient"]["sessionid"] for m in requests}
            assert offered == {"alice", "bob"}
            assert len(sent_by(hpb, new, "room")) == 1
            assert call.census.opened >= peers_before + 2
            assert (
                metric("live_transcription_hpb_reconnects_total", {"outcome": "new-session"})
                == new_sessions_before + 1
            )
            await until(lambda: manager.rooms()[0].speakers == 2, deadline=DEADLINE)
            assert call.runtime.health()[0].status == "ok"
            assert (await _leave(manager)) is True


async def test_an_hpb_outage_is_one_warning_and_one_info_whatever_the_rooms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The HPB stopped under four open rooms, every room retrying, then
    restarted: the log has one WARNING with the cause and one INFO, nothing
    per room and attempt above DEBUG; captions reach the viewer again."""
    caplog.set_level(logging.INFO)
    quiet_rooms = ["quiet1", "quiet2", "quiet3"]
    async with captioned_call(tmp_path, monkeypatch, ROOM) as call:
        manager = call.runtime.manager
        hpb = call.hpb
        rooms = [ROOM, *quiet_rooms]
        async with SimClient(hpb.url, ROOM, "talk-viewer") as viewer:
            await manager.transcribe(ROOM, "talk-viewer", True, "en")
            for token in quiet_rooms:
                await manager.transcribe(token, f"talk-{token}", True, "en")
            await viewer.wait_for(lambda: finals(viewer.transcripts(), "alice") >= 1, deadline=DEADLINE)
            failed_before = metric("live_transcription_hpb_reconnects_total", {"outcome": "failed"})
            caplog.clear()

            await hpb.stop()
            outage = manager.joins.outage
            # every room tries at least twice while the HPB is down
            await until(lambda: outage.failed_attempts >= 2 * len(rooms), deadline=DEADLINE)
            assert call.runtime.health()[0].status == "failing"
            await hpb.start()

        async with SimClient(hpb.url, ROOM, "talk-viewer") as viewer:
            await until(lambda: not outage.ongoing, deadline=DEADLINE)
            await hpb.wait_for(
                lambda: all(len(hpb.sessions_in_room(token, internal=True)) == 1 for token in rooms),
                DEADLINE,
            )
            await viewer.wait_for(
                lambda: (
                    finals(viewer.transcripts(), "alice") >= 1 and finals(viewer.transcripts(), "bob") >= 1
                ),
                deadline=DEADLINE,
            )
            await until(
                lambda: all(room.link_state == "connected" for room in manager.rooms()), deadline=DEADLINE
            )
            await until(lambda: call.runtime.health()[0].status == "ok", deadline=DEADLINE)
            failed = metric("live_transcription_hpb_reconnects_total", {"outcome": "failed"}) - failed_before
            assert failed >= 2 * len(rooms)

            ours = [r for r in caplog.records if r.name.startswith("live_transcription.")]
            ours = [r for r in ours if not r.name.startswith("live_transcription.sim")]
            warnings = [(r.levelname, r.getMessage()) for r in ours if r.levelno >= logging.WARNING]
            assert warnings == [
                (
                    "WARNING",
                    "cannot reach the signaling server (connection refused): rooms cannot be joined or kept",
                )
            ]
            ends = [r.getMessage() for r in ours if r.__dict__.get("state") == "ended"]
            assert len(ends) == 1
            assert ends[0].startswith("signaling server reachable again after ")
            attempts = int(ends[0].split("(0 join(s) and ")[1].split(" reconnection")[0])
            assert attempts >= 2 * len(rooms)
            # no room logged its own attempts, failed or not, above DEBUG
            per_room = [r.getMessage() for r in ours if r.__dict__.get("event") != "hpb-outage"]
            assert not [m for m in per_room if "HPB reconnect" in m or "HPB connection of room" in m]
            assert not [m for m in per_room if "HPB session of room" in m or "HPB session started" in m]
            await manager.leave(ROOM)
            for token in quiet_rooms:
                await manager.leave(token)
            await until(lambda: manager.rooms() == [], deadline=DEADLINE)


async def test_health_with_the_hpb_refusing_joins_is_degraded_then_failing_then_ok_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Joins over real sockets to an HPB that is down (connection refused),
    health read through the HTTP API; the minute of failures on a manual clock."""
    caplog.set_level(logging.INFO)
    secret = secrets.token_hex(8)
    clock = ManualClock()
    async with HpbEmulator(secret, BACKEND) as hpb:
        settings = load_settings(
            APP_SECRET=APP_SECRET,
            LT_HPB_URL=hpb.url,
            LT_INTERNAL_SECRET=secret,
            NEXTCLOUD_URL=BACKEND,
            LT_STT_ENGINE="instant",
        )
        manager = Manager(
            link_factory=HpbLinkFactory.from_settings(settings),
            speaker_factory=SpeakerFactory(),
            languages={"en": Language("en", "English")},
            admission=Admission(max_speakers=10, max_speakers_per_room=5),
            join_timeout=DEADLINE,
            clock=clock,
        )
        async with manager:
            app = create_app(Runtime(settings=settings, manager=manager, engine_name="instant"))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://exapp") as client:

                async def enable(room: str) -> httpx.Response:
                    body = {"roomToken": room, "ncSessionId": f"talk-{room}", "enable": True}
                    return await client.post("/api/v1/call/transcribe", headers=app_api_auth(), json=body)

                async def health() -> tuple[int, str, list[str]]:
                    reply = await client.get("/healthz")
                    body = reply.json()
                    return reply.status_code, body["status"], body["reasons"]

                assert await health() == (200, "ok", [])
                await hpb.stop()
                refused = await enable("room1")
                assert refused.status_code == 503
                assert refused.json() == {"error": "cannot reach the signaling server (connection refused)"}
                assert await health() == (
                    200,
                    "degraded",
                    ["1 HPB join(s) failed in the last 60 s (connection refused)"],
                )
                for room in ("room2", "room3"):
                    await clock.advance(31)
                    assert (await enable(room)).status_code == 503
                status, state, reasons = await health()
                assert (status, state) == (503, "failing")
                assert reasons == ["every HPB join failed for 62 s (connection refused)"]
                assert (await client.get("/readyz")).status_code == 503

                await hpb.start()
                joined = await enable("room1")
                assert joined.status_code == 200, joined.text
                assert len(hpb.sessions_in_room("room1", internal=True)) == 1
                assert await health() == (200, "ok", [])
                assert (await client.get("/readyz")).status_code == 200
                await manager.leave("room1")
                await until(lambda: manager.rooms() == [], deadline=DEADLINE)
    outage = [
        (r.levelname, r.getMessage()) for r in caplog.records if r.__dict__.get("event") == "hpb-outage"
    ]
    assert outage == [
        ("WARNING", "cannot reach the signaling server (connection refused): rooms cannot be joined or kept"),
        (
            "INFO",
            "signaling server reachable again after 62 s "
            "(3 join(s) and 0 reconnection attempt(s) failed meanwhile)",
        ),
    ]


async def _leave(manager: Any) -> bool:
    """Talk's ``leave``: the room says bye and ends; True once it is gone."""
    left = await manager.leave(ROOM)
    await until(lambda: manager.rooms() == [], deadline=DEADLINE)
    return bool(left)


def summaries_targets(manager: Any, token: str) -> set[str]:
    room = manager.room(token)
    return set() if room is None else set(room.pending_targets)


async def test_hundred_rooms_opened_and_closed_concurrently(caplog: pytest.LogCaptureFixture) -> None:
    """No media: speakers are in the calls but the emulator has no bridge, so
    only signaling, rooms, targets and lingering are exercised, hard."""
    caplog.set_level(logging.WARNING)
    tasks_before = set(asyncio.all_tasks())
    rng = random.Random(7)
    secret = secrets.token_hex(8)
    rooms = [f"churn{i:03d}" for i in range(100)]
    async with HpbEmulator(secret, BACKEND) as hpb:
        for token in rooms:
            for who in range(rng.randint(0, 3)):
                await hpb.add_participant(token, session_id=f"{token}-p{who}", in_call=7)
        settings = load_settings(
            LT_HPB_URL=hpb.url,
            LT_INTERNAL_SECRET=secret,
            NEXTCLOUD_URL=BACKEND,
            LT_STT_ENGINE="instant",
            APP_SECRET="x",
            LT_ROOM_LINGER_SECONDS=0.05,
        )
        async with running_service(settings, ice_servers=no_ice_servers) as runtime:
            manager = runtime.manager
            plans = {token: [rng.random() < 0.6 for _ in range(rng.randint(1, 12))] for token in rooms}
            viewers = {token: [f"{token}-v{n}" for n in range(3)] for token in rooms}

            async def churn(token: str) -> None:
                local = random.Random(token)
                for enable in plans[token]:
                    await manager.transcribe(token, local.choice(viewers[token]), enable, "en")
                    if local.random() < 0.3:
                        await asyncio.sleep(0)  # interleave with the other rooms
                # a last viewer stays: this room must end up open with exactly that target
                await manager.transcribe(token, viewers[token][0], True, "en")

            async with asyncio.TaskGroup() as tasks:
                for token in rooms:
                    tasks.create_task(churn(token))

            def settled() -> bool:
                summaries = {room.token: room for room in manager.rooms()}
                return set(summaries) == set(rooms) and all(
                    viewers[token][0] in summaries_targets(manager, token) for token in rooms
                )

            await until(settled, deadline=DEADLINE)
            # everybody turns captions off: every room lingers, then closes
            async with asyncio.TaskGroup() as tasks:
                for token in rooms:
                    for viewer in viewers[token]:
                        tasks.create_task(manager.transcribe(token, viewer, False))
            await until(lambda: manager.rooms() == [], deadline=DEADLINE)
            assert manager.admission.active == 0
            assert manager.rooms_opened >= 100 and manager.rooms_closed == manager.rooms_opened
            await hpb.wait_for(lambda: hpb.open_connections == 0, DEADLINE)
            assert all(hpb.sessions_in_room(token, internal=True) == [] for token in rooms)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    await assert_no_tasks_left(tasks_before)


async def test_enable_while_the_room_lingers_out_keeps_the_target() -> None:
    """Regression: a viewer turning captions on just as the room closed for
    lack of targets got "enabled" but no room (the target went with it)."""
    secret = secrets.token_hex(8)
    async with HpbEmulator(secret, BACKEND) as hpb:
        settings = load_settings(
            LT_HPB_URL=hpb.url,
            LT_INTERNAL_SECRET=secret,
            NEXTCLOUD_URL=BACKEND,
            LT_STT_ENGINE="instant",
            APP_SECRET="x",
            LT_ROOM_LINGER_SECONDS=0,
        )
        async with running_service(settings, ice_servers=no_ice_servers) as runtime:
            manager = runtime.manager
            for attempt in range(30):
                await manager.transcribe(ROOM, "viewer", True, "en")
                await manager.transcribe(ROOM, "viewer", False)
                for _ in range(attempt % 7):  # land at every step of the room's closing
                    await asyncio.sleep(0)
                await manager.transcribe(ROOM, "viewer", True, "en")

                def has_viewer() -> bool:
                    room = manager.room(ROOM)
                    return room is not None and not room.closing and "viewer" in room.pending_targets

                await until(has_viewer, what=f"attempt {attempt}: the target was lost")
                await manager.transcribe(ROOM, "viewer", False)
                await until(lambda: manager.rooms() == [])
            assert manager.rooms_closed == manager.rooms_opened
