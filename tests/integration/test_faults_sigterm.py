"""SIGTERM during active captioning, with ``live-transcription serve`` as a
real subprocess: the open caption lines are finalised and delivered, ``bye``
reaches the HPB, and the process exits 0 within its shutdown bound."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import httpx

from live_transcription.api.server import SHUTDOWN_SECONDS
from live_transcription.logs import short_token
from live_transcription.sim.client import SimClient
from live_transcription.sim.direct_bridge import DirectBridge
from live_transcription.sim.emulator import HpbEmulator
from tests.integration.test_faults_support import BACKEND, DEADLINE, finals, talking_wav
from tests.serve_process import free_port, start_serve, wait_serving

ROOM = "sigtermroom"
APP_SECRET = "sigterm-app-secret-" + secrets.token_hex(4)


def auth() -> dict[str, str]:
    token = base64.b64encode(f"admin:{APP_SECRET}".encode()).decode()
    return {
        "EX-APP-ID": "live_transcription",
        "EX-APP-VERSION": "0.1.0",
        "AA-VERSION": "3.0.0",
        "AUTHORIZATION-APP-API": token,
    }


def last_by(messages: list[dict[str, Any]], speaker: str) -> dict[str, Any] | None:
    mine = [m for m in messages if m["speakerSessionId"] == speaker]
    return mine[-1] if mine else None


async def test_sigterm_flushes_open_lines_says_bye_and_exits_zero(tmp_path: Path) -> None:
    internal_secret = secrets.token_hex(16)
    bridge = DirectBridge()
    for i, name in enumerate(("alice", "bob")):
        # long utterances: a line is open most of the time
        bridge.add_publisher(name, talking_wav(tmp_path / f"{name}.wav", 210 + 70 * i, 6.0, 1.0), loop=True)
    port = free_port()
    stderr_path = tmp_path / "service.log"
    try:
        async with HpbEmulator(internal_secret, BACKEND, bridge=bridge) as hpb:
            for name in ("alice", "bob"):
                await hpb.add_participant(
                    ROOM, session_id=name, nextcloud_session_id=f"talk-{name}", in_call=7
                )
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("LT_", "APP_", "MODAL_", "NEXTCLOUD"))
            }
            env |= {
                "APP_SECRET": APP_SECRET,
                "APP_PORT": str(port),
                "APP_HOST": "127.0.0.1",
                "NEXTCLOUD_URL": BACKEND,
                "LT_HPB_URL": hpb.url,
                "LT_INTERNAL_SECRET": internal_secret,
                "LT_STT_ENGINE": "instant",
            }
            process = await start_serve(env, stderr_path)
            try:
                async with (
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
                    SimClient(hpb.url, ROOM, "talk-viewer") as viewer,
                ):
                    await wait_serving(client, process)
                    reply = await client.post(
                        "/api/v1/call/transcribe",
                        json={
                            "roomToken": ROOM,
                            "ncSessionId": "talk-viewer",
                            "enable": True,
                            "langId": "en",
                        },
                        headers=auth(),
                    )
                    assert reply.status_code == 200, reply.text
                    [ours] = hpb.sessions_in_room(ROOM, internal=True)

                    def open_line() -> str | None:
                        """A speaker whose last caption is a partial (a line is open)."""
                        for speaker in ("alice", "bob"):
                            last = last_by(viewer.transcripts(), speaker)
                            if last is not None and not last["final"] and len(last["message"].split()) >= 2:
                                return speaker
                        return None

                    await viewer.wait_for(
                        lambda: finals(viewer.transcripts(), "alice") >= 1, deadline=DEADLINE
                    )
                    await viewer.wait_for(lambda: open_line() is not None, deadline=DEADLINE)
                    speaker = open_line()
                    assert speaker is not None
                    last = last_by(viewer.transcripts(), speaker)
                    assert last is not None
                    open_text = last["message"]
                    seen = len(viewer.transcripts())

                    process.send_signal(signal.SIGTERM)
                    async with asyncio.timeout(SHUTDOWN_SECONDS + 10):
                        code = await process.wait()
                    assert code == 0

                    # the open line was finalised and delivered
                    await viewer.wait_for(
                        lambda: any(
                            m["final"] and m["speakerSessionId"] == speaker
                            for m in viewer.transcripts()[seen:]
                        ),
                        deadline=DEADLINE,
                    )
                    closing = next(
                        m
                        for m in viewer.transcripts()[seen:]
                        if m["final"] and m["speakerSessionId"] == speaker
                    )
                    assert closing["message"].startswith(open_text), (open_text, closing["message"])
                    for who in ("alice", "bob"):
                        tail = last_by(viewer.transcripts(), who)
                        assert tail is None or tail["final"], f"{who}'s line was left open"
                    # bye reached the HPB, and the session is gone
                    assert any(m.get("type") == "bye" for m in hpb.received(ours))
                    assert hpb.sessions_in_room(ROOM, internal=True) == []
                    await hpb.wait_for(lambda: hpb.open_connections == 1, DEADLINE)  # the viewer only
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    finally:
        await bridge.aclose()

    # logs: JSON lines, no secret anywhere, the shutdown said so
    text = stderr_path.read_text()
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert entries, "the service logged nothing"
    assert all({"ts", "level", "component", "msg"} <= entry.keys() for entry in entries)
    assert APP_SECRET not in text and internal_secret not in text
    assert ROOM not in text, "room tokens are logged shortened"
    assert any(entry["msg"] == "stopped" for entry in entries)
    assert not any("longer than" in entry["msg"] for entry in entries)


async def test_sigterm_with_a_stalled_body_and_joins_waiting_on_a_silent_hpb(tmp_path: Path) -> None:
    """Neither a client that never finishes its body nor 50 joins that the HPB
    never answers hold the shutdown: the process exits within its bound, and
    every call that was joined is left with ``bye``."""
    internal_secret = secrets.token_hex(16)
    joined_rooms = [f"j{i}call" for i in range(3)]  # distinct in the logs' shortened tokens
    waiting_rooms = [f"w{i:02d}call" for i in range(50)]
    port = free_port()
    stderr_path = tmp_path / "service.log"
    async with HpbEmulator(internal_secret, BACKEND) as hpb:
        prefixes = ("LT_", "APP_", "MODAL_", "NEXTCLOUD")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env |= {
            "APP_SECRET": APP_SECRET,
            "APP_PORT": str(port),
            "APP_HOST": "127.0.0.1",
            "NEXTCLOUD_URL": BACKEND,
            "LT_HPB_URL": hpb.url,
            "LT_INTERNAL_SECRET": internal_secret,
            "LT_STT_ENGINE": "instant",
            # only the shutdown can end the stalled body in this test
            "LT_HTTP_BODY_TIMEOUT_SECONDS": "300",
            "LT_MAX_ROOMS": str(len(joined_rooms) + len(waiting_rooms)),
        }
        process = await start_serve(env, stderr_path)
        writer: asyncio.StreamWriter | None = None
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as client:
                await wait_serving(client, process)

                async def enable(room: str) -> httpx.Response:
                    body = {"roomToken": room, "ncSessionId": f"talk-{room}", "enable": True}
                    return await client.post("/api/v1/call/transcribe", json=body, headers=auth())

                for room in joined_rooms:
                    reply = await enable(room)
                    assert reply.status_code == 200, reply.text
                ours = {room: hpb.sessions_in_room(room, internal=True) for room in joined_rooms}
                assert all(len(sessions) == 1 for sessions in ours.values()), ours

                hpb.silent = True
                hellos_before = sum(1 for _, m in hpb.received_all() if m.get("type") == "hello")
                waiting = [asyncio.create_task(enable(room)) for room in waiting_rooms]
                await hpb.wait_for(
                    lambda: (
                        sum(1 for _, m in hpb.received_all() if m.get("type") == "hello")
                        >= hellos_before + len(waiting_rooms)
                    ),
                    DEADLINE,
                )
                # every room slot is taken by joins the HPB does not answer: health says so
                health = (await client.get("/healthz")).json()
                assert health["status"] == "degraded", health
                assert "room cap of 53 reached" in health["reasons"]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /heartbeat HTTP/1.1\r\nHost: exapp\r\nContent-Length: 100\r\n\r\n{")
                await writer.drain()

                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(SHUTDOWN_SECONDS + 10):  # a failure bound only
                    code = await process.wait()
                assert code == 0

                # the stalled client was cut (a reset: its unread body is discarded),
                # every waiting request got an answer or a close
                async with asyncio.timeout(DEADLINE):
                    with contextlib.suppress(ConnectionResetError):
                        while await reader.read(4096):
                            pass
                outcomes = await asyncio.gather(*waiting, return_exceptions=True)
                answered = [o for o in outcomes if isinstance(o, httpx.Response)]
                assert all(o.status_code == 503 for o in answered), [o.text for o in answered]
                assert all(isinstance(o, httpx.Response | httpx.TransportError) for o in outcomes), outcomes
                # every joined call was left with bye
                for room, [session] in ours.items():
                    assert any(m.get("type") == "bye" for m in hpb.received(session)), room
        finally:
            if writer is not None:
                writer.close()
            if process.returncode is None:
                process.kill()
                await process.wait()

    entries = [json.loads(line) for line in stderr_path.read_text().splitlines() if line.strip()]
    assert any(entry["msg"] == "stopped" for entry in entries)
    assert not any("longer than" in entry["msg"] for entry in entries)
    closed = {entry["room"] for entry in entries if entry["msg"].endswith("closed: shutdown")}
    assert {short_token(room) for room in joined_rooms} <= closed
    assert not any(entry["level"] == "error" for entry in entries), "an error was logged"


async def test_a_second_sigterm_ends_the_grace_at_once(tmp_path: Path) -> None:
    port = free_port()
    stderr_path = tmp_path / "service.log"
    prefixes = ("LT_", "APP_", "MODAL_", "NEXTCLOUD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env |= {
        "APP_SECRET": APP_SECRET,
        "APP_PORT": str(port),
        "APP_HOST": "127.0.0.1",
        "LT_STT_ENGINE": "instant",
        "LT_HTTP_BODY_TIMEOUT_SECONDS": "300",
        "LT_HTTP_SHUTDOWN_GRACE_SECONDS": "15",
    }
    process = await start_serve(env, stderr_path)
    writer: asyncio.StreamWriter | None = None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as client:
            await wait_serving(client, process)
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /heartbeat HTTP/1.1\r\nHost: exapp\r\nContent-Length: 100\r\n\r\n{")
            await writer.drain()

            async def open_connections() -> float:
                text = (await client.get("/metrics")).text
                gauge = "live_transcription_http_connections "
                [line] = [x for x in text.splitlines() if x.startswith(gauge)]
                return float(line.split()[1])

            async with asyncio.timeout(DEADLINE):
                while await open_connections() < 2:  # noqa: ASYNC110 - the stalled one and ours
                    await asyncio.sleep(0.05)  # another process's state: polled
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            while "shutting down" not in stderr_path.read_text():  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # another process's log: polled
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(SHUTDOWN_SECONDS + 10):  # a failure bound only
            code = await process.wait()
        assert code == 0
    finally:
        if writer is not None:
            writer.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    messages = [json.loads(line)["msg"] for line in stderr_path.read_text().splitlines() if line.strip()]
    assert "shutdown: cut 1 HTTP connection(s) still open (second signal)" in messages
    assert "stopped" in messages


async def test_logs_of_an_hpb_outage_and_the_count_held_back_written_at_exit(tmp_path: Path) -> None:
    """The HPB refuses connections: the real service logs the outage once,
    Talk's refused enables are grouped, and the count of those held back is
    written when the process exits (no later line of the group came)."""
    port = free_port()
    stderr_path = tmp_path / "service.log"
    prefixes = ("LT_", "APP_", "MODAL_", "NEXTCLOUD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env |= {
        "APP_SECRET": APP_SECRET,
        "APP_PORT": str(port),
        "APP_HOST": "127.0.0.1",
        "NEXTCLOUD_URL": BACKEND,
        "LT_HPB_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "LT_INTERNAL_SECRET": secrets.token_hex(16),
        "LT_STT_ENGINE": "instant",
    }
    process = await start_serve(env, stderr_path)
    refused = 6
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as client:
            await wait_serving(client, process)
            for n in range(refused):
                body = {"roomToken": f"r{n}room", "ncSessionId": "talk-a", "enable": True}
                reply = await client.post("/api/v1/call/transcribe", json=body, headers=auth())
                assert reply.status_code == 503
                assert reply.json() == {"error": "cannot reach the signaling server (connection refused)"}
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(SHUTDOWN_SECONDS + 10):  # a failure bound only
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    entries = [json.loads(line) for line in stderr_path.read_text().splitlines() if line.strip()]
    outage = [(e["level"], e["msg"]) for e in entries if e.get("event") == "hpb-outage"]
    assert outage == [
        ("warning", "cannot reach the signaling server (connection refused): rooms cannot be joined or kept")
    ]
    lines = [e for e in entries if e["msg"].startswith("enable refused in room ")]
    # the first shown at once; the last one written at exit with the others held back before it
    assert [e.get("repeats", 0) for e in lines] == [0, refused - 2]
    assert lines[0]["msg"].startswith("enable refused in room r0ro…")
    assert lines[1]["msg"].startswith(f"enable refused in room r{refused - 1}ro…")
    assert [e["msg"] for e in entries].index("stopped") < entries.index(lines[1])
