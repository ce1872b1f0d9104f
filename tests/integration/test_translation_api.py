"""Talk's translation contract, route by route and status by status, with
the Task Processing stand-in as Nextcloud."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiortc import RTCIceServer

from live_transcription.api.app import Runtime, create_app
from live_transcription.clock import ManualClock
from live_transcription.config import load_settings
from live_transcription.hpb.ice import app_api_headers
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import Manager
from live_transcription.service import running_service
from live_transcription.stt.base import Language
from live_transcription.translation.ocs import TaskProcessingClient
from live_transcription.translation.room import TranslationSetup
from live_transcription.translation.translator import ERROR_RETRY_SECONDS, Translator
from tests.fake_link import LinkFactory, SpeakerFactory
from tests.fakes.nextcloud_taskprocessing import FakeTaskProcessing
from tests.unit.test_api import SECRET, auth

LANGS = {"en": Language("en", "English"), "fr": Language("fr", "French"), "it": Language("it", "Italian")}
ROOM = "tr4nsl4te"
TTL = 300.0


@dataclass
class Api:
    client: httpx.AsyncClient
    fake: FakeTaskProcessing
    manager: Manager
    clock: ManualClock

    async def post(self, path: str, body: dict[str, object]) -> httpx.Response:
        return await self.client.post(path, json=body, headers=auth())

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(path, headers=auth())

    async def enable(self, session: str, **extra: object) -> httpx.Response:
        body: dict[str, object] = {"roomToken": ROOM, "ncSessionId": session, "enable": True, "langId": "en"}
        return await self.post("/api/v1/call/transcribe", body | extra)

    async def target(self, session: str, lang: str | None, room: str = ROOM) -> httpx.Response:
        body: dict[str, object] = {"roomToken": room, "ncSessionId": session, "langId": lang}
        return await self.post("/api/v1/translation/set-target-language", body)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    settings = load_settings(
        APP_SECRET=SECRET,
        LT_HPB_URL="https://hpb.example",
        LT_INTERNAL_SECRET="internal",
        NEXTCLOUD_URL="https://cloud.example",
    )
    clock = ManualClock()
    headers = app_api_headers(app_id="live_transcription", app_version="0.1.0", app_secret=SECRET)
    async with (
        FakeTaskProcessing(app_secret=SECRET) as fake,
        TaskProcessingClient(fake.url, headers, app_id="live_transcription") as nextcloud,
        Translator(nextcloud, clock=clock, languages_ttl=TTL, max_tasks=2) as translator,
    ):
        manager = Manager(
            link_factory=LinkFactory(),
            speaker_factory=SpeakerFactory(),
            languages=LANGS,
            admission=Admission(max_speakers=10, max_speakers_per_room=5),
            join_timeout=5,
            translation=TranslationSetup(translator, timeout=10, max_jobs=4),
        )
        async with manager:
            app = create_app(Runtime(settings=settings, manager=manager, engine_name="fake"))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://exapp") as client:
                yield Api(client, fake, manager, clock)


def talk_view(capabilities: dict[str, Any]) -> dict[str, Any] | None:
    """What Talk reads: live_transcription -> features -> live_translation."""
    top = capabilities["live_transcription"]
    assert isinstance(top, dict)
    if "live_translation" not in top["features"]:
        assert "live_translation" not in top
        return None
    languages = top["live_translation"]["supported_translation_languages"]
    assert isinstance(languages, dict)
    assert languages["target_languages"], "Talk refuses an empty target list"
    return languages


async def test_capability_appears_and_disappears_with_the_provider(api: Api) -> None:
    body = (await api.get("/capabilities")).json()
    assert body["live_transcription"]["features"] == ["live_transcription", "live_translation"]
    languages = talk_view(body)
    assert languages is not None
    assert languages["origin_languages"]["detect_language"] == {
        "name": "Detect language",
        "metadata": {"separator": " ", "rtl": False},
    }
    assert set(languages["target_languages"]) == {"en", "fr", "de", "es"}
    assert body["live_transcription"]["live_transcription"]["supported_languages"].keys() == LANGS.keys()

    api.fake.provider = False
    await api.clock.advance(TTL + 1)
    assert talk_view((await api.get("/capabilities")).json()) is None
    api.fake.provider = True
    await api.clock.advance(TTL + 1)
    assert talk_view((await api.get("/capabilities")).json()) is not None


async def test_capability_is_off_while_nextcloud_cannot_be_asked(api: Api) -> None:
    api.fake.rate_limit = 1
    assert talk_view((await api.get("/capabilities")).json()) is None


async def test_languages_route_answers_200_550_and_500(api: Api) -> None:
    api.fake.rate_limit = 1
    failed = await api.get(f"/api/v1/translation/languages?roomToken={ROOM}")
    assert failed.status_code == 500 and "error" in failed.json()  # transient: asked again soon
    await api.clock.advance(ERROR_RETRY_SECONDS)
    response = await api.get(f"/api/v1/translation/languages?roomToken={ROOM}")
    assert response.status_code == 200
    assert set(response.json()) == {"origin_languages", "target_languages"}
    assert response.json()["target_languages"]["fr"]["name"] == "French"

    api.fake.rate_limit = 1  # a blip once languages are known keeps serving them
    await api.clock.advance(TTL + 1)
    assert (await api.get("/api/v1/translation/languages")).status_code == 200

    api.fake.provider = False
    await api.clock.advance(TTL + 1)
    response = await api.get(f"/api/v1/translation/languages?roomToken={ROOM}")
    assert response.status_code == 550 and "error" in response.json()


async def test_set_target_language_answers_every_status(api: Api) -> None:
    assert (await api.target("talk-a", "fr")).status_code == 404  # no transcription in that room
    assert (await api.enable("talk-a")).status_code == 200
    room = api.manager.room(ROOM)
    assert room is not None

    ok = await api.target("talk-a", "fr")
    assert ok.status_code == 200 and "message" in ok.json()
    assert room.translation_languages == {"fr"}
    assert (await api.target("talk-a", "xx")).status_code == 400  # not offered by the provider
    same = await api.target("talk-a", "en")
    assert same.status_code == 400 and "language of the call" in same.json()["error"]
    assert (await api.target("talk-stranger", "fr")).status_code == 412  # captions not enabled
    assert (await api.target("talk-a", None)).status_code == 200
    assert room.translation_languages == frozenset()

    api.fake.provider = False
    await api.clock.advance(TTL + 1)
    assert (await api.target("talk-a", "fr")).status_code == 550
    assert (await api.target("talk-a", None)).status_code == 200  # turning it off always works
    bad = await api.post(
        "/api/v1/translation/set-target-language", {"roomToken": ROOM, "ncSessionId": "talk-a", "langId": 3}
    )
    assert bad.status_code == 400 and "langId" in bad.json()["error"]


async def test_room_language_unknown_to_the_provider_without_detection_is_refused(api: Api) -> None:
    api.fake.origin_languages = (("en", "English"),)
    assert (
        await api.post("/api/v1/call/transcribe", {"roomToken": ROOM, "ncSessionId": "t", "langId": "it"})
    ).status_code == 200
    response = await api.target("t", "fr")
    assert response.status_code == 400 and "from 'it'" in response.json()["error"]


async def test_transcribe_takes_a_translation_target(api: Api) -> None:
    response = await api.enable("talk-a", translationTargetLangId="fr")
    assert response.status_code == 200
    room = api.manager.room(ROOM)
    assert room is not None and room.translation_languages == {"fr"}

    refused = await api.enable("talk-b", translationTargetLangId="xx")
    assert refused.status_code == 400
    assert (
        await api.enable("talk-c", translationTargetLangId="en")
    ).status_code == 400  # the call's language
    assert room.target_count == 1  # refused before anything changed

    api.fake.provider = False
    await api.clock.advance(TTL + 1)
    response = await api.post(
        "/api/v1/call/transcribe",
        {"roomToken": "otherroom", "ncSessionId": "talk-d", "enable": True, "translationTargetLangId": "fr"},
    )
    assert response.status_code == 550
    assert api.manager.room("otherroom") is None


async def test_without_a_translation_setup_everything_says_550() -> None:
    settings = load_settings(APP_SECRET=SECRET, LT_HPB_URL="https://hpb.example", LT_INTERNAL_SECRET="i")
    manager = Manager(
        link_factory=LinkFactory(),
        speaker_factory=SpeakerFactory(),
        languages=LANGS,
        admission=Admission(max_speakers=1, max_speakers_per_room=1),
    )
    async with manager:
        app = create_app(Runtime(settings=settings, manager=manager, engine_name="fake"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            capabilities = (await client.get("/capabilities", headers=auth())).json()
            assert talk_view(capabilities) is None
            assert (await client.get("/api/v1/translation/languages", headers=auth())).status_code == 550
            body = {"roomToken": ROOM, "ncSessionId": "t", "enable": True, "translationTargetLangId": "fr"}
            assert (
                await client.post("/api/v1/call/transcribe", json=body, headers=auth())
            ).status_code == 550


async def test_the_service_translates_through_nextcloud_url_with_its_app_secret() -> None:
    async with FakeTaskProcessing(app_secret=SECRET) as fake:
        settings = load_settings(
            APP_SECRET=SECRET,
            NEXTCLOUD_URL=fake.url,
            LT_HPB_URL="https://hpb.example",
            LT_INTERNAL_SECRET="i",
            LT_STT_ENGINE="instant",
        )
        async with running_service(
            settings, link_factory=LinkFactory(), ice_servers=no_ice_servers
        ) as runtime:
            app = create_app(runtime)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://x"
            ) as client:
                languages = talk_view((await client.get("/capabilities", headers=auth())).json())
        assert languages is not None and "fr" in languages["target_languages"]
        assert fake.refused == 0 and fake.requests


async def test_without_nextcloud_url_the_service_runs_with_translation_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(
        APP_SECRET=SECRET, LT_HPB_URL="https://hpb.example", LT_INTERNAL_SECRET="i", LT_STT_ENGINE="instant"
    )
    with caplog.at_level(logging.INFO):
        async with running_service(
            settings, link_factory=LinkFactory(), ice_servers=no_ice_servers
        ) as runtime:
            app = create_app(runtime)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://x"
            ) as client:
                assert talk_view((await client.get("/capabilities", headers=auth())).json()) is None
                response = await client.get("/api/v1/translation/languages", headers=auth())
    assert response.status_code == 550 and "NEXTCLOUD_URL" in response.json()["error"]
    assert any("live translation off" in r.getMessage() for r in caplog.records)


async def no_ice_servers() -> list[RTCIceServer]:
    return []
