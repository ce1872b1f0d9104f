"""A private Janus instance for tests and the demo.

`JanusProcess` writes a minimal configuration into a temporary directory
(VideoRoom plugin and WebSocket transport only, WebSocket bound to
127.0.0.1 on a free port, no HTTP or admin transport, an auto-generated
ECDSA DTLS certificate: aiortc offers only ECDHE-ECDSA ciphers, so with an
RSA certificate every subscriber handshake, where Janus is the DTLS server,
fails with "no shared cipher"), starts `janus` as a subprocess, waits until its WebSocket port accepts
connections, and stops it on exit. It never touches a system Janus service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

DEBIAN_MODULE_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu/janus"),
    Path("/usr/lib/aarch64-linux-gnu/janus"),
    Path("/usr/lib/janus"),
    Path("/usr/local/lib/janus"),
    Path("/opt/janus/lib/janus"),
)
VIDEOROOM_LIBRARY = "libjanus_videoroom.so"
WEBSOCKETS_LIBRARY = "libjanus_websockets.so"
START_ATTEMPTS = 3


class JanusNotInstalled(RuntimeError):
    """The janus binary or its VideoRoom/WebSocket modules are missing."""


class JanusStartError(RuntimeError):
    """Janus did not come up (see the log file named in the message)."""


@dataclass(frozen=True, slots=True)
class JanusInstallation:
    binary: Path
    plugins_dir: Path
    transports_dir: Path


def find_janus(
    binary: Path | None = None, module_dirs: tuple[Path, ...] = DEBIAN_MODULE_DIRS
) -> JanusInstallation:
    """Locate the janus binary and the directory holding its modules."""
    if binary is None:
        found = shutil.which("janus")
        binary = Path(found) if found else Path("/usr/bin/janus")
    if not binary.is_file():
        raise JanusNotInstalled(f"the janus binary is not installed at {binary} (Debian package `janus`)")
    for base in module_dirs:
        plugins, transports = base / "plugins", base / "transports"
        if (plugins / VIDEOROOM_LIBRARY).exists() and (transports / WEBSOCKETS_LIBRARY).exists():
            return JanusInstallation(binary, plugins, transports)
    raise JanusNotInstalled(
        f"janus is at {binary} but {VIDEOROOM_LIBRARY}/{WEBSOCKETS_LIBRARY} were not found "
        f"under any of {', '.join(str(d) for d in module_dirs)}"
    )


def janus_available() -> str | None:
    """None when Janus can be started here, else the reason why not."""
    try:
        find_janus()
    except JanusNotInstalled as exc:
        return str(exc)
    return None


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (Janus cannot bind port 0 and report it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


async def terminate_process(proc: asyncio.subprocess.Process, deadline_s: float, name: str) -> None:
    """SIGTERM a child process, then SIGKILL it if it is still there after ``deadline_s``."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        async with asyncio.timeout(deadline_s):
            await proc.wait()
    except TimeoutError:
        log.warning("%s pid %d ignored SIGTERM; killing it", name, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def wait_until_serving(
    proc: asyncio.subprocess.Process, port: int, deadline_s: float, *, greeting: bytes = b""
) -> bool:
    """True once ``port`` accepts a connection (whose first line starts with
    ``greeting``, when one is given); False when the process exits first or
    ``deadline_s`` passes."""
    exited = asyncio.ensure_future(proc.wait())
    try:
        async with asyncio.timeout(deadline_s):
            while not exited.done():
                with contextlib.suppress(OSError):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    try:
                        first_line = await reader.readline() if greeting else b""
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
                    if first_line.startswith(greeting):
                        return True
                # Polling a starting subprocess: nothing to wait on instead.
                await asyncio.wait({exited}, timeout=0.05)
    except TimeoutError:
        return False
    finally:
        if not exited.done():
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await exited
    return False


@dataclass(frozen=True, slots=True)
class JanusConfig:
    """What varies between instances; everything else is fixed below."""

    ws_port: int
    ws_host: str = "127.0.0.1"
    # Interfaces/addresses Janus gathers ICE candidates on; None means all but
    # VMware's. Loopback-only candidates are not possible: libnice never
    # gathers on `lo` (Janus 1.1.2 with `ice_enforce_list = "lo"` or
    # "127.0.0.1" falls back to every interface, IPv6 included), and aiortc
    # skips 127.0.0.1 too. Host candidates on the machine's own address work:
    # the traffic never leaves the host.
    ice_enforce_list: str | None = None
    debug_level: int = 4
    session_timeout_s: int = 60


def render_core_config(cfg: JanusConfig, root: Path) -> str:
    """janus.jcfg: only local module folders, file logging, ECDSA DTLS."""
    nat = ["\tnice_debug = false", "\tignore_mdns = true"]
    if cfg.ice_enforce_list:
        nat.append(f'\tice_enforce_list = "{cfg.ice_enforce_list}"')
    else:
        nat.append('\tice_ignore_list = "vmnet"')
    nat_block = "\n".join(nat)
    return f"""general: {{
\tconfigs_folder = "{root}"
\tplugins_folder = "{root / "plugins"}"
\ttransports_folder = "{root / "transports"}"
\tevents_folder = "{root / "events"}"
\tloggers_folder = "{root / "loggers"}"
\tlog_to_stdout = false
\tlog_to_file = "{root / "janus.log"}"
\tdebug_level = {cfg.debug_level}
\tdebug_timestamps = true
\tsession_timeout = {cfg.session_timeout_s}
\tserver_name = "live-transcription-sim"
\texit_on_dl_error = true
}}
certificates: {{
\t# No cert_pem: Janus generates a self-signed certificate at start, ECDSA
\t# (P-256) unless rsa_private_key is true; aiortc needs ECDSA.
\trsa_private_key = false
}}
media: {{
\tipv6 = false
}}
nat: {{
{nat_block}
}}
plugins: {{
}}
transports: {{
}}
loggers: {{
}}
events: {{
\tbroadcast = false
}}
"""


def render_websockets_config(cfg: JanusConfig) -> str:
    return f"""general: {{
\tjson = "compact"
\tws = true
\tws_port = {cfg.ws_port}
\tws_ip = "{cfg.ws_host}"
\twss = false
}}
admin: {{
\tadmin_ws = false
\tadmin_wss = false
}}
"""


VIDEOROOM_CONFIG = """general: {
}
"""


def write_config_dir(cfg: JanusConfig, root: Path, install: JanusInstallation) -> Path:
    """Populate `root`; return the path of janus.jcfg."""
    for sub in ("plugins", "transports", "events", "loggers"):
        (root / sub).mkdir(exist_ok=True)
    # Janus loads every module in its folders: link in only the two we need.
    for folder, src_dir, name in (
        ("plugins", install.plugins_dir, VIDEOROOM_LIBRARY),
        ("transports", install.transports_dir, WEBSOCKETS_LIBRARY),
    ):
        link = root / folder / name
        if not link.exists():
            link.symlink_to((src_dir / name).resolve())
    main = root / "janus.jcfg"
    main.write_text(render_core_config(cfg, root))
    (root / "janus.transport.websockets.jcfg").write_text(render_websockets_config(cfg))
    (root / "janus.plugin.videoroom.jcfg").write_text(VIDEOROOM_CONFIG)
    return main


class JanusProcess:
    """`async with JanusProcess() as janus:` then connect to `janus.ws_url`."""

    def __init__(
        self,
        *,
        ice_enforce_list: str | None = None,
        debug_level: int = 4,
        start_deadline_s: float = 30.0,
        stop_deadline_s: float = 10.0,
        keep_dir: Path | None = None,
    ) -> None:
        self._ice_enforce_list = ice_enforce_list
        self._debug_level = debug_level
        self._start_deadline_s = start_deadline_s
        self._stop_deadline_s = stop_deadline_s
        self._keep_dir = keep_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.root: Path | None = None
        self.ws_port = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/"

    @property
    def log_path(self) -> Path:
        if self.root is None:
            raise RuntimeError("Janus is not started")
        return self.root / "janus.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def __aenter__(self) -> JanusProcess:
        install = find_janus()
        if self._keep_dir is not None:
            self._keep_dir.mkdir(parents=True, exist_ok=True)
            self.root = self._keep_dir
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="janus-sim-")
            self.root = Path(self._tmp.name)
        try:
            await self._start(install, self.root)
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

    async def stop(self) -> None:
        """Stop Janus now (idempotent; exiting the context does it too)."""
        await self._stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def _start(self, install: JanusInstallation, root: Path) -> None:
        last_error = ""
        # A free port can be taken between probing and Janus binding it: retry.
        for _attempt in range(START_ATTEMPTS):
            cfg = JanusConfig(
                ws_port=free_tcp_port(),
                ice_enforce_list=self._ice_enforce_list,
                debug_level=self._debug_level,
            )
            main = write_config_dir(cfg, root, install)
            self._proc = await asyncio.create_subprocess_exec(
                str(install.binary),
                "-C",
                str(main),
                "-F",
                str(root),
                "--disable-colors",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await self._wait_ready(cfg.ws_port):
                self.ws_port = cfg.ws_port
                log.info("janus pid %d listening on port %d", self._proc.pid, cfg.ws_port)
                return
            last_error = self.log_tail()
            await self._stop_process()
        raise JanusStartError(f"janus did not start; log {self.log_path}:\n{last_error}")

    async def _wait_ready(self, port: int) -> bool:
        """True once the port accepts; False when Janus exits first."""
        proc = self._proc
        assert proc is not None
        return await wait_until_serving(proc, port, self._start_deadline_s)

    async def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await terminate_process(proc, self._stop_deadline_s, "janus")

    async def _stop(self) -> None:
        try:
            await self._stop_process()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
