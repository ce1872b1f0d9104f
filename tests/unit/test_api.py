"""The ExApp HTTP contract: routes, AppAPI auth, validation, status codes."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from live_transcription.api.app import Runtime, create_app
from live_transcription.config import load_settings
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import Manager
from live_transcription.stt.base import Language
from tests.fake_link import LinkFactory, SpeakerFactory

SECRET = "s3cret-app-secret"
LANGS = {"en": Language("en", "English"), "fr": Language("fr", "French")}


def auth(user: str = "admin", secret: str = SECRET, app_id: str = "live_transcription") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{secret}".encode()).decode()
    return {
        "EX-APP-ID": app_id,
        "EX-APP-VERSION": "0.1.0",
        "AA-VERSION": "3.0.0",
        "AUTHORIZATION-APP-API": token,
    }


@dataclass
class Api:
    client: httpx.AsyncClient
    links: LinkFactory
    manager: Manager
    runtime: Runtime
    provider_error: list[str]


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    settings = load_settings(
        APP_SECRET=SECRET,
        LT_HPB_URL="https://hpb.example",
        LT_INTERNAL_SECRET="internal",
        NEXTCLOUD_URL="https://cloud.example",
    )
    links = LinkFactory()
    provider_error: list[str] = []
    manager = Manager(
        link_factory=links,
        speaker_factory=SpeakerFactory(),
        languages=LANGS,
        admission=Admission(max_speakers=10, max_speakers_per_room=5),
        join_timeout=5,
        provider_failure=lambda: provider_error[0] if provider_error else None,
    )
    async with manager:
        runtime = Runtime(settings=settings, manager=manager, engine_name="fake")
        app = create_app(runtime)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://exapp") as client:
            yield Api(client, links, manager, runtime, provider_error)


async def test_heartbeat_is_open(api: Api) -> None:
    response = await api.client.get("/heartbeat")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/init"),
        ("GET", "/enabled"),
        ("PUT", "/enabled?enabled=1"),
        ("GET", "/capabilities"),
        ("GET", "/api/v1/languages"),
        ("POST", "/api/v1/call/transcribe"),
        ("POST", "/api/v1/call/set-language"),
        ("POST", "/api/v1/call/leave"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        auth(secret="wrong"),
        auth(app_id="other_app"),
        {**auth(), "AUTHORIZATION-APP-API": "%%%not-base64"},
        {**auth(), "AUTHORIZATION-APP-API": base64.b64encode(b"no-colon").decode()},
    ],
    ids=["none", "wrong-secret", "wrong-app", "bad-base64", "no-colon"],
)
async def test_every_route_but_heartbeat_needs_appapi_auth(
    api: Api, method: str, path: str, headers: dict[str, str]
) -> None:
    response = await api.client.request(method, path, headers=headers, json={})
    assert response.status_code == 401
    assert "error" in response.json()
    assert SECRET not in response.text
    assert api.links.links == {}


async def test_capabilities_and_languages(api: Api) -> None:
    caps = (await api.client.get("/capabilities", headers=auth())).json()
    assert caps == {
        "live_transcription": {
            "version": "0.1.0",
            "features": ["live_transcription"],
            "live_transcription": {
                "supported_languages": {
                    "en": {"name": "English", "metadata": {"separator": " ", "rtl": False}},
                    "fr": {"name": "French", "metadata": {"separator": " ", "rtl": False}},
                }
            },
        }
    }
    langs = (await api.client.get("/api/v1/languages", headers=auth())).json()
    assert langs == caps["live_transcription"]["live_transcription"]["supported_languages"]


async def test_init_and_enabled(api: Api) -> None:
    assert (await api.client.post("/init", headers=auth())).json() == {}
    assert (await api.client.get("/enabled", headers=auth())).json() == {"enabled": True}
    response = await api.client.put("/enabled?enabled=0", headers=auth())
    assert response.json() == {"error": ""}
    assert not api.runtime.enabled
    body = {"roomToken": "abc", "ncSessionId": "s1", "enable": True}
    refused = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=body)
    assert refused.status_code == 503
    assert (await api.client.put("/enabled?enabled=2", headers=auth())).status_code == 400
    await api.client.put("/enabled?enabled=1", headers=auth())
    ok = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=body)
    assert ok.status_code == 200


async def test_transcribe_enable_disable_and_leave(api: Api) -> None:
    body = {"roomToken": "abc123", "ncSessionId": "talk-1", "enable": True, "langId": "fr"}
    response = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=body)
    assert response.status_code == 200, response.text
    assert "message" in response.json()
    room = api.manager.room("abc123")
    assert room is not None
    assert room.language == "fr"
    body["enable"] = False
    response = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=body)
    assert response.status_code == 200
    lang = await api.client.post(
        "/api/v1/call/set-language", headers=auth(), json={"roomToken": "abc123", "langId": "en"}
    )
    assert lang.status_code == 200
    leave = await api.client.post("/api/v1/call/leave", headers=auth(), json={"roomToken": "abc123"})
    assert leave.status_code == 200
    await api.links.links["abc123"].closed.wait()


@pytest.mark.parametrize(
    "body",
    [
        {"ncSessionId": "s", "enable": True},
        {"roomToken": "abc", "enable": True},
        {"roomToken": 5, "ncSessionId": "s", "enable": True},
        {"roomToken": "abc", "ncSessionId": "s", "enable": "yes"},
        {"roomToken": "abc", "ncSessionId": ["s"], "enable": True},
        {"roomToken": "", "ncSessionId": "s", "enable": True},
        {"roomToken": "../etc", "ncSessionId": "s", "enable": True},
        {"roomToken": "abc", "ncSessionId": "s", "enable": True, "langId": 3},
        [],
        "text",
    ],
)
async def test_transcribe_rejects_bad_bodies(api: Api, body: object) -> None:
    response = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=body)
    assert response.status_code == 400
    assert response.json()["error"].startswith("bad request")
    assert api.links.links == {}


async def test_malformed_json_and_huge_bodies(api: Api) -> None:
    headers = {**auth(), "content-type": "application/json"}
    bad = await api.client.post("/api/v1/call/transcribe", headers=headers, content=b"{not json")
    assert bad.status_code == 400
    assert "error" in bad.json()
    huge = {"roomToken": "abc", "ncSessionId": "x" * 100_000, "enable": True}
    response = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=huge)
    assert response.status_code == 413
    assert "error" in response.json()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * 1024

    streamed = await api.client.post("/api/v1/call/transcribe", headers=headers, content=chunks())
    assert streamed.status_code == 413
    assert api.links.links == {}
    assert (await api.client.get("/heartbeat")).status_code == 200


async def test_unsupported_language_is_400_and_creates_nothing(api: Api) -> None:
    body = {"roomToken": "abc", "ncSessionId": "s", "enable": True, "langId": "xx"}
    response = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=body)
    assert response.status_code == 400
    assert "unsupported language" in response.json()["error"]
    assert api.manager.room("abc") is None
    set_lang = await api.client.post(
        "/api/v1/call/set-language", headers=auth(), json={"roomToken": "abc", "langId": "xx"}
    )
    assert set_lang.status_code == 400


async def test_set_language_and_leave_without_room_are_404(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/call/set-language", headers=auth(), json={"roomToken": "nope", "langId": "en"}
    )
    assert response.status_code == 404
    assert "error" in response.json()
    leave = await api.client.post("/api/v1/call/leave", headers=auth(), json={"roomToken": "nope"})
    assert leave.status_code == 404


async def test_hpb_unreachable_is_503(api: Api) -> None:
    api.links.fail = True
    body = {"roomToken": "abc", "ncSessionId": "s", "enable": True}
    response = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=body)
    assert response.status_code == 503
    assert "signaling" in response.json()["error"]


async def test_provider_failure_is_550(api: Api) -> None:
    api.provider_error.append("credentials rejected")
    body = {"roomToken": "abc", "ncSessionId": "s", "enable": True}
    response = await api.client.post("/api/v1/call/transcribe", headers=auth(), json=body)
    assert response.status_code == 550
    assert "credentials rejected" in response.json()["error"]


async def test_health_reflects_state_and_metrics_are_prometheus(api: Api) -> None:
    health = await api.client.get("/healthz")
    assert health.status_code == 200
    data = health.json()
    assert data["status"] == "ok"
    assert data["ready"] is True
    assert data["rooms"] == 0
    assert data["speakers_connected"] == 0
    assert data["rss_bytes"] > 0
    body = {"roomToken": "abc", "ncSessionId": "s", "enable": True}
    await api.client.post("/api/v1/call/transcribe", headers=auth(), json=body)
    assert (await api.client.get("/healthz")).json()["rooms"] == 1
    api.provider_error.append("credentials rejected")
    api.runtime.engine_error = lambda: "credentials rejected"
    failing = await api.client.get("/healthz")
    assert failing.status_code == 503
    assert failing.json()["status"] == "failing"
    assert (await api.client.get("/readyz")).status_code == 503
    metrics = await api.client.get("/metrics")
    assert metrics.status_code == 200
    assert "process_resident_memory_bytes" in metrics.text
