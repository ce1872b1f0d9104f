"""AppAPI authentication, both ways.

Incoming: every route but ``/heartbeat`` carries ``EX-APP-ID`` and
``AUTHORIZATION-APP-API`` (base64 of ``"<userid>:<APP_SECRET>"``). This is
checked here rather than with nc_py_api's middleware because that one
compares the secret in non-constant time, prints both secrets on a mismatch
and answers in plain text, where Talk's contract wants JSON errors.

Outgoing requests carry the same headers: ``hpb.ice.app_api_headers``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def check_request(headers: dict[str, str], app_id: str, secret: str) -> str | None:
    """Return the reason the request is not from AppAPI, or None when it is."""
    if not secret:
        return "APP_SECRET is not configured"
    given_id = headers.get("ex-app-id", "")
    if not given_id or not headers.get("authorization-app-api"):
        return "missing AppAPI headers"
    if not hmac.compare_digest(given_id.encode(), app_id.encode()):
        return "wrong EX-APP-ID"
    try:
        decoded = base64.b64decode(headers["authorization-app-api"], validate=True)
    except (binascii.Error, ValueError):
        return "malformed AUTHORIZATION-APP-API"
    _, sep, given_secret = decoded.partition(b":")
    if not sep:
        return "malformed AUTHORIZATION-APP-API"
    if not hmac.compare_digest(given_secret, secret.encode()):
        return "wrong app secret"
    return None


async def send_json(send: Send, status: int, body: dict[str, object], *, close: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class AppApiAuth:
    """Pure ASGI middleware: 401 JSON unless the AppAPI headers are right."""

    def __init__(self, app: ASGIApp, *, app_id: str, secret: str, open_paths: Iterable[str]):
        self.app = app
        self.app_id = app_id
        self.secret = secret
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        reason = check_request(headers, self.app_id, self.secret)
        if reason is not None:
            await send_json(send, 401, {"error": f"unauthorized: {reason}"})
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Pure ASGI middleware: 413 JSON for bodies over ``max_bytes`` (declared
    or streamed), before the route reads them."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_json(send, 400, {"error": "bad Content-Length"})
                    return
                if declared > self.max_bytes:
                    await send_json(send, 413, {"error": "request body too large"})
                    return
        # Talk's bodies are tiny: read up to the cap, then replay to the app.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # disconnect: let the app see it
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await send_json(send, 413, {"error": "request body too large"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
