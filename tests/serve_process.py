"""``live-transcription serve`` as its own process, for tests that need the
real process: signals, its exit, its stderr, or a kill."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

DEADLINE = 60.0  # the same generous deadline as the fault tests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_serve(
    env: Mapping[str, str], stderr_path: Path, args: Sequence[str] = ()
) -> asyncio.subprocess.Process:
    """The service with ``env`` as its whole environment, stderr to a file;
    ``args`` after ``serve``. One process (``LT_WORKERS=1``) unless ``env``
    or ``args`` say otherwise: the default would depend on the machine."""
    with stderr_path.open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "live_transcription.cli",
            "serve",
            *args,
            env={"LT_WORKERS": "1", **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )


async def wait_serving(client: httpx.AsyncClient, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(DEADLINE):
        while process.returncode is None:
            try:
                if (await client.get("/heartbeat")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)  # polling another process's port: nothing to wait on
    raise AssertionError(f"the service exited with {process.returncode} before serving")
