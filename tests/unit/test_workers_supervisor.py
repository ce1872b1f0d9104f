"""The supervisor as Talk and operators see it: the ExApp's routes over a
``SupervisorRuntime`` whose workers are tasks of the test (real channel,
fake HPB links); and how ``/healthz`` combines the workers' answers (pure)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from live_transcription.api.app import create_app
from live_transcription.api.health import assess
from live_transcription.rooms.joins import JoinReport
from live_transcription.rooms.manager import RoomSummary
from live_transcription.workers.pool import READY, RESTARTING, WorkerView
from live_transcription.workers.protocol import WorkerStatus
from live_transcription.workers.supervisor import (
    SupervisorRuntime,
    combine,
    combine_joins,
    supervised_service,
)
from tests.waiting import until
from tests.workers_support import InProcessLauncher, settings_for

SECRET = "supervisor-secret"


def auth() -> dict[str, str]:
    token = base64.b64encode(f"admin:{SECRET}".encode()).decode()
    return {
        "EX-APP-ID": "live_transcription",
        "EX-APP-VERSION": "0.1.0",
        "AA-VERSION": "3.0.0",
        "AUTHORIZATION-APP-API": token,
    }


@dataclass
class Served:
    client: httpx.AsyncClient
    runtime: SupervisorRuntime
    launcher: InProcessLauncher


@contextlib.asynccontextmanager
async def served() -> AsyncIterator[Served]:
    settings = settings_for(APP_SECRET=SECRET, LT_WORKERS=2)
    async with asyncio.TaskGroup() as tasks:
        launcher = InProcessLauncher(tasks, settings)
        async with supervised_service(settings, launcher=launcher) as runtime:
            app = create_app(runtime)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://exapp") as client:
                yield Served(client, runtime, launcher)


async def test_talks_routes_health_and_metrics_through_the_supervisor() -> None:
    async with served() as env:
        client = env.client
        languages = (await client.get("/api/v1/languages", headers=auth())).json()
        assert set(languages) == {"en", "fr"}
        for index in range(2):
            body = {
                "roomToken": f"room{index}",
                "ncSessionId": f"talk-{index}",
                "enable": True,
                "langId": "fr",
            }
            reply = await client.post("/api/v1/call/transcribe", json=body, headers=auth())
            assert reply.status_code == 200, reply.text
        reply = await client.post(
            "/api/v1/call/set-language", json={"roomToken": "nowhere", "langId": "en"}, headers=auth()
        )
        assert reply.status_code == 404 and reply.json() == {"error": "no active transcription in this room"}

        health = (await client.get("/healthz")).json()
        assert health["status"] == "ok", health
        assert health["rooms"] == 2 and health["targets"] == 2
        workers = health["workers"]
        assert (workers["count"], workers["ready"], workers["restarts"]) == (2, 2, 0)
        assert [p["rooms"] for p in workers["processes"]] == [1, 1]
        assert all(p["state"] == "ready" and p["answering"] for p in workers["processes"])

        text = (await client.get("/metrics")).text
        families = {family.name: family for family in text_string_to_metric_families(text)}
        # (these workers share the test's registry: the values are the process integration test's)
        sent = families["live_transcription_captions_sent"].samples
        assert {s.labels["worker"] for s in sent} == {"0", "1"}
        assert not [s for s in families["live_transcription_http_connections"].samples if s.labels]
        ready = [s for s in families["live_transcription_workers"].samples if s.labels["state"] == "ready"]
        assert [s.value for s in ready] == [2.0]
        types = [line for line in text.splitlines() if line.startswith("# TYPE")]
        assert len(types) == len(set(types))

        # a worker that stopped: health says so until it is back and its room re-opened
        victim = env.runtime.pool.workers[0]
        victim.kill()
        await until(lambda: victim.state == RESTARTING or victim.restarts == 1)
        await until(lambda: victim.state == READY and env.runtime.pool.rooms_reopening == 0)
        health = (await client.get("/healthz")).json()
        assert health["workers"]["restarts"] == 1
        assert health["workers"]["processes"][0]["last_exit"] == "killed by SIGKILL"
        assert health["rooms"] == 2 and health["targets"] == 2

        # disabling the app leaves every call, on every worker
        assert (await client.put("/enabled?enabled=0", headers=auth())).status_code == 200
        await until(lambda: env.runtime.pool.load().rooms == 0)


def status(**overrides: object) -> WorkerStatus:
    fields: dict[str, object] = {
        "engine_error": None,
        "engine_ready": True,
        "accepting": True,
        "speakers_active": 2,
        "speakers_cap": 250,
        "speakers_refused": 1,
        "rooms_cap": 100,
        "rss_bytes": 100,
        "rooms": (RoomSummary("r1", "en", 1, 0, 2, 0, "connected"),),
        "joins": None,
    }
    return WorkerStatus(**{**fields, **overrides})  # type: ignore[arg-type]


def view(
    index: int, state: str = READY, worker_status: WorkerStatus | None = None, **extra: object
) -> WorkerView:
    return WorkerView(
        index=index,
        pid=100 + index,
        state=state,
        rooms=1,
        speakers=2,
        restarts=int(extra.get("restarts", 0)),  # type: ignore[call-overload]
        last_exit=extra.get("last_exit"),  # type: ignore[arg-type]
        status=worker_status,
    )


def combined(*views: WorkerView, reopening: int = 0) -> tuple[list[str], str]:
    inputs = combine(
        views,
        missing_config=[],
        engine_name="instant",
        enabled=True,
        accepting=True,
        speakers_cap=500,
        rooms_cap=200,
        supervisor_rss=10,
        rooms_reopening=reopening,
    )
    health = assess(inputs)
    return health.reasons, health.status


def test_health_sums_the_workers_and_names_a_worker_that_stopped() -> None:
    inputs = combine(
        [view(0, worker_status=status()), view(1, worker_status=status(rss_bytes=50))],
        missing_config=[],
        engine_name="instant",
        enabled=True,
        accepting=True,
        speakers_cap=500,
        rooms_cap=200,
        supervisor_rss=10,
    )
    assert (inputs.speakers_active, inputs.speakers_refused, inputs.rss_bytes) == (4, 2, 160)
    assert len(inputs.rooms) == 2
    assert assess(inputs).status == "ok"

    reasons, state = combined(
        view(0, worker_status=status()),
        view(1, RESTARTING, None, restarts=1, last_exit="killed by SIGKILL"),
        reopening=1,
    )
    assert state == "degraded"
    assert "worker 1 stopped (killed by SIGKILL) and is being restarted" in reasons
    assert "1 room(s) being re-opened after their worker stopped" in reasons

    reasons, state = combined(view(0, worker_status=status()), view(1, READY, None))
    assert (state, reasons) == ("degraded", ["worker 1 does not answer"])

    reasons, state = combined(view(0, RESTARTING), view(1, RESTARTING))
    assert state == "failing" and "no worker process is running" in reasons


def test_a_room_of_a_worker_that_cannot_deliver_shows_in_the_combined_health() -> None:
    stalled = RoomSummary("r2", "en", 1, 1, 1, 0, "connected", delivery_stalled=True)
    reasons, state = combined(
        view(0, worker_status=status()), view(1, worker_status=status(rooms=(stalled,)))
    )
    assert state == "degraded"
    assert any("have captions to send but a target without an HPB session" in r for r in reasons)


def test_joins_of_all_workers_as_one_report() -> None:
    def report(failures: int, cause: str | None, failing_for: float | None) -> JoinReport:
        return JoinReport(1, 0, 10.0, failures, cause, failing_for, 60.0)

    joined = combine_joins([report(0, None, None), report(3, "connection refused", 75.0)])
    assert joined == JoinReport(2, 0, 10.0, 3, "connection refused", 75.0, 60.0)
    assert combine_joins([]) is None
