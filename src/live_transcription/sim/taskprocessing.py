"""A stand-in for Nextcloud's Task Processing OCS API (consumer side, as an
ExApp calls it): a development tool for tests and the demo.

An HTTP server on 127.0.0.1 answering like Nextcloud's
``TaskProcessingApiController`` does for an ExApp:

- ``GET  /ocs/v2.php/taskprocessing/tasks_consumer/tasktypes``: ``{"types": {...}}``
  with ``core:text2text:translate`` and its ``inputShapeEnumValues`` while a
  provider is installed (``types: []`` when no task type is available, as PHP
  encodes an empty array);
- ``POST /ocs/v2.php/taskprocessing/tasks_consumer/schedule``: ``{"task": {...}}``;
  412 ``{"message": "The given provider is not available"}`` without a
  provider; 400 on invalid input (unknown language, missing field);
- ``GET  /ocs/v2.php/taskprocessing/tasks_consumer/task/{id}``: the task, its
  status moving ``STATUS_SCHEDULED`` -> ``STATUS_RUNNING`` ->
  ``STATUS_SUCCESSFUL`` (or ``STATUS_FAILED``); 404 for an unknown id.

Every answer is an OCS v2 envelope ``{"ocs": {"meta": ..., "data": ...}}``
with the HTTP status equal to ``meta.statuscode``. Requests must carry the
AppAPI headers (``EX-APP-ID``, ``EX-APP-VERSION``, ``AA-VERSION``,
``AUTHORIZATION-APP-API`` = base64 ``user:secret``) and ``OCS-APIRequest``;
without them the answer is 401.

Knobs: ``provider`` (installed or not), ``rate_limit`` (answer 429 to the
next N requests), ``fail_when`` / ``hold_when`` (predicates on the input
text: fail the task, or keep it running until ``release``), ``delay``
(seconds from schedule to done; half of it scheduled, half running).

The "translation" it produces is the input marked with the target language
(``[fr] text``): it is a stand-in for a provider, not a translator.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import itertools
import json
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TASK_TYPE = "core:text2text:translate"
BASE = "/ocs/v2.php/taskprocessing/tasks_consumer"

DEFAULT_ORIGIN = (("detect_language", "Detect language"), ("en", "English"), ("de", "German"))
DEFAULT_TARGET = (("en", "English"), ("fr", "French"), ("de", "German"), ("es", "Spanish"))


def stand_in_translation(text: str, origin: str, target: str) -> str:
    return f"[{target}] {text}"


@dataclass
class FakeTask:
    id: int
    input: dict[str, Any]
    app_id: str
    custom_id: str
    scheduled_at: float
    start_at: float
    end_at: float
    fail: bool
    held: bool
    output: str
    released_at: float | None = None

    def status(self, now: float) -> str:
        if now < self.start_at:
            return "STATUS_SCHEDULED"
        end = self.end_at if not self.held else None
        if self.released_at is not None:
            end = max(self.end_at, self.released_at)
        if end is None or now < end:
            return "STATUS_RUNNING"
        return "STATUS_FAILED" if self.fail else "STATUS_SUCCESSFUL"

    def as_json(self, now: float, *, just_scheduled: bool = False) -> dict[str, Any]:
        # Nextcloud answers a schedule with the task as stored: always scheduled
        status = "STATUS_SCHEDULED" if just_scheduled else self.status(now)
        done = status in ("STATUS_SUCCESSFUL", "STATUS_FAILED")
        return {
            "id": self.id,
            "type": TASK_TYPE,
            "lastUpdated": int(now),
            "status": status,
            "userId": None,
            "appId": self.app_id,
            "input": self.input,
            "output": {"output": self.output} if status == "STATUS_SUCCESSFUL" else None,
            "customId": self.custom_id,
            "completionExpectedAt": int(self.end_at),
            "progress": 1.0 if done else 0.0,
            "scheduledAt": int(self.scheduled_at),
            "startedAt": int(self.start_at) if status != "STATUS_SCHEDULED" else None,
            "endedAt": int(now) if done else None,
        }


@dataclass
class FakeTaskProcessing:
    app_id: str = "live_transcription"
    app_secret: str = ""
    """Must match the service's APP_SECRET (an empty secret refuses everybody)."""
    origin_languages: Sequence[tuple[str, str]] = DEFAULT_ORIGIN
    target_languages: Sequence[tuple[str, str]] = DEFAULT_TARGET
    provider: bool = True
    delay: float = 0.0
    rate_limit: int = 0
    """Answer 429 to this many coming requests (schedule and poll alike)."""
    retry_after: str | None = None
    fail_when: Callable[[str], bool] = lambda text: False
    hold_when: Callable[[str], bool] = lambda text: False
    translate: Callable[[str, str, str], str] = stand_in_translation
    tasks: dict[int, FakeTask] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    """(method, path) of every request, in order."""
    refused: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None
    _port: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    # --- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> FakeTaskProcessing:
        app = web.Application()
        app.router.add_get(BASE + "/tasktypes", self._task_types)
        app.router.add_post(BASE + "/schedule", self._schedule)
        app.router.add_get(BASE + "/task/{id}", self._task)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # --- for tests ---------------------------------------------------------------------------------
    def scheduled(self) -> list[dict[str, Any]]:
        """The inputs of every scheduled task, in order."""
        return [task.input for task in self.tasks.values()]

    def release(self, predicate: Callable[[str], bool] = lambda text: True) -> None:
        """Let held tasks whose input text matches finish now."""
        now = time.monotonic()
        for task in self.tasks.values():
            if task.held and task.released_at is None and predicate(str(task.input.get("input", ""))):
                task.released_at = now
        self._touch()

    async def wait_for(self, condition: Callable[[], bool], deadline: float = 30.0) -> None:
        async with asyncio.timeout(deadline):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def _touch(self) -> None:
        self._changed.set()

    # --- HTTP ---------------------------------------------------------------------------------------
    def _ocs(self, status: int, data: object) -> web.Response:
        meta = {
            "status": "ok" if status < 300 else "failure",
            "statuscode": status,
            "message": "OK" if status < 300 else "",
            "totalitems": "",
            "itemsperpage": "",
        }
        return web.Response(
            status=status,
            text=json.dumps({"ocs": {"meta": meta, "data": data}}),
            content_type="application/json",
        )

    def _check(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path))
        self._touch()
        headers = request.headers
        token = headers.get("AUTHORIZATION-APP-API", "")
        try:
            _, _, secret = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            secret = ""
        if (
            headers.get("EX-APP-ID") != self.app_id
            or not headers.get("EX-APP-VERSION")
            or not headers.get("AA-VERSION")
            or headers.get("OCS-APIRequest", "").lower() != "true"
            or not self.app_secret
            or not hmac.compare_digest(secret.encode(), self.app_secret.encode())
        ):
            self.refused += 1
            return self._ocs(401, {"message": "Current user is not logged in"})
        if self.rate_limit > 0:
            self.rate_limit -= 1
            response = self._ocs(429, [])
            if self.retry_after is not None:
                response.headers["Retry-After"] = self.retry_after
            return response
        return None

    def _task_type(self) -> dict[str, Any]:
        def enum(values: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
            return [{"name": name, "value": value} for value, name in values]

        def shape(name: str, description: str, kind: str) -> dict[str, str]:
            return {"name": name, "description": description, "type": kind}

        return {
            "name": "Translate",
            "description": "Translate text from one language to another",
            "inputShape": {
                "input": shape("Input text", "The text to translate", "Text"),
                "origin_language": shape("Origin language", "The language of the origin text", "Enum"),
                "target_language": shape(
                    "Target language", "The desired language to translate the origin text in", "Enum"
                ),
            },
            "inputShapeEnumValues": {
                "origin_language": enum(self.origin_languages),
                "target_language": enum(self.target_languages),
            },
            "inputShapeDefaults": {"origin_language": "detect_language"},
            "optionalInputShape": {},
            "optionalInputShapeEnumValues": {},
            "optionalInputShapeDefaults": {},
            "outputShape": {"output": shape("Result", "The translated text", "Text")},
            "outputShapeEnumValues": {},
            "optionalOutputShape": {},
            "optionalOutputShapeEnumValues": {},
        }

    async def _task_types(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        return self._ocs(200, {"types": {TASK_TYPE: self._task_type()} if self.provider else []})

    async def _schedule(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return self._ocs(400, {"message": "invalid JSON"})
        if not isinstance(body, Mapping):
            return self._ocs(400, {"message": "invalid body"})
        task_input, task_type, app_id = body.get("input"), body.get("type"), body.get("appId")
        if (
            not isinstance(task_input, Mapping)
            or not isinstance(task_type, str)
            or not isinstance(app_id, str)
        ):
            return self._ocs(400, {"message": "input, type and appId are required"})
        if task_type != TASK_TYPE or not self.provider:
            return self._ocs(412, {"message": "The given provider is not available"})
        text, origin, target = (task_input.get(k) for k in ("input", "origin_language", "target_language"))
        if not isinstance(text, str) or not isinstance(origin, str) or not isinstance(target, str):
            return self._ocs(400, {"message": "Provided input not valid: missing input"})
        if origin not in dict(self.origin_languages) or target not in dict(self.target_languages):
            return self._ocs(400, {"message": "Provided input not valid: value not in enum"})
        now = time.monotonic()
        task = FakeTask(
            id=next(self._ids),
            input=dict(task_input),
            app_id=app_id,
            custom_id=str(body.get("customId", "")),
            scheduled_at=now,
            start_at=now + self.delay / 2,
            end_at=now + self.delay,
            fail=self.fail_when(text),
            held=self.hold_when(text),
            output=self.translate(text, origin, target),
        )
        self.tasks[task.id] = task
        return self._ocs(200, {"task": task.as_json(now, just_scheduled=True)})

    async def _task(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        try:
            task = self.tasks[int(request.match_info["id"])]
        except (KeyError, ValueError):
            return self._ocs(404, {"message": "Task not found"})
        return self._ocs(200, {"task": task.as_json(time.monotonic())})
