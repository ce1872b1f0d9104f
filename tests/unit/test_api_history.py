"""Health told from what happened (joins failing, joins stuck, caps), plain-word
errors, and joins cancelled by leave or disable: the HTTP routes over a
Manager with an in-memory link and a manual clock."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from live_transcription.api.app import Runtime, create_app
from live_transcription.clock import ManualClock
from live_transcription.config import load_settings
from live_transcription.logs import LimitedStreamHandler, RepeatLimiter, TextFormatter
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import Manager
from live_transcription.stt.base import Language
from tests.fake_link import LinkFactory, SpeakerFactory
from tests.integration.test_faults_support import metric
from tests.unit.test_api import SECRET, auth
from tests.waiting import until

LANGS = {"en": Language("en", "English")}


@dataclass
class Api:
    client: httpx.AsyncClient
    links: LinkFactory
    manager: Manager
    clock: ManualClock


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    settings = load_settings(
        APP_SECRET=SECRET,
        APP_VERSION="4.5.6",
        LT_HPB_URL="https://hpb.example",
        LT_INTERNAL_SECRET="internal",
        NEXTCLOUD_URL="https://cloud.example",
    )
    links = LinkFactory(error=ConnectionRefusedError(111, "Connection refused"))
    clock = ManualClock()
    manager = Manager(
        link_factory=links,
        speaker_factory=SpeakerFactory(),
        languages=LANGS,
        admission=Admission(max_speakers=10, max_speakers_per_room=5),
        join_timeout=3600,
        max_rooms=5,
        max_targets_per_room=2,
        clock=clock,
    )
    async with manager:
        app = create_app(Runtime(settings=settings, manager=manager, engine_name="fake"))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://exapp") as client:
            yield Api(client, links, manager, clock)


def enable(room: str, session: str = "talk-a") -> dict[str, object]:
    return {"roomToken": room, "ncSessionId": session, "enable": True}


async def health(api: Api) -> tuple[int, dict[str, object]]:
    response = await api.client.get("/healthz")
    ready = await api.client.get("/readyz")
    body = response.json()
    assert ready.status_code == (200 if body["ready"] else 503)
    return response.status_code, body


async def test_hpb_down_is_degraded_then_failing_and_ok_once_it_is_back(api: Api) -> None:
    joined_before = metric("live_transcription_rooms_opened_total")
    refused_before = metric("live_transcription_room_joins_failed_total", {"cause": "connection-refused"})
    assert (await health(api))[1]["status"] == "ok"

    api.links.fail = True
    refused = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable("room1"))
    assert refused.status_code == 503
    # plain words for Talk; the exception's repr stays in the log
    assert refused.json() == {"error": "cannot reach the signaling server (connection refused)"}
    status, body = await health(api)
    assert (status, body["status"], body["ready"]) == (200, "degraded", True)
    assert body["reasons"] == ["1 HPB join(s) failed in the last 60 s (connection refused)"]
    assert body["rooms"] == 0  # the failed room is gone: only the history tells

    await api.clock.advance(61)
    assert (await health(api))[1]["status"] == "ok"  # nothing failed within the window
    await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable("room1"))
    await api.clock.advance(30)
    await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable("room2"))
    assert (await health(api))[1]["status"] == "degraded"
    await api.clock.advance(31)
    await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable("room3"))
    status, body = await health(api)
    assert (status, body["status"], body["ready"]) == (503, "failing", False)
    assert body["reasons"] == ["every HPB join failed for 61 s (connection refused)"]

    api.links.fail = False
    joined = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable("room1"))
    assert joined.status_code == 200
    status, body = await health(api)
    assert (status, body["status"], body["reasons"]) == (200, "ok", [])

    # the metrics count joins, not attempts; failures by cause
    assert metric("live_transcription_rooms_opened_total") == joined_before + 1
    refused_after = metric("live_transcription_room_joins_failed_total", {"cause": "connection-refused"})
    assert refused_after == refused_before + 4


async def test_an_outage_is_one_warning_with_its_cause_and_one_info_at_its_end(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="live_transcription")
    api.links.fail = True
    for room in ("room1", "room2", "room3"):
        await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable(room))
    await api.clock.advance(12)
    api.links.fail = False
    await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable("room1"))
    outage = [r for r in caplog.records if r.__dict__.get("event") == "hpb-outage"]
    assert [(r.levelname, r.getMessage()) for r in outage] == [
        ("WARNING", "cannot reach the signaling server (connection refused): rooms cannot be joined or kept"),
        (
            "INFO",
            "signaling server reachable again after 12 s "
            "(3 join(s) and 0 reconnection attempt(s) failed meanwhile)",
        ),
    ]
    assert [r.__dict__["state"] for r in outage] == ["started", "ended"]
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == ["WARNING"]
    # each refused request is logged with the details, for the operator only
    details = [r.getMessage() for r in caplog.records if r.getMessage().startswith("enable refused in room")]
    assert len(details) == 3
    assert "ConnectionRefusedError" not in details[0]  # the link's repr: HpbUnavailable('refused')
    assert "HpbUnavailable" in details[0]


async def test_rooms_stuck_joining_a_silent_hpb_and_the_room_cap_show(api: Api) -> None:
    api.links.hang = True
    requests = [
        asyncio.create_task(api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable(f"r{i}")))
        for i in range(5)
    ]
    await until(lambda: len(api.manager.rooms()) == 5)
    refused = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable("r-extra"))
    assert refused.status_code == 503
    assert refused.json() == {"error": "room cap of 5 reached"}
    assert (await health(api))[1]["reasons"] == ["room cap of 5 reached"]
    await api.clock.advance(11)
    status, body = await health(api)
    assert (status, body["status"]) == (200, "degraded")
    assert body["reasons"] == [
        "5 room(s) waiting more than 10 s for the HPB to join them",
        "room cap of 5 reached",
    ]
    # leave and disable cancel the pending joins: the waiting requests are answered
    left = await api.client.post("/api/v1/call/leave", headers=auth(), json={"roomToken": "r0"})
    assert left.status_code == 200
    first = await asyncio.wait_for(requests[0], 15)
    assert first.status_code == 503
    assert first.json() == {"error": "the call was left before it was joined (leave)"}
    assert (await api.client.put("/enabled?enabled=0", headers=auth())).status_code == 200
    rest = await asyncio.wait_for(asyncio.gather(*requests[1:]), 15)
    assert {r.json()["error"] for r in rest} == {"the call was left before it was joined (disabled)"}
    await until(lambda: api.manager.rooms() == [])
    assert api.links.links == {}  # no join went on
    status, body = await health(api)
    assert body["reasons"] == ["the app is disabled in Nextcloud"]  # cancelled joins are no HPB failure


async def test_targets_per_room_are_capped(api: Api) -> None:
    for session in ("talk-a", "talk-b", "talk-a"):  # a repeated viewer is no new target
        reply = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable("r", session))
        assert reply.status_code == 200
    refused = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=enable("r", "talk-c"))
    assert refused.status_code == 503
    assert refused.json() == {"error": "cap of 2 caption viewers per room reached"}
    room = api.manager.room("r")
    assert room is not None
    await until(lambda: room.target_count == 2)


async def test_openapi_version_and_head_heartbeat(api: Api) -> None:
    assert (await api.client.get("/openapi.json", headers=auth())).json()["info"]["version"] == "4.5.6"
    head = await api.client.head("/heartbeat")
    assert head.status_code == 200
    assert head.content == b""


async def test_disable_then_enable_both_logged_through_the_repeat_limiter(api: Api) -> None:
    stream = io.StringIO()
    handler = LimitedStreamHandler(stream, RepeatLimiter(window=3600))
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("live_transcription.api.app")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for value in (0, 1, 0, 1, 0, 0, 0):
            await api.client.put(f"/enabled?enabled={value}", headers=auth())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
    app_lines = [line.split(": ", 1)[1] for line in stream.getvalue().splitlines() if ": app " in line]
    # every change shows, the last state line is the real state, and the
    # repeated "disabled" is counted (written when the handler closed)
    assert app_lines == [
        "app disabled",
        "app enabled",
        "app disabled",
        "app enabled",
        "app disabled",
        "app disabled (+1 repeats held back)",
    ]
