"""A private NATS server with JetStream, for tests and local clusters.

`NatsServerProcess` starts Debian's `nats-server -js` bound to 127.0.0.1 on
a free port with its store in a temporary directory, waits until it
greets clients (the INFO line NATS sends on connect; JetStream is started
before the client port opens), and stops it on exit. It never touches a
system NATS service.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from live_transcription.sim.janus_process import free_tcp_port, terminate_process, wait_until_serving

log = logging.getLogger(__name__)

START_ATTEMPTS = 3


class NatsServerNotInstalled(RuntimeError):
    """The nats-server binary is missing."""


class NatsServerStartError(RuntimeError):
    """nats-server did not come up (see the log file named in the message)."""


def find_nats_server(binary: Path | None = None) -> Path:
    if binary is None:
        found = shutil.which("nats-server")
        binary = Path(found) if found else Path("/usr/sbin/nats-server")
    if not binary.is_file():
        raise NatsServerNotInstalled(f"nats-server is not at {binary} (Debian package `nats-server`)")
    return binary


def nats_server_available() -> str | None:
    """None when nats-server can be started here, else the reason why not."""
    try:
        find_nats_server()
    except NatsServerNotInstalled as exc:
        return str(exc)
    return None


class NatsServerProcess:
    """`async with NatsServerProcess() as server:` then connect to `server.url`."""

    def __init__(self, *, start_deadline_s: float = 30.0, stop_deadline_s: float = 10.0) -> None:
        self._start_deadline_s = start_deadline_s
        self._stop_deadline_s = stop_deadline_s
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.root: Path | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        if self.root is None:
            raise RuntimeError("nats-server is not started")
        return self.root / "nats-server.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def __aenter__(self) -> NatsServerProcess:
        binary = find_nats_server()
        self._tmp = tempfile.TemporaryDirectory(prefix="nats-sim-")
        self.root = Path(self._tmp.name)
        try:
            await self._start(binary, self.root)
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def outage(self) -> None:
        """Stop the server as an outage would, keeping its port and its
        JetStream store for ``recover``."""
        await self._stop_process()

    async def recover(self) -> None:
        """Start the server again after ``outage``, on the same port and store."""
        if self.root is None or self.running:
            raise RuntimeError("nats-server is not in an outage")
        await self._start(find_nats_server(), self.root, port=self.port)

    async def _start(self, binary: Path, root: Path, *, port: int | None = None) -> None:
        # A free port can be taken between probing and nats-server binding it: retry.
        for _attempt in range(START_ATTEMPTS):
            port = port or free_tcp_port()
            self._proc = await asyncio.create_subprocess_exec(
                str(binary),
                "--jetstream",
                "--store_dir",
                str(root / "jetstream"),
                "--addr",
                "127.0.0.1",
                "--port",
                str(port),
                "--log",
                str(self.log_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await self._wait_ready(port):
                self.port = port
                log.info("nats-server pid %d listening on port %d", self._proc.pid, port)
                return
            await self._stop_process()
        raise NatsServerStartError(f"nats-server did not start; log {self.log_path}:\n{self.log_tail()}")

    async def _wait_ready(self, port: int) -> bool:
        """True once the server greets a client with INFO; False when it exits first."""
        proc = self._proc
        assert proc is not None
        return await wait_until_serving(proc, port, self._start_deadline_s, greeting=b"INFO ")

    async def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await terminate_process(proc, self._stop_deadline_s, "nats-server")

    async def _stop(self) -> None:
        try:
            await self._stop_process()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
