"""Slow and hostile HTTP clients against ``live-transcription serve`` as a real
subprocess with a low file-descriptor limit: 1,000 stalled connections of
each kind are closed by the server, and ``/heartbeat`` is answered meanwhile."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.serve_process import free_port

FD_LIMIT = 256
STALLED = 1000
DEADLINE = 90.0  # a failure bound only: the server's own limits are ~1 s
KINDS = {
    "nothing": b"",
    "half-request-line": b"GET /heartb",
    "half-headers": b"GET /heartbeat HTTP/1.1\r\nHost: exapp\r\nX-Slow: ",
    "half-body": b"GET /heartbeat HTTP/1.1\r\nHost: exapp\r\nContent-Length: 100\r\n\r\n{",
}


@dataclass
class Served:
    url: str
    port: int
    log: Path
    secret: str

    def auth(self) -> dict[str, str]:
        token = base64.b64encode(f"admin:{self.secret}".encode()).decode()
        return {
            "EX-APP-ID": "live_transcription",
            "EX-APP-VERSION": "0.1.0",
            "AA-VERSION": "3.0.0",
            "AUTHORIZATION-APP-API": token,
        }


# the service's own entry point, in a process limited to FD_LIMIT files from its start
SERVE_WITH_FEW_FILES = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT}))
from live_transcription.cli import main
sys.exit(main(["serve"]))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = free_port()
    log = tmp_path_factory.mktemp("front") / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LT_", "APP_", "MODAL_", "NEXTCLOUD"))}
    secret = "front-" + secrets.token_hex(4)
    env |= {
        "APP_SECRET": secret,
        "APP_PORT": str(port),
        "APP_HOST": "127.0.0.1",
        "LT_STT_ENGINE": "instant",
        "LT_HTTP_HEADER_TIMEOUT_SECONDS": "1",
        "LT_HTTP_BODY_TIMEOUT_SECONDS": "1",
        "LT_HTTP_MAX_CONNECTIONS": "50",
        "LT_WORKERS": "1",
    }
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE_WITH_FEW_FILES],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        give_up = time.monotonic() + DEADLINE
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/heartbeat", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < give_up, "the service did not start"
            time.sleep(0.05)  # polling another process's port: nothing to wait on
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        [files] = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert files.split()[3:5] == [str(FD_LIMIT), str(FD_LIMIT)], files
        yield Served(url, port, log, secret)
    finally:
        process.terminate()
        try:
            process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def closed_by_reason(metrics_text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("live_transcription_http_connections_closed_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            found[reason] = float(line.rsplit(" ", 1)[1])
    return found


async def wait_closed_by_server(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(4096):
            pass  # a 408 or 503 body may come first; the end of the stream is what counts
    except (ConnectionResetError, BrokenPipeError):
        pass


@pytest.mark.parametrize("kind", list(KINDS))
async def test_stalled_connections_are_closed_and_heartbeat_is_answered(served: Served, kind: str) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        before = closed_by_reason((await client.get("/metrics")).text)
        streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(STALLED):
                reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
                if KINDS[kind]:
                    writer.write(KINDS[kind])
                streams.append((reader, writer))
            # far more stalled connections than the process has file descriptors,
            # yet the health check is answered (a fresh connection each time)
            for _ in range(3):
                async with httpx.AsyncClient(base_url=served.url, timeout=30) as fresh:
                    beat = await fresh.get("/heartbeat")
                assert beat.status_code == 200
                assert beat.json() == {"status": "ok"}
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(*(wait_closed_by_server(reader) for reader, _ in streams))
        finally:
            for _, writer in streams:
                writer.close()
        after = closed_by_reason((await client.get("/metrics")).text)
    closed = sum(after.values()) - sum(before.values())
    assert closed >= STALLED, (before, after)
    if kind == "half-body":
        assert after["body-timeout"] > before.get("body-timeout", 0)
    else:
        assert after["header-timeout"] > before.get("header-timeout", 0)


async def test_malformed_http_gets_json_400(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(b"GET /heartbeat HTTP/1.1\r\nHost exapp no colon\r\n\r\n")
        async with asyncio.timeout(DEADLINE):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"application/json" in head.lower()
    assert json.loads(body) == {"error": "malformed HTTP request"}


async def test_disable_then_enable_are_both_logged(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        for value in (0, 1, 0, 1):
            reply = await client.put(f"/enabled?enabled={value}", headers=served.auth())
            assert reply.status_code == 200, reply.text
    # stderr is line-buffered: the lines were written before the answers
    entries = [json.loads(line) for line in served.log.read_text().splitlines() if line.strip()]
    states = [entry["msg"] for entry in entries if entry["msg"] in ("app disabled", "app enabled")]
    assert states == ["app disabled", "app enabled", "app disabled", "app enabled"]
    # uvicorn's lines are there, without its coloured copy of the message
    assert any(entry["msg"].startswith("Uvicorn running on") for entry in entries)
    assert not any("color_message" in entry for entry in entries)
    assert "\\u001b" not in served.log.read_text()  # JSON writes ESC so


async def test_head_heartbeat_and_open_routes_beyond_the_bound(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        head = await client.head("/heartbeat")
        assert head.status_code == 200
        assert head.content == b""
    # beyond the bound (50 held by slow clients), operations routes are served
    # and the others are refused with a clear 503
    holders = []
    try:
        for _ in range(60):
            _, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"GET /heart")
            holders.append(writer)
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            assert (await client.get("/healthz")).status_code in (200, 503)
            refused = await client.get("/capabilities")
        assert refused.status_code == 503
        assert refused.json() == {"error": "too many connections: try again later"}
    finally:
        for writer in holders:
            writer.close()


async def test_upgrade_requests_are_plain_http_and_leave_nothing_open(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        for _ in range(20):
            reply = await client.get(
                "/heartbeat",
                headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"},
            )
            assert reply.status_code == 200
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
        text = (await client.get("/metrics")).text
    [line] = [x for x in text.splitlines() if x.startswith("live_transcription_http_connections ")]
    assert float(line.split()[1]) <= 2  # this scrape's connection (and perhaps one closing)
