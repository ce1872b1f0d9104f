"""``live-transcription serve --workers 2`` as real processes: a supervisor and
two workers, against the HPB emulator, whose participants publish looping
tones through a direct WebRTC bridge and whose viewers are real signaling
clients (the instant engine turns each utterance into words).

- rooms spread over both workers, and each viewer gets captions;
- one worker killed with SIGKILL: it is started again, its calls are
  re-joined with their viewers and language with nothing asked of Talk, and
  new captions reach every viewer of every call; metrics, logs and health
  say what happened;
- SIGTERM to the supervisor: every worker leaves its calls (open lines
  finalised and delivered, ``bye`` to the HPB) and the service exits 0;
- the supervisor killed: its workers see their channel end, leave their
  calls with ``bye`` and exit.

Every wait is on an event or a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from live_transcription.api.server import SHUTDOWN_SECONDS
from live_transcription.logs import short_token
from live_transcription.sim.client import SimClient
from live_transcription.sim.direct_bridge import DirectBridge
from live_transcription.sim.emulator import HpbEmulator
from tests.integration.test_faults_support import BACKEND, talking_wav
from tests.serve_process import free_port, start_serve, wait_serving
from tests.viewers import captions, finals_since

DEADLINE = 60.0
APP_SECRET = "workers-app-secret-" + secrets.token_hex(4)
INTERNAL_SECRET = "workers-internal-" + secrets.token_hex(8)


def auth() -> dict[str, str]:
    token = base64.b64encode(f"admin:{APP_SECRET}".encode()).decode()
    return {
        "EX-APP-ID": "live_transcription",
        "EX-APP-VERSION": "0.1.0",
        "AA-VERSION": "3.0.0",
        "AUTHORIZATION-APP-API": token,
    }


async def until(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Other processes change state: look again shortly."""
    try:
        async with asyncio.timeout(deadline):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not reached within {deadline:.0f} s: {what}") from None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent has not reaped it yet)
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return False


@dataclass
class Service:
    hpb: HpbEmulator
    bridge: DirectBridge
    process: asyncio.subprocess.Process
    client: httpx.AsyncClient
    log: Path
    tmp: Path
    viewers: dict[str, list[SimClient]] = field(default_factory=dict)
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def add_call(self, room: str, speaker: str, freq: float, *, talk: float = 1.0) -> None:
        """A call whose one speaker talks in a loop (one utterance, one final, per cycle)."""
        wav = talking_wav(self.tmp / f"{speaker}.wav", freq, talk, 1.0)
        self.bridge.add_publisher(speaker, wav, loop=True)
        await self.hpb.add_participant(
            room, session_id=speaker, nextcloud_session_id=f"talk-{speaker}", in_call=7, user_id=speaker
        )

    async def add_viewer(self, room: str, talk_session: str, language: str | None = None) -> SimClient:
        viewer = await self.stack.enter_async_context(SimClient(self.hpb.url, room, talk_session))
        self.viewers.setdefault(room, []).append(viewer)
        body: dict[str, Any] = {"roomToken": room, "ncSessionId": talk_session, "enable": True}
        if language is not None:
            body["langId"] = language
        reply = await self.client.post("/api/v1/call/transcribe", json=body, headers=auth())
        assert reply.status_code == 200, reply.text
        return viewer

    async def healthz(self) -> dict[str, Any]:
        body: dict[str, Any] = (await self.client.get("/healthz")).json()
        return body

    async def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        text = (await self.client.get("/metrics")).text
        found: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return found

    def our_session(self, room: str) -> list[str]:
        """Our connected HPB sessions in the room (a killed worker's stays
        in the room, detached, until its resume window ends)."""
        return [sid for sid in self.hpb.sessions_in_room(room, internal=True) if self.hpb.connected(sid)]

    def log_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


@contextlib.asynccontextmanager
async def serve_workers(tmp: Path, workers: int = 2) -> AsyncIterator[Service]:
    bridge = DirectBridge()
    port = free_port()
    log = tmp / "service.log"
    try:
        async with HpbEmulator(INTERNAL_SECRET, BACKEND, bridge=bridge) as hpb:
            prefixes = ("LT_", "APP_", "MODAL_", "NEXTCLOUD")
            env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
            env |= {
                "APP_SECRET": APP_SECRET,
                "APP_PORT": str(port),
                "APP_HOST": "127.0.0.1",
                "NEXTCLOUD_URL": BACKEND,
                "LT_HPB_URL": hpb.url,
                "LT_INTERNAL_SECRET": INTERNAL_SECRET,
                "LT_STT_ENGINE": "instant",
                "LT_ROOM_LINGER_SECONDS": "3600",
            }
            process = await start_serve(env, log, ["--workers", str(workers)])
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as client:
                    await wait_serving(client, process)
                    service = Service(hpb, bridge, process, client, log, tmp)
                    async with service.stack:
                        yield service
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    finally:
        await bridge.aclose()


async def resumed(viewer: SimClient, mark: int, speaker: str, *, language: str | None = None) -> None:
    """A final caption of ``speaker`` (in ``language``) reaches ``viewer`` after ``mark``."""

    def arrived() -> bool:
        return any(
            language is None or data["langId"] == language for _, data in finals_since(viewer, mark, speaker)
        )

    await viewer.wait_for(arrived, deadline=DEADLINE)


ROOMS = {f"c{index}room": f"speaker{index}" for index in range(4)}
"""Tokens told apart by their first four characters, as the logs show them."""


async def test_rooms_spread_and_a_killed_workers_calls_come_back_for_every_viewer(tmp_path: Path) -> None:
    async with serve_workers(tmp_path) as service:
        for index, (room, speaker) in enumerate(ROOMS.items()):
            await service.add_call(room, speaker, 200 + 40 * index)
            await service.add_viewer(room, f"talk-{room}-viewer", "fr")
        await service.add_viewer("c0room", "talk-c0room-second")
        for room, speaker in ROOMS.items():
            for viewer in service.viewers[room]:
                await resumed(viewer, 0, speaker, language="fr")

        # rooms spread over both workers, each call joined once
        async with asyncio.timeout(DEADLINE):
            while (health := await service.healthz())["status"] != "ok":  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # another process's state: polled
        processes = health["workers"]["processes"]
        assert [p["state"] for p in processes] == ["ready", "ready"]
        assert all(p["rooms"] >= 1 for p in processes), processes
        assert sum(p["rooms"] for p in processes) == len(ROOMS)
        assert health["rooms"] == len(ROOMS) and health["targets"] == len(ROOMS) + 1
        assert all(len(service.our_session(room)) == 1 for room in ROOMS)
        found = await service.metrics()
        rooms_by_worker = {labels["worker"]: value for labels, value in found["live_transcription_rooms"]}
        assert rooms_by_worker == {str(p["worker"]): float(p["rooms"]) for p in processes}

        victim = max(processes, key=lambda p: p["rooms"])
        old_sessions = {room: service.our_session(room)[0] for room in ROOMS}
        marks = {room: [len(captions(v)) for v in service.viewers[room]] for room in ROOMS}

        os.kill(victim["pid"], signal.SIGKILL)

        # its calls are joined again (a new HPB session each), with nothing asked of Talk
        def rejoined() -> list[str]:
            return [
                room
                for room in ROOMS
                if (sessions := service.our_session(room)) and sessions[0] != old_sessions[room]
            ]

        await until(lambda: len(rejoined()) == victim["rooms"], "the killed worker's calls are joined again")
        moved = rejoined()
        # new captions reach every viewer of every call: the moved ones from the new session, in French
        for room, speaker in ROOMS.items():
            for viewer, mark in zip(service.viewers[room], marks[room], strict=True):
                await resumed(viewer, mark, speaker, language="fr")
                if room in moved:
                    senders = {sender for sender, _ in finals_since(viewer, mark, speaker)}
                    assert service.our_session(room)[0] in senders
        assert all(len(service.our_session(room)) == 1 for room in ROOMS)

        # the worker is started again; health, metrics and logs say what happened
        def back(body: dict[str, Any]) -> bool:
            worker = body["workers"]["processes"][victim["worker"]]
            return worker["state"] == "ready" and worker["pid"] not in (None, victim["pid"])

        async with asyncio.timeout(DEADLINE):
            while not back(health := await service.healthz()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # another process's state: polled
        worker = health["workers"]["processes"][victim["worker"]]
        assert (worker["restarts"], worker["last_exit"]) == (1, "killed by SIGKILL")
        assert health["workers"]["rooms_reopening"] == 0
        assert health["rooms"] == len(ROOMS) and health["targets"] == len(ROOMS) + 1
        found = await service.metrics()
        restarts = {
            labels["worker"]: value for labels, value in found["live_transcription_worker_restarts_total"]
        }
        assert restarts == {str(victim["worker"]): 1.0}
        reopened = dict(
            (labels["outcome"], value)
            for labels, value in found["live_transcription_worker_rooms_reopened_total"]
        )
        assert reopened == {"reopened": float(victim["rooms"]), "failed": 0.0}
        entries = service.log_entries()
        [warning] = [e for e in entries if (e.get("event"), e.get("state")) == ("worker", "stopped")]
        assert warning["level"] == "warning" and warning["worker"] == victim["worker"]
        assert (
            f"worker {victim['worker']} (pid {victim['pid']}) stopped (killed by SIGKILL)" in warning["msg"]
        )
        assert all(short_token(room) in warning["msg"] for room in moved)
        ready = [e for e in entries if e.get("state") == "ready" and e["worker"] == victim["worker"]]
        assert [e["msg"] for e in ready] == [
            f"worker {victim['worker']} ready (pid {victim['pid']})",
            f"worker {victim['worker']} ready (pid {worker['pid']})",
        ]
        assert not any(room in warning["msg"] for room in moved), "room tokens are logged shortened"


async def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    async with serve_workers(tmp_path) as service:
        rooms = {"drainA": "alice", "drainB": "bob"}
        for index, (room, speaker) in enumerate(rooms.items()):
            # long utterances: a line is open most of the time
            await service.add_call(room, speaker, 210 + 70 * index, talk=6.0)
            await service.add_viewer(room, f"talk-{room}")
        health = await service.healthz()
        pids = [p["pid"] for p in health["workers"]["processes"]]
        assert [p["rooms"] for p in health["workers"]["processes"]] == [1, 1]  # spread
        ours = {room: service.our_session(room)[0] for room in rooms}

        def open_line(room: str) -> bool:
            [viewer] = service.viewers[room]
            mine = [m for m in viewer.transcripts() if m["speakerSessionId"] == rooms[room]]
            return bool(mine) and not mine[-1]["final"] and len(mine[-1]["message"].split()) >= 2

        await until(lambda: all(open_line(room) for room in rooms), "a line is open in every call")
        open_texts = {room: service.viewers[room][0].transcripts()[-1]["message"] for room in rooms}
        seen = {room: len(service.viewers[room][0].transcripts()) for room in rooms}

        service.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(SHUTDOWN_SECONDS + 10):  # a failure bound only
            code = await service.process.wait()
        assert code == 0

        for room, speaker in rooms.items():
            [viewer] = service.viewers[room]
            # the open line of each call was finalised and delivered
            await viewer.wait_for(
                lambda viewer=viewer, room=room, speaker=speaker: any(  # type: ignore[misc]
                    m["final"] and m["speakerSessionId"] == speaker
                    for m in viewer.transcripts()[seen[room] :]
                ),
                deadline=DEADLINE,
            )
            tail = [m for m in viewer.transcripts() if m["speakerSessionId"] == speaker]
            assert tail[-1]["final"], f"{speaker}'s line was left open"
            closing = next(m for m in viewer.transcripts()[seen[room] :] if m["final"])
            assert closing["message"].startswith(open_texts[room]), (open_texts[room], closing["message"])
            # bye reached the HPB from each worker's session
            assert any(m.get("type") == "bye" for m in service.hpb.received(ours[room]))
            assert service.our_session(room) == []
        await until(lambda: not any(alive(pid) for pid in pids), "every worker exited")
    entries = service.log_entries()
    messages = [e["msg"] for e in entries]
    assert "stopped" in messages
    assert not any("longer than" in m for m in messages)
    assert not any((e.get("event"), e.get("state")) == ("worker", "stopped") for e in entries), (
        "no worker was restarted"
    )
    left = [
        e
        for e in entries
        if e["msg"].startswith("stopping (drain)") or e["msg"].startswith("stopping (signal)")
    ]
    assert {e["worker"] for e in left} == {0, 1}
    assert not any(e["level"] == "error" for e in entries), [e for e in entries if e["level"] == "error"]


async def test_workers_leave_their_calls_when_the_supervisor_is_gone(tmp_path: Path) -> None:
    async with serve_workers(tmp_path) as service:
        rooms = {"orphanA": "carol", "orphanB": "dave"}
        for index, (room, speaker) in enumerate(rooms.items()):
            await service.add_call(room, speaker, 230 + 50 * index)
            await service.add_viewer(room, f"talk-{room}")
        pids = [p["pid"] for p in (await service.healthz())["workers"]["processes"]]
        ours = {room: service.our_session(room)[0] for room in rooms}

        service.process.kill()
        await service.process.wait()

        await until(lambda: not any(alive(pid) for pid in pids), "every worker exited after its supervisor")
        for room, session in ours.items():
            assert any(m.get("type") == "bye" for m in service.hpb.received(session)), room
            assert service.our_session(room) == []
    gone = [e for e in service.log_entries() if e["msg"].startswith("the supervisor is gone")]
    assert {e["worker"] for e in gone} == {0, 1}
