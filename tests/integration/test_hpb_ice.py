"""ICE server discovery against a local HTTP server standing in for Nextcloud."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiortc import RTCIceServer

from live_transcription.hpb.ice import app_api_headers, fetch_ice_servers, parse_ice_servers

SETTINGS = {
    "ocs": {
        "meta": {"status": "ok", "statuscode": 200},
        "data": {
            "signalingMode": "external",
            "stunservers": [{"urls": ["stun:stun.example:443"]}],
            "turnservers": [
                {
                    "urls": ["turn:turn.example:3478?transport=udp"],
                    "username": "1700000000:ltbot",
                    "credential": "c2VjcmV0",
                },
                {"urls": ["turn:broken.example"]},
            ],
        },
    }
}


def test_parse_turns_ocs_data_into_ice_servers() -> None:
    servers = parse_ice_servers(SETTINGS)
    assert [(s.urls, s.username, s.credential) for s in servers] == [
        (["stun:stun.example:443"], None, None),
        (["turn:turn.example:3478?transport=udp"], "1700000000:ltbot", "c2VjcmV0"),
    ]
    assert parse_ice_servers({"stunservers": [{"url": "stun:a"}]})[0].urls == ["stun:a"]
    junks: list[object] = [None, 1, [], {"ocs": 3}, {"stunservers": [1, {"urls": 5}]}]
    for junk in junks:
        assert parse_ice_servers(junk) == []


@pytest.fixture
async def nextcloud() -> AsyncIterator[tuple[str, list[Any]]]:
    seen: list[Any] = []

    async def settings(request: web.Request) -> web.Response:
        seen.append(request)
        if request.query.get("token") == "broken":
            return web.Response(status=500, text="oops")
        if request.query.get("token") == "garbage":
            return web.Response(text="<html>")
        return web.json_response(SETTINGS)

    app = web.Application()
    app.router.add_get("/ocs/v2.php/apps/spreed/api/v3/signaling/settings", settings)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_fetch_sends_app_api_headers(nextcloud: tuple[str, list[Any]]) -> None:
    url, seen = nextcloud
    headers = app_api_headers(app_id="live_transcription", app_version="1.2.3", app_secret="s")
    servers = await fetch_ice_servers(url, headers, room_token="tok")
    assert len(servers) == 2 and isinstance(servers[0], RTCIceServer)
    sent = seen[0].headers
    assert sent["OCS-APIRequest"] == "true" and sent["Accept"] == "application/json"
    assert sent["EX-APP-ID"] == "live_transcription" and sent["EX-APP-VERSION"] == "1.2.3"
    assert "AA-VERSION" in sent
    assert base64.b64decode(sent["AUTHORIZATION-APP-API"]) == b":s"
    assert seen[0].query["token"] == "tok"


@pytest.mark.parametrize("token", ["broken", "garbage"])
async def test_fetch_falls_back_to_no_servers(
    nextcloud: tuple[str, list[Any]], token: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = nextcloud
    assert await fetch_ice_servers(url, {}, room_token=token) == []
    assert "host candidates only" in caplog.text


async def test_fetch_unreachable_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    assert await fetch_ice_servers("http://127.0.0.1:9", {}) == []
    assert "host candidates only" in caplog.text
