"""The Task Processing stand-in answers the way Nextcloud's
TaskProcessingApiController does for an ExApp (shapes read from Nextcloud's
source): checked with a plain HTTP client, not with the service's own."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.fakes.nextcloud_taskprocessing import BASE, TASK_TYPE, FakeTaskProcessing

SECRET = "fake-secret"
HEADERS = {
    "EX-APP-ID": "live_transcription",
    "EX-APP-VERSION": "1.0.0",
    "AA-VERSION": "3.0.0",
    "OCS-APIRequest": "true",
    "AUTHORIZATION-APP-API": base64.b64encode(f":{SECRET}".encode()).decode(),
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeTaskProcessing]:
    async with FakeTaskProcessing(app_secret=SECRET) as server:
        yield server


async def call(
    fake: FakeTaskProcessing, method: str, path: str, body: object = None, headers: dict[str, str] = HEADERS
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, fake.url + BASE + path, json=body, headers=headers, params={"format": "json"}
        ) as r,
    ):
        return r.status, await r.json()


def schedule_body(text: str = "hello", origin: str = "en", target: str = "fr") -> dict[str, object]:
    return {
        "type": TASK_TYPE,
        "appId": "live_transcription",
        "customId": "lt-x",
        "input": {"input": text, "origin_language": origin, "target_language": target},
    }


async def test_answers_are_ocs_envelopes_with_nextclouds_shapes(fake: FakeTaskProcessing) -> None:
    status, body = await call(fake, "GET", "/tasktypes")
    assert (
        status == 200 and body["ocs"]["meta"]["statuscode"] == 200 and body["ocs"]["meta"]["status"] == "ok"
    )
    translate = body["ocs"]["data"]["types"][TASK_TYPE]
    assert {"name", "description", "inputShape", "inputShapeEnumValues", "outputShape"} <= translate.keys()
    assert {"name": "French", "value": "fr"} in translate["inputShapeEnumValues"]["target_language"]

    status, body = await call(fake, "POST", "/schedule", schedule_body())
    task = body["ocs"]["data"]["task"]
    assert status == 200 and task["status"] == "STATUS_SCHEDULED" and task["output"] is None
    assert set(task) == {
        "id", "type", "lastUpdated", "status", "userId", "appId", "input", "output", "customId",
        "completionExpectedAt", "progress", "scheduledAt", "startedAt", "endedAt",
    }  # fmt: skip
    status, body = await call(fake, "GET", f"/task/{task['id']}")
    assert body["ocs"]["data"]["task"]["status"] == "STATUS_SUCCESSFUL"
    assert body["ocs"]["data"]["task"]["output"] == {"output": "[fr] hello"}


async def test_tasks_move_from_scheduled_to_running_to_done(fake: FakeTaskProcessing) -> None:
    fake.delay = 0.4
    _, body = await call(fake, "POST", "/schedule", schedule_body())
    task_id = body["ocs"]["data"]["task"]["id"]
    seen: list[str] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2000):  # bounded; each poll is a real request
            async with session.get(f"{fake.url}{BASE}/task/{task_id}", headers=HEADERS) as response:
                status = (await response.json())["ocs"]["data"]["task"]["status"]
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == "STATUS_SUCCESSFUL":
                break
            await asyncio.sleep(0.01)  # a client's poll interval, kept short
    assert seen[-1] == "STATUS_SUCCESSFUL"
    assert seen == sorted(seen, key=["STATUS_SCHEDULED", "STATUS_RUNNING", "STATUS_SUCCESSFUL"].index)


async def test_refusals_are_the_ones_nextcloud_gives(fake: FakeTaskProcessing) -> None:
    status, body = await call(fake, "GET", "/tasktypes", headers={})
    assert status == 401 and body["ocs"]["meta"]["status"] == "failure"
    assert (await call(fake, "GET", "/task/999"))[0] == 404
    assert (await call(fake, "POST", "/schedule", schedule_body(target="xx")))[0] == 400
    fake.fail_when = lambda text: text == "boom"
    _, body = await call(fake, "POST", "/schedule", schedule_body("boom"))
    _, polled = await call(fake, "GET", f"/task/{body['ocs']['data']['task']['id']}")
    assert polled["ocs"]["data"]["task"]["status"] == "STATUS_FAILED"
    fake.rate_limit = 1
    assert (await call(fake, "POST", "/schedule", schedule_body()))[0] == 429
    fake.provider = False
    status, body = await call(fake, "POST", "/schedule", schedule_body())
    assert status == 412 and body["ocs"]["data"] == {"message": "The given provider is not available"}
    _, types = await call(fake, "GET", "/tasktypes")
    assert types["ocs"]["data"] == {"types": []}  # PHP's empty array
