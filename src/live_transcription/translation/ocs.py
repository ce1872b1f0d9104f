"""Nextcloud Task Processing, consumer side, as an ExApp (OCS over HTTP).

``GET  /ocs/v2.php/taskprocessing/tasks_consumer/tasktypes``
``POST /ocs/v2.php/taskprocessing/tasks_consumer/schedule``
``GET  /ocs/v2.php/taskprocessing/tasks_consumer/task/{id}``

Requests carry the AppAPI headers exactly as nc_py_api sends them (its
``AsyncNextcloudApp`` has no wrapper for these routes, only a generic
``ocs()`` on another HTTP stack; aiohttp is what the service already uses).
Answers come in the OCS envelope ``{"ocs": {"meta": {...}, "data": ...}}``;
the parsing below is pure, the client around it thin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Self

import aiohttp

from live_transcription.translation.languages import TASK_TYPE

BASE = "/ocs/v2.php/taskprocessing/tasks_consumer"

SUCCESSFUL = "STATUS_SUCCESSFUL"
FAILED = "STATUS_FAILED"
CANCELLED = "STATUS_CANCELLED"
UNKNOWN = "STATUS_UNKNOWN"
FINISHED = frozenset({SUCCESSFUL, FAILED, CANCELLED, UNKNOWN})


class TaskProcessingError(Exception):
    """A request failed; worth trying again later (network, 5xx, bad answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ProviderMissing(TaskProcessingError):
    """Nextcloud answered 412 to a schedule: no provider for the task type."""


class RateLimited(TaskProcessingError):
    """Nextcloud answered 429: back off (``retry_after`` seconds when it says)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message, 429)
        self.retry_after = retry_after


class TaskRejected(TaskProcessingError):
    """Nextcloud refused this one request for good (400, 401, 404)."""


@dataclass(frozen=True, slots=True)
class TaskState:
    id: int
    status: str
    output: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    from datetime import UTC, datetime  # noqa: PLC0415 - only for the rare date form

    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def parse_answer(status: int, body: bytes, retry_after: str | None = None) -> object:
    """An OCS answer -> its ``data``, or the matching exception."""
    message = f"HTTP {status}"
    data: object = None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("ocs"), dict):
        ocs = document["ocs"]
        data = ocs.get("data")
        meta = ocs.get("meta")
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            message += f": {data['message']}"
        elif isinstance(meta, dict) and meta.get("message"):
            message += f": {meta['message']}"
    if status == 429:
        raise RateLimited(message, _retry_after(retry_after))
    if status == 412:
        raise ProviderMissing(message, status)
    if status in (400, 401, 403, 404):
        raise TaskRejected(message, status)
    if status >= 300:
        raise TaskProcessingError(message, status)
    if not (isinstance(document, dict) and isinstance(document.get("ocs"), dict)):
        raise TaskProcessingError(f"HTTP {status}: not an OCS answer", status)
    return data


def parse_task(data: object) -> TaskState:
    """``{"task": {...}}`` (schedule, task) -> TaskState; ValueError when malformed."""
    task = data.get("task") if isinstance(data, dict) else None
    if not isinstance(task, dict):
        raise ValueError("no 'task' object")
    task_id, status = task.get("id"), task.get("status")
    if not isinstance(task_id, int) or isinstance(task_id, bool) or not isinstance(status, str):
        raise ValueError("task without an integer id or a status")
    output = task.get("output")
    text = output.get("output") if isinstance(output, dict) else None
    return TaskState(task_id, status, text if isinstance(text, str) else None)


class TaskProcessingClient:
    """One HTTP session to Nextcloud for the process's translation tasks."""

    def __init__(
        self,
        nextcloud_url: str,
        headers: dict[str, str],
        *,
        app_id: str,
        verify_tls: bool = True,
        request_timeout: float = 15.0,
        max_connections: int = 32,
    ) -> None:
        self._base = nextcloud_url.rstrip("/") + BASE
        self._headers = dict(headers)
        self._app_id = app_id
        self._ssl = verify_tls
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            headers=self._headers,
            connector=aiohttp.TCPConnector(limit=self._max_connections),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, body: dict[str, object] | None = None) -> object:
        if self._session is None:
            raise TaskProcessingError("client not started")
        try:
            async with self._session.request(
                method, self._base + path, json=body, params={"format": "json"}, ssl=self._ssl
            ) as response:
                raw = await response.read()
                return parse_answer(response.status, raw, response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TaskProcessingError(f"{method} {path}: {exc!r}") from exc

    async def task_types(self) -> object:
        return await self._request("GET", "/tasktypes")

    async def schedule(self, text: str, origin: str, target: str, custom_id: str) -> TaskState:
        data = await self._request(
            "POST",
            "/schedule",
            {
                "type": TASK_TYPE,
                "appId": self._app_id,
                "customId": custom_id,
                "input": {"input": text, "origin_language": origin, "target_language": target},
            },
        )
        try:
            return parse_task(data)
        except ValueError as exc:
            raise TaskProcessingError(f"schedule: {exc}") from exc

    async def task(self, task_id: int) -> TaskState:
        data = await self._request("GET", f"/task/{task_id}")
        try:
            return parse_task(data)
        except ValueError as exc:
            raise TaskProcessingError(f"task {task_id}: {exc}") from exc
