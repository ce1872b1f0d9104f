"""STUN/TURN servers from Nextcloud Talk's signaling settings.

``GET {NEXTCLOUD_URL}/ocs/v2.php/apps/spreed/api/v3/signaling/settings`` with
AppAPI authentication. When it fails the service runs with no ICE servers
(host candidates only, enough for an SFU on the same network) and says so.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiortc import RTCIceServer

log = logging.getLogger(__name__)

SETTINGS_PATH = "/ocs/v2.php/apps/spreed/api/v3/signaling/settings"


def _urls(entry: Mapping[str, Any]) -> list[str]:
    urls = entry.get("urls", entry.get("url"))
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list):
        return []
    return [u for u in urls if isinstance(u, str) and u]


def parse_ice_servers(payload: object) -> list[RTCIceServer]:
    """The OCS answer (``{"ocs": {"data": {...}}}`` or its ``data``) -> ICE
    servers. Entries without usable URLs are skipped; never raises."""
    data: object = payload
    if isinstance(data, dict) and isinstance(data.get("ocs"), dict):
        data = data["ocs"].get("data")
    if not isinstance(data, dict):
        return []
    servers: list[RTCIceServer] = []
    for entry in data.get("stunservers") or []:
        if isinstance(entry, dict) and (urls := _urls(entry)):
            servers.append(RTCIceServer(urls=urls))
    for entry in data.get("turnservers") or []:
        if isinstance(entry, dict) and (urls := _urls(entry)):
            username, credential = entry.get("username"), entry.get("credential")
            if isinstance(username, str) and isinstance(credential, str):
                servers.append(RTCIceServer(urls=urls, username=username, credential=credential))
    return servers


def app_api_headers(
    *, app_id: str, app_version: str, app_secret: str, user_id: str = "", aa_version: str = "3.0.0"
) -> dict[str, str]:
    token = base64.b64encode(f"{user_id}:{app_secret}".encode()).decode()
    return {
        "OCS-APIRequest": "true",
        "Accept": "application/json",
        "EX-APP-ID": app_id,
        "EX-APP-VERSION": app_version,
        "AA-VERSION": aa_version,
        "AUTHORIZATION-APP-API": token,
    }


async def fetch_ice_servers(
    nextcloud_url: str,
    headers: Mapping[str, str],
    *,
    room_token: str | None = None,
    verify_tls: bool = True,
    deadline: float = 10.0,
) -> list[RTCIceServer]:
    """Ask Nextcloud for STUN/TURN servers; an empty list (logged) on failure."""
    url = nextcloud_url.rstrip("/") + SETTINGS_PATH
    params = {"token": room_token} if room_token else None
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=deadline)) as session,
            session.get(url, headers=dict(headers), params=params, ssl=verify_tls) as response,
        ):
            if response.status != 200:
                log.warning(
                    "no STUN/TURN servers from Nextcloud (HTTP %d): host candidates only",
                    response.status,
                )
                return []
            payload = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("no STUN/TURN servers from Nextcloud (%r): host candidates only", exc)
        return []
    servers = parse_ice_servers(payload)
    if not servers:
        log.warning("Nextcloud lists no STUN/TURN servers: host candidates only")
    return servers
