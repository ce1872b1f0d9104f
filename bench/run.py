"""Load and soak harness: the service in its own process, loaded through the
HPB emulator and real WebRTC by a cheaper generator process.

    python -m bench.run --scenario active,silent,meeting,churn,soak \\
        --engine modal,moshi,instant --levels present,absent \\
        --speakers 1,10,50,100,200 --participants 100,300 --out docs/benchmarks.md

Processes: this harness (orchestration, /proc sampling, HTTP to the
service), the load generator (``bench.loadgen``: HPB emulator + direct
aiortc publishers), the fake STT server (``bench.stt_server``: the tests'
Kyutai fakes over TLS, for the ``modal`` and ``moshi`` engines) and the
service (``live-transcription serve``, reaching the fake through its
production engine client over ``wss://``, trusting a CA made at run time
through ``SSL_CERT_FILE``; the ``instant`` engine runs in-process and is a
lower bound only). Every wait is bounded; the child processes are stopped
in ``finally`` and stop by themselves if this one dies.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.fakes.energy import EnergyWords

from bench import analysis, meeting, report, scale, stages
from bench.latency import WordMap, word_map_from_events
from bench.lean_bridge import DEFAULT_AHEAD, MAX_AHEAD
from bench.patterns import Pattern, build_pattern
from bench.procstat import ProcessSampler, Sample, TreeSampler, cpu_percent, percentile, slope
from bench.profile import PY_SPY, record_command
from bench.tls import LocalTls, make_local_tls

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
Json = dict[str, Any]

LOAD_SCENARIOS = ("active", "silent", "meeting")
ALL_SCENARIOS = (*LOAD_SCENARIOS, "churn", "soak")
SCALE_SCENARIOS = ("capacity", "failover")
PUBLISH_AND_SCAN_S = 9.0
"""A replica's published load reaches the others within ClusterOptions'
publish_every + scan_every (5 s + 3 s at the default lease TTL)."""
"""Scale-out (worker processes, replicas through NATS); not part of ``all``."""
ENGINES = ("modal", "moshi", "instant")
TALK_MS = 3000
PAUSE_MS = 1500
WORD_MAP_LOOPS = 13
GENERATORS = ("aiortc", "lean")
LEAN_LOOP = "uvloop"
"""The lean generator's event loop (the aiortc one keeps the standard loop)."""


# --- configuration ------------------------------------------------------------------------


@dataclass
class Options:
    scenarios: list[str]
    speakers: list[int]
    silent: list[int]
    per_room: int = 10
    warmup: float = 10.0
    measure: float = 30.0
    speaker_cycles: int = 1000
    churn_concurrency: int = 10
    room_cycles: int = 100
    soak_minutes: float = 5.0
    soak_speakers: int = 50
    partial_interval_ms: int = 0
    profile_at: int = 100
    profile_seconds: float = 30.0
    out: Path = ROOT / "docs" / "benchmarks.md"
    img: Path = ROOT / "docs" / "img"
    work: Path = Path("/tmp/bench")
    max_seconds: float = 3 * 3600
    service_cmd: str = ""
    service_log_level: str = "WARNING"
    engines: list[str] = field(default_factory=lambda: ["modal"])
    also_engines: list[str] = field(default_factory=lambda: ["moshi", "instant"])
    """Run only ``active`` with levels present (moshi once; instant, the lower bound)."""
    levels: list[str] = field(default_factory=lambda: ["present", "absent"])
    stt_delay_frames: int = 0
    participants: list[int] = field(default_factory=lambda: [100, 300])
    room_min: int = 5
    room_max: int = 20
    talk_share: float = 0.15
    seed: int = 1
    settle: float = 4.0
    profile_native: bool = False
    generator: str = "aiortc"
    """``bench.loadgen --generator``: aiortc's sender per stream, or the lean one."""
    generator_ahead: int = DEFAULT_AHEAD
    """The lean generator's packets protected per batch and stream."""
    workers: list[int] = field(default_factory=lambda: [1, 2])
    """``capacity``: one run per worker count (``LT_WORKERS``)."""
    capacity_steps: list[int] = field(default_factory=lambda: [50, 100, 150, 200, 250, 300, 400, 500])
    meeting_workers: int = 1
    """``LT_WORKERS`` of the meeting mix."""
    failover_rooms: int = 10
    failover_deadline: float = 90.0
    merge_from: list[Path] = field(default_factory=list)
    """Other runs' results.json whose scale-out figures join this report."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the load generator process ------------------------------------------------------------------


class JsonLinesChild:
    """A child process driven with one JSON object per line on stdin/stdout:
    it prints ``{"ready": true, ...}`` first, answers ``{"id": n, "cmd": ...}``
    with ``{"id": n, ...}`` and stops on ``quit`` or end of input."""

    log_name = "child.log"

    def __init__(self, work: Path) -> None:
        self._work = work
        self._proc: asyncio.subprocess.Process | None = None
        self._ids = 0
        self.pid = 0

    async def _start(self, args: list[str]) -> Json:
        stderr = (self._work / self.log_name).open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *args,
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                limit=64 << 20,
            )
        finally:
            stderr.close()
        ready = await self._read(60)
        if not ready.get("ready"):
            raise RuntimeError(f"{args[2]} did not start: {ready}")
        self.pid = int(ready["pid"])
        return ready

    async def __aexit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(Exception):
            await self.call("quit", deadline=20)
        with contextlib.suppress(Exception):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def _read(self, deadline: float) -> Json:
        assert self._proc is not None and self._proc.stdout is not None
        async with asyncio.timeout(deadline):
            line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child exited (see {self._work / self.log_name})")
        reply: Json = json.loads(line)
        return reply

    async def call(self, cmd: str, *, deadline: float = 120, **args: Any) -> Json:
        assert self._proc is not None and self._proc.stdin is not None
        self._ids += 1
        self._proc.stdin.write((json.dumps({"id": self._ids, "cmd": cmd} | args) + "\n").encode())
        await self._proc.stdin.drain()
        while True:
            reply = await self._read(deadline)
            if reply.get("id") == self._ids:
                if "error" in reply:
                    raise RuntimeError(f"{self.log_name}: {cmd}: {reply['error']}")
                return reply


class LoadGen(JsonLinesChild):
    """``python -m bench.loadgen`` as a child."""

    log_name = "loadgen.log"

    def __init__(
        self,
        secret: str,
        word_map: WordMap | None,
        work: Path,
        max_seconds: float,
        *,
        levels: bool = True,
        generator: str = "aiortc",
        ahead: int = DEFAULT_AHEAD,
    ) -> None:
        super().__init__(work)
        self._secret = secret
        self._word_map = word_map
        self._max_seconds = max_seconds
        self._levels = levels
        self._generator = generator
        self._ahead = ahead
        self.hpb_port = 0
        self.nextcloud_url = ""

    async def __aenter__(self) -> LoadGen:
        args = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--internal-secret",
            self._secret,
            "--talk-ms",
            str(TALK_MS),
            "--pause-ms",
            str(PAUSE_MS),
            "--max-seconds",
            str(self._max_seconds),
            "--generator",
            self._generator,
        ]
        if self._generator == "lean":
            args += ["--loop", LEAN_LOOP, "--ahead", str(self._ahead)]
        if self._word_map is not None:
            args += ["--word-map", json.dumps(asdict(self._word_map))]
        if not self._levels:
            args.append("--no-levels")
        ready = await self._start(args)
        self.hpb_port = int(ready["hpb_port"])
        self.nextcloud_url = str(ready["nextcloud_url"])
        return self


STT_KEY = "bench-key"
STT_SECRET = "bench-secret"


class FakeStt(JsonLinesChild):
    """``python -m bench.stt_server`` as a child: the fake Kyutai server over
    TLS, in its own process (its CPU is not the service's)."""

    log_name = "stt_server.log"

    def __init__(self, engine: str, tls: LocalTls, opts: Options) -> None:
        super().__init__(opts.work)
        self.engine = engine
        self._tls = tls
        self._opts = opts
        self.url = ""

    async def __aenter__(self) -> FakeStt:
        ready = await self._start(
            [
                sys.executable,
                "-m",
                "bench.stt_server",
                "--engine",
                self.engine,
                "--cert",
                str(self._tls.cert_file),
                "--cert-key",
                str(self._tls.key_file),
                "--key",
                STT_KEY,
                "--secret",
                STT_SECRET,
                "--delay-frames",
                str(self._opts.stt_delay_frames),
                "--max-seconds",
                str(self._opts.max_seconds),
            ]
        )
        self.url = str(ready["url"])
        return self

    def service_env(self) -> dict[str, str]:
        """What points the service's production client at this server, with
        TLS verified against the run's CA (standard configuration only)."""
        env = {"LT_STT_ENGINE": self.engine, "SSL_CERT_FILE": str(self._tls.ca_file)}
        if self.engine == "modal":
            return env | {"LT_MODAL_URL": self.url, "MODAL_KEY": STT_KEY, "MODAL_SECRET": STT_SECRET}
        return env | {"LT_MOSHI_URL": self.url, "LT_MOSHI_API_KEY": STT_KEY}


# --- the service process ----------------------------------------------------------------------


class Service:
    """``live-transcription serve`` as a child process, black box."""

    def __init__(
        self,
        loadgen: LoadGen,
        secret: str,
        work: Path,
        opts: Options,
        label: str,
        *,
        stt_env: dict[str, str] | None = None,
        workers: int = 1,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._loadgen = loadgen
        self._workers = workers
        self._extra_env = extra_env or {}
        self._stt_env = stt_env or {"LT_STT_ENGINE": "instant"}
        self._internal_secret = secret
        self._app_secret = secrets.token_hex(16)
        self._work = work
        self._opts = opts
        self._label = label
        self.port = _free_port()
        self._proc: asyncio.subprocess.Process | None = None
        self.sampler: TreeSampler | None = None
        """The service's whole process tree: a supervisor and its workers."""
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        auth = base64.b64encode(f"bench:{self._app_secret}".encode()).decode()
        self._headers = {
            "EX-APP-ID": "live_transcription",
            "EX-APP-VERSION": "0.1.0",
            "AA-VERSION": "3.0.0",
            "AUTHORIZATION-APP-API": auth,
        }

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> Service:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "APP_SECRET": self._app_secret,
            "APP_PORT": str(self.port),
            "APP_HOST": "127.0.0.1",
            "NEXTCLOUD_URL": self._loadgen.nextcloud_url,
            "LT_HPB_URL": f"ws://127.0.0.1:{self._loadgen.hpb_port}",
            "LT_INTERNAL_SECRET": self._internal_secret,
            **self._stt_env,
            "LT_MAX_SPEAKERS": "5000",
            "LT_MAX_SPEAKERS_PER_ROOM": "1000",
            "LT_MAX_ROOMS": "1000",
            "LT_LOG_LEVEL": self._opts.service_log_level,
            "LT_PARTIAL_INTERVAL_MS": str(self._opts.partial_interval_ms),
            # one process unless a scenario asks for workers: the default is
            # one worker per core, and the single-process figures are per process
            "LT_WORKERS": str(self._workers),
            # a crash in native code (libopus, libsrtp, a socket filter) leaves
            # its traceback in the service's log instead of a silent exit
            "PYTHONFAULTHANDLER": "1",
            **self._extra_env,
            **{name: os.environ[name] for name in ("LT_EVENT_LOOP", "LT_UDP_TICK_MS") if name in os.environ},
        }
        command = shlex.split(self._opts.service_cmd) or [str(VENV_BIN / "live-transcription"), "serve"]
        log_file = (self._work / f"service-{self._label}.log").open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *command, env=env, cwd=ROOT, stdout=log_file, stderr=log_file
            )
        finally:
            log_file.close()
        self.sampler = TreeSampler(self._proc.pid)
        async with asyncio.timeout(60):
            while True:
                if self._proc.returncode is not None:
                    raise RuntimeError(f"service exited with {self._proc.returncode}; see {self._work}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await self.http.get("/heartbeat")).status_code == 200:
                        break
                await asyncio.sleep(0.2)  # the service has no readiness event to wait on
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            log.warning("service did not stop within 30 s: killed")
            proc.kill()
            await proc.wait()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def worker_pids(self) -> list[int]:
        """The service's worker processes (its child processes), oldest first."""
        assert self.sampler is not None
        return sorted(self.sampler.pids()[1:])

    async def kill(self) -> None:
        """SIGKILL the whole service, as a machine that disappears."""
        assert self._proc is not None and self.sampler is not None
        for pid in reversed(self.sampler.pids()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self._proc.wait()

    def sample(self) -> Sample:
        assert self.sampler is not None
        try:
            return self.sampler.sample()
        except OSError:
            raise RuntimeError(
                f"the service exited (status {self.returncode}); see service-{self._label}.log"
            ) from None

    async def transcribe(self, token: str, target: str, enable: bool = True) -> None:
        body = {"roomToken": token, "ncSessionId": target, "enable": enable, "langId": "en"}
        reply = await self.http.post("/api/v1/call/transcribe", json=body, headers=self._headers)
        if reply.status_code != 200:
            raise RuntimeError(f"transcribe {token}: HTTP {reply.status_code} {reply.text}")

    async def leave(self, token: str) -> None:
        reply = await self.http.post("/api/v1/call/leave", json={"roomToken": token}, headers=self._headers)
        if reply.status_code not in (200, 404):
            raise RuntimeError(f"leave {token}: HTTP {reply.status_code} {reply.text}")

    async def health(self) -> Json:
        reply = await self.http.get("/healthz")
        body: Json = reply.json()
        return body

    async def metrics(self) -> analysis.Scrape:
        reply = await self.http.get("/metrics")
        return analysis.parse_metrics(reply.text)

    async def wait_health(self, what: str, condition: Any, deadline: float = 60) -> Json:
        """Poll /healthz until ``condition(body)`` (bounded)."""
        end = time.monotonic() + deadline
        body = await self.health()
        while not condition(body):
            if time.monotonic() > end:
                raise TimeoutError(f"service: {what} not reached in {deadline:.0f} s: {body}")
            await asyncio.sleep(0.25)
            body = await self.health()
        return body


# --- the word map ------------------------------------------------------------------------------


async def compute_word_map(
    pattern: Pattern, *, engine: str = "instant", levels: bool = True
) -> WordMap | None:
    """Run the service's own audio gate and the engine's word rule (the
    zero-delay instant engine, or the fake STT server's ``EnergyWords``)
    over several periods of the pattern, offline, and note after which
    packet each word came out. None when the parts cannot be loaded."""
    if engine != "instant":
        return energy_word_map(pattern, levels=levels)
    try:
        from live_transcription.audio.pipeline import SpeakerAudio
        from live_transcription.config import load_settings
        from live_transcription.media.packet import OpusRtp
        from live_transcription.stt.base import Pause, Word
        from live_transcription.stt.factory import create_engine  # type: ignore[import-not-found,unused-ignore]

        instant = create_engine(load_settings(LT_STT_ENGINE="instant"))
    except Exception as exc:
        log.warning("no word map (latency from the service's histogram only): %r", exc)
        return None
    events: list[tuple[str, int]] = []
    current = 0
    try:
        async with asyncio.TaskGroup() as tasks, instant.open_stream("en") as stream:

            async def read() -> None:
                async for event in stream.events():
                    if isinstance(event, Word):
                        events.append(("word", current))
                    elif isinstance(event, Pause):
                        events.append(("pause", current))

            reader = tasks.create_task(read())
            audio = SpeakerAudio(on_frame=stream.push, on_speech_end=stream.end_of_speech)
            # a live stream starts in the pause: so does this one
            start = pattern.talk_packets
            for index in range(WORD_MAP_LOOPS * pattern.period):
                current = index
                position = (start + index) % pattern.period
                audio.feed(
                    OpusRtp(
                        pattern.payloads[position],
                        index % 65536,
                        index * 960,
                        audio_level=pattern.levels[position] if levels else None,
                        arrival_time=index * 0.02,
                        ssrc=1,
                    )
                )
                for _ in range(5):  # let the engine's zero-delay reply through
                    await asyncio.sleep(0)
            audio.close()
            reader.cancel()
    finally:
        await instant.aclose()
    word_map = word_map_from_events(pattern.period, pattern.pause_packets, events)
    log.info("word map: %s", word_map.utterances)
    return word_map


def energy_word_map(pattern: Pattern, *, levels: bool) -> WordMap | None:
    """The word map of the fake STT server's model at zero delay: the
    service's audio gate over the pattern, its frames into ``EnergyWords``."""
    try:
        from live_transcription.audio.pipeline import SpeakerAudio
        from live_transcription.media.packet import OpusRtp
    except Exception as exc:
        log.warning("no word map (latency from the service's histogram only): %r", exc)
        return None
    events: list[tuple[str, int]] = []
    model = EnergyWords()
    current = 0

    def on_frame(frame: Any) -> None:
        events.extend(("word", current) for _ in model.feed(frame))

    audio = SpeakerAudio(on_frame=on_frame, on_speech_end=lambda: None)
    start = pattern.talk_packets
    for index in range(WORD_MAP_LOOPS * pattern.period):
        current = index
        position = (start + index) % pattern.period
        audio.feed(
            OpusRtp(
                pattern.payloads[position],
                index % 65536,
                index * 960,
                audio_level=pattern.levels[position] if levels else None,
                arrival_time=index * 0.02,
                ssrc=1,
            )
        )
    audio.close()
    word_map = word_map_from_events(pattern.period, pattern.pause_packets, events)
    log.info("word map (fake STT, levels %s): %s", "present" if levels else "absent", word_map.utterances)
    return word_map


# --- measurement windows ------------------------------------------------------------------------


@dataclass
class Window:
    """What one measurement window saw."""

    n: int
    kind: str
    seconds: float = 0.0
    rss_mb: float = 0.0
    cpu_percent: float = 0.0
    cpu_system_percent: float = 0.0
    generator_cpu_percent: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    service_latency_ms: dict[str, float] = field(default_factory=dict)
    words: int = 0
    unmatched_words: int = 0
    early_words: int = 0
    frames_dropped: float = 0.0
    drops: dict[str, float] = field(default_factory=dict)
    packets: dict[str, float] = field(default_factory=dict)
    captions_sent: float = 0.0
    transcripts: int = 0
    connected: int = 0
    speakers_reported: int = 0
    ticker_lag_max_ms: float = 0.0
    ticker_skipped: int = 0
    engine: str = "instant"
    levels: str = "present"
    talk_seconds: float = 0.0
    """Talk the generator sent in the window (participant speech)."""
    utterances: int = 0
    talking_mean: float = 0.0
    talking_max: int = 0
    words_delivered: int = 0
    words_while_silent: int = 0
    stt: Json = field(default_factory=dict)
    """The fake STT server's own counts over the window (audio, streams, words)."""
    stt_open_mean: float = math.nan
    stt_busy_mean: float = math.nan
    stt_cpu_percent: float = math.nan
    service_stt: Json = field(default_factory=dict)
    """The service's STT metrics over the window, where it has them."""


async def measure(
    service: Service,
    loadgen: LoadGen,
    generator: ProcessSampler,
    *,
    n: int,
    kind: str,
    seconds: float,
    fake: FakeStt | None = None,
) -> Window:
    await loadgen.call("stats", reset=True)
    if fake is not None:
        await fake.call("stats", reset=True)
    fake_sampler = ProcessSampler(fake.pid) if fake is not None else None
    fake_before = fake_sampler.sample() if fake_sampler is not None else None
    before_metrics = await service.metrics()
    before = service.sample()
    gen_before = generator.sample()
    rss: list[int] = []
    talking: list[int] = []
    stt_open: list[int] = []
    stt_busy: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        rss.append(service.sample().rss_bytes)
        talking.append(int((await loadgen.call("talking"))["talking"]))
        if fake is not None:
            now = await fake.call("stats", reset=False)
            stt_open.append(int(now["open_now"]))
            stt_busy.append(int(now["busy_now"]))
    after = service.sample()
    gen_after = generator.sample()
    fake_after = fake_sampler.sample() if fake_sampler is not None else None
    after_metrics = await service.metrics()
    stats = await loadgen.call("stats", reset=True)
    stt = await fake.call("stats", reset=True) if fake is not None else {}
    health = await service.health()
    changed = analysis.diff(after_metrics, before_metrics)
    latencies = [1000 * v for v in stats["latencies"]]
    buckets = analysis.histogram_buckets(changed, "live_transcription_caption_latency_seconds")
    window = Window(n=n, kind=kind, seconds=after.wall - before.wall)
    window.rss_mb = sorted(rss)[len(rss) // 2] / 2**20 if rss else after.rss_bytes / 2**20
    window.cpu_percent = cpu_percent(before, after)
    window.cpu_system_percent = cpu_percent(before, after, system_only=True)
    window.generator_cpu_percent = cpu_percent(gen_before, gen_after)
    window.latency_ms = {f"p{q}": round(percentile(latencies, q), 2) for q in (50, 95, 99)} | {
        "max": round(max(latencies), 2) if latencies else math.nan
    }
    window.service_latency_ms = {
        f"p{q}": round(1000 * analysis.histogram_quantile(buckets, q / 100), 2) for q in (50, 95, 99)
    }
    window.words = len(latencies)
    window.unmatched_words = int(stats["unmatched_words"])
    window.early_words = int(stats["early_words"])
    window.drops = analysis.by_label(changed, "live_transcription_audio_frames_dropped_total", "reason")
    window.frames_dropped = sum(window.drops.values())
    window.packets = analysis.by_label(changed, "live_transcription_audio_packets_total", "kind")
    window.captions_sent = analysis.total(changed, "live_transcription_captions_sent_total")
    window.transcripts = int(stats["transcripts"])
    window.connected = int(stats["connected"])
    window.speakers_reported = int(health.get("speakers", -1))
    window.ticker_lag_max_ms = float(stats["ticker_lag_max_ms"])
    window.ticker_skipped = int(stats["ticker_skipped"])
    window.talk_seconds = int(stats.get("talk_packets", 0)) * 0.02
    window.utterances = int(stats.get("utterances", 0))
    window.talking_mean = sum(talking) / len(talking) if talking else math.nan
    window.talking_max = max(talking, default=0)
    window.words_delivered = int(stats.get("words_delivered", 0))
    window.words_while_silent = int(stats.get("words_while_silent", 0))
    window.stt = {k: v for k, v in stt.items() if k != "id"}
    if stt_open:
        window.stt_open_mean = sum(stt_open) / len(stt_open)
        window.stt_busy_mean = sum(stt_busy) / len(stt_busy)
    if fake_before is not None and fake_after is not None:
        window.stt_cpu_percent = cpu_percent(fake_before, fake_after)
    window.service_stt = service_stt_metrics(changed, after_metrics)
    return window


async def account_words(loadgen: LoadGen, fake: FakeStt | None, settle: float) -> Json:
    """Lost and misattributed words over the whole scenario: the generator
    falls silent for ``settle`` seconds so the last words come back, then
    the words the STT sent are compared with the words that reached the HPB.
    The windows themselves are not disturbed (a hush inside a window would
    cut utterances short and put the word map off)."""
    if fake is None or settle <= 0:
        return {}
    await loadgen.call("hush", on=True)
    await asyncio.sleep(settle)
    delivered = await loadgen.call("stats", reset=False)
    sent = await fake.call("stats", reset=False)
    await loadgen.call("hush", on=False)
    words_sent = int(sent["words_total"])
    words_delivered = int(delivered["words_delivered_total"])
    return {
        "stt_words": words_sent,
        "delivered": words_delivered,
        "lost": words_sent - words_delivered,
        "while_silent": int(delivered["words_while_silent_total"]),
        "unknown_speaker_transcripts": int(delivered["transcripts_unknown_speaker_total"]),
    }


def service_stt_metrics(changed: analysis.Scrape, after: analysis.Scrape) -> Json:
    """The service's own STT pool and load metrics over a window; only the
    ones the running version exports (older versions have none)."""
    names = {name for name, _ in after}
    out: Json = {}
    if "live_transcription_stt_streams" in names:
        out["streams_at_end"] = analysis.by_label(after, "live_transcription_stt_streams", "state")
    if "live_transcription_stt_audio_seconds_total" in names:
        out["audio_seconds"] = analysis.by_label(
            changed, "live_transcription_stt_audio_seconds_total", "kind"
        )
    if "live_transcription_participant_audio_seconds_total" in names:
        out["participant_audio_seconds"] = analysis.total(
            changed, "live_transcription_participant_audio_seconds_total"
        )
    if "live_transcription_stt_lease_wait_seconds_count" in names:
        buckets = analysis.histogram_buckets(changed, "live_transcription_stt_lease_wait_seconds")
        out["lease_wait_ms"] = {
            f"p{q}": round(1000 * analysis.histogram_quantile(buckets, q / 100), 2) for q in (50, 99)
        }
    if "live_transcription_stt_lease_waits_total" in names:
        out["lease_waits"] = analysis.by_label(changed, "live_transcription_stt_lease_waits_total", "reason")
    return out


class Rooms:
    """Rooms of ``per_room`` speakers, opened in the emulator and captioned
    through the service's HTTP API as Talk does."""

    def __init__(self, service: Service, loadgen: LoadGen, per_room: int, prefix: str) -> None:
        self._service = service
        self._loadgen = loadgen
        self._per_room = per_room
        self._prefix = prefix
        self.rooms: list[tuple[str, list[str]]] = []
        self.total = 0

    async def grow_to(self, n: int, kind: str) -> None:
        while self.total < n:
            if not self.rooms or len(self.rooms[-1][1]) >= self._per_room:
                token = f"{self._prefix}{len(self.rooms) + 1:04d}"
                reply = await self._loadgen.call("room", token=token)
                await self._service.transcribe(token, reply["target"])
                self.rooms.append((token, []))
            token, members = self.rooms[-1]
            count = min(self._per_room - len(members), n - self.total)
            reply = await self._loadgen.call("speakers", token=token, count=count, kind=kind)
            members.extend(reply["sessions"])
            self.total += count
        reply = await self._loadgen.call("wait_connected", count=n, timeout=max(60, n * 0.5), deadline=600)
        if reply["connected"] < n:
            log.warning("only %d of %d streams connected", reply["connected"], n)

    async def close_all(self) -> None:
        for token, _ in self.rooms:
            await self._service.leave(token)
            await self._loadgen.call("end_room", token=token)
        self.rooms.clear()
        self.total = 0


# --- scenarios ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def stack(
    opts: Options, word_map: WordMap | None, label: str
) -> AsyncIterator[tuple[LoadGen, Service]]:
    """Generator and service with the in-process ``instant`` engine."""
    async with production_stack(opts, word_map, label, "instant", levels=True) as (loadgen, service, _):
        yield loadgen, service


@contextlib.asynccontextmanager
async def production_stack(
    opts: Options, word_map: WordMap | None, label: str, engine: str, *, levels: bool, workers: int = 1
) -> AsyncIterator[tuple[LoadGen, Service, FakeStt | None]]:
    """Generator, fake STT server (``modal``/``moshi``) and service."""
    secret = secrets.token_hex(24)
    async with contextlib.AsyncExitStack() as exits:
        fake: FakeStt | None = None
        if engine != "instant":
            tls = make_local_tls(opts.work / "tls")
            fake = await exits.enter_async_context(FakeStt(engine, tls, opts))
        loadgen = await exits.enter_async_context(
            LoadGen(
                secret,
                word_map,
                opts.work,
                opts.max_seconds,
                levels=levels,
                generator=opts.generator,
                ahead=opts.generator_ahead,
            )
        )
        env = fake.service_env() if fake is not None else None
        service = await exits.enter_async_context(
            Service(loadgen, secret, opts.work, opts, label, stt_env=env, workers=workers)
        )
        yield loadgen, service, fake


async def scenario_production(
    opts: Options,
    word_map: WordMap | None,
    kind: str,
    steps: list[int],
    *,
    engine: str,
    levels: bool,
    workers: int | None = None,
) -> Json:
    """N speakers (active or silent) step by step, through the ``engine``'s
    production client to the fake STT over TLS. With ``workers`` (the
    capacity runs) the service runs that many worker processes and the
    steps stop at the first window past capacity (``bench.scale``)."""
    windows: list[Window] = []
    profile: Json = {}
    shape = "present" if levels else "absent"
    label = f"{kind}-{engine}-{shape}" + (f"-w{workers}" if workers else "")
    words: Json = {}
    async with production_stack(opts, word_map, label, engine, levels=levels, workers=workers or 1) as (
        loadgen,
        service,
        fake,
    ):
        generator = ProcessSampler(loadgen.pid)
        rooms = Rooms(service, loadgen, opts.per_room, kind)
        await asyncio.sleep(min(5.0, opts.warmup))
        window = await measure(
            service, loadgen, generator, n=0, kind=kind, seconds=min(opts.measure, 15.0), fake=fake
        )
        windows.append(_label(window, engine, shape))
        for n in sorted(s for s in steps if s > 0):
            started = time.monotonic()
            await rooms.grow_to(n, kind)
            await asyncio.sleep(opts.warmup)
            window = await measure(
                service, loadgen, generator, n=n, kind=kind, seconds=opts.measure, fake=fake
            )
            windows.append(_label(window, engine, shape))
            log.info("%s N=%d (%.0f s): %s", label, n, time.monotonic() - started, _brief(window))
            if n == opts.profile_at and opts.profile_seconds > 0 and not workers:
                profile = await profile_service(service.pid, opts, f"{label}-{n}") | {"n": n}
            if not service.alive():
                log.error("the service died at N=%d (exit status %s)", n, service.returncode)
                break
            if workers and scale.miss_reasons(asdict(window)):
                break  # past capacity: the next steps would only pile up
        words = await account_words(loadgen, fake, opts.settle)
        await rooms.close_all()
    return {
        "kind": kind,
        "engine": engine,
        "levels": shape,
        "windows": [asdict(w) for w in windows],
        "profile": profile,
        "words": words,
    } | ({"workers": workers} if workers else {})


def _label(window: Window, engine: str, levels: str) -> Window:
    window.engine = engine
    window.levels = levels
    return window


async def scenario_meeting(opts: Options, word_map: WordMap | None, *, engine: str, levels: bool) -> Json:
    """The meeting mix: rooms of ``room_min``-``room_max`` participants, each
    talking about ``talk_share`` of the time (``bench.meeting``), grown
    room by room to each N of ``participants``."""
    windows: list[Window] = []
    profile: Json = {}
    shape = "present" if levels else "absent"
    label = f"meeting-{engine}-{shape}"
    words: Json = {}
    mix = meeting.MixShape(room_min=opts.room_min, room_max=opts.room_max, talk_share=opts.talk_share)
    sizes = meeting.room_sizes(max(opts.participants, default=0), mix, opts.seed)
    workers = opts.meeting_workers
    if workers != 1:
        label += f"-w{workers}"
    async with production_stack(opts, word_map, label, engine, levels=levels, workers=workers) as (
        loadgen,
        service,
        fake,
    ):
        generator = ProcessSampler(loadgen.pid)
        opened: list[str] = []
        total = 0
        for target in sorted(p for p in opts.participants if p > 0):
            started = time.monotonic()
            while total < target and len(opened) < len(sizes):
                token = f"meeting{len(opened) + 1:04d}"
                reply = await loadgen.call("room", token=token)
                await service.transcribe(token, reply["target"])
                size = sizes[len(opened)]
                await loadgen.call(
                    "meeting",
                    token=token,
                    count=size,
                    seed=opts.seed,
                    talk_share=opts.talk_share,
                    period_s=120.0,
                )
                opened.append(token)
                total += size
            got = await loadgen.call(
                "wait_connected", count=total, timeout=max(60, total * 0.5), deadline=600
            )
            if got["connected"] < total:
                log.warning("only %d of %d streams connected", got["connected"], total)
            await asyncio.sleep(opts.warmup)
            window = await measure(
                service,
                loadgen,
                generator,
                n=total,
                kind="meeting",
                seconds=opts.measure,
                fake=fake,
            )
            windows.append(_label(window, engine, shape))
            log.info("%s N=%d (%.0f s): %s", label, total, time.monotonic() - started, _brief(window))
            if target == opts.profile_at and opts.profile_seconds > 0 and workers == 1:
                profile = await profile_service(service.pid, opts, f"{label}-{total}") | {"n": total}
            if not service.alive():
                log.error("the service died at N=%d (exit status %s)", total, service.returncode)
                break
        words = await account_words(loadgen, fake, opts.settle)
        for token in opened:
            await service.leave(token)
            await loadgen.call("end_room", token=token)
    return {
        "kind": "meeting",
        "engine": engine,
        "levels": shape,
        "rooms": sizes,
        "mix": asdict(mix),
        "windows": [asdict(w) for w in windows],
        "profile": profile,
        "words": words,
    } | ({"workers": workers} if workers != 1 else {})


# --- fail-over -----------------------------------------------------------------------------------


async def captions_after(
    loadgen: LoadGen, tokens: list[str], since: float, deadline: float
) -> dict[str, float]:
    """Each room's first caption at or after ``since`` (monotonic), waiting
    until every room has one or ``deadline`` seconds have passed."""
    await loadgen.call("watch_captions", since=since)
    end = time.monotonic() + deadline
    while True:
        seen = (await loadgen.call("watched"))["rooms"]
        if all(token in seen for token in tokens) or time.monotonic() > end:
            return {token: float(at) for token, at in seen.items() if token in tokens}
        await asyncio.sleep(0.2)  # the generator has no push channel to the harness


def _metrics_named(scrape: analysis.Scrape, *parts: str) -> Json:
    return {
        name + ("{" + ",".join(f"{k}={v}" for k, v in labels) + "}" if labels else ""): value
        for (name, labels), value in scrape.items()
        if any(part in name for part in parts) and not name.endswith(("_created", "_bucket"))
    }


async def _open_failover_rooms(
    service: Service, loadgen: LoadGen, opts: Options, prefix: str
) -> tuple[Rooms, list[str]]:
    rooms = Rooms(service, loadgen, opts.per_room, prefix)
    await rooms.grow_to(opts.failover_rooms * opts.per_room, "active")
    tokens = [token for token, _ in rooms.rooms]
    flowing = await captions_after(loadgen, tokens, time.monotonic(), 60)
    if len(flowing) < len(tokens):
        raise RuntimeError(f"captions flowed in only {len(flowing)} of {len(tokens)} rooms before the kill")
    return rooms, tokens


async def _kill_and_time(
    loadgen: LoadGen, tokens: list[str], kill: Callable[[], Awaitable[None]], deadline: float
) -> tuple[dict[str, float | None], set[str]]:
    """Kill, then each room's time to its first caption after the kill, and
    the rooms the service re-opened (a new service session in the room)."""
    clients = (await loadgen.call("room_clients"))["rooms"]
    killed_at = time.monotonic()
    await kill()
    first = await captions_after(loadgen, tokens, killed_at, deadline)
    moved = scale.moved_rooms(clients, (await loadgen.call("room_clients"))["rooms"])
    return scale.resume_times(killed_at, first, tokens), moved


async def failover_worker(opts: Options, word_map: WordMap | None, engine: str) -> Json:
    """Kill one of two worker processes while every room has captions."""
    async with production_stack(opts, word_map, "failover-worker", engine, levels=True, workers=2) as (
        loadgen,
        service,
        fake,
    ):
        rooms, tokens = await _open_failover_rooms(service, loadgen, opts, "fw")
        health_before = await service.health()
        before = await service.metrics()
        workers = service.worker_pids()
        if len(workers) < 2:
            raise RuntimeError(f"expected 2 worker processes, found {workers}")
        victim = workers[0]

        async def kill_worker() -> None:
            os.kill(victim, signal.SIGKILL)

        times, moved = await _kill_and_time(loadgen, tokens, kill_worker, opts.failover_deadline)
        health_after = await service.health()
        changed = analysis.diff(await service.metrics(), before)
        words = await account_words(loadgen, fake, opts.settle)
        await rooms.close_all()
    return {
        "kind": "failover",
        "description": (
            f"{len(tokens)} rooms of {opts.per_room} active speakers on a service with 2 worker processes"
            f" (`{engine}` client over TLS to the fake STT); one worker is killed with SIGKILL while every"
            " room has captions; its supervisor restarts it and re-opens its rooms with their targets."
        ),
        "times_s": times,
        "summary": scale.resume_summary(times, moved),
        "moved": sorted(moved),
        "deadline_s": opts.failover_deadline,
        "health_before": health_before,
        "health_after": health_after,
        "metrics": _metrics_named(changed, "worker", "rooms_opened", "rooms_closed"),
        "words": words,
    }


async def failover_replica(opts: Options, word_map: WordMap | None, engine: str) -> Json:
    """Two replicas sharing a nats-server; Talk's requests reach the first;
    the second is killed (SIGKILL) while every room has captions."""
    from live_transcription.sim.nats_process import NatsServerProcess

    secret = secrets.token_hex(24)
    async with contextlib.AsyncExitStack() as exits:
        nats = await exits.enter_async_context(NatsServerProcess())
        tls = make_local_tls(opts.work / "tls")
        fake = await exits.enter_async_context(FakeStt(engine, tls, opts))
        loadgen = await exits.enter_async_context(
            LoadGen(
                secret,
                word_map,
                opts.work,
                opts.max_seconds,
                levels=True,
                generator=opts.generator,
                ahead=opts.generator_ahead,
            )
        )
        ttl = 15.0
        replicas = []
        for name in ("a", "b"):
            cluster_env = {"LT_NATS_URL": nats.url, "LT_REPLICA_ID": name}
            replicas.append(
                await exits.enter_async_context(
                    Service(
                        loadgen,
                        secret,
                        opts.work,
                        opts,
                        f"failover-replica-{name}",
                        stt_env=fake.service_env(),
                        extra_env=cluster_env,
                    )
                )
            )
        first_replica, second_replica = replicas
        for replica in replicas:
            await replica.wait_health(
                "both replicas ready and seen",
                lambda body: body.get("ready") and body.get("cluster", {}).get("replicas", 0) >= 2,
            )
        # a replica's load (accepting, once its rooms can run) reaches the
        # others within one publish and one scan (5 s + 3 s by default);
        # nothing shows when, so the harness waits that long
        await asyncio.sleep(PUBLISH_AND_SCAN_S)
        rooms, tokens = await _open_failover_rooms(first_replica, loadgen, opts, "fr")
        owned = [(await r.health()).get("cluster", {}).get("rooms_owned") for r in replicas]
        if not owned[1]:
            raise RuntimeError(f"replica b owns no room (rooms owned: {owned}): nothing to fail over")
        health_before = [await r.health() for r in replicas]
        before = await first_replica.metrics()
        times, moved = await _kill_and_time(loadgen, tokens, second_replica.kill, opts.failover_deadline)
        health_after = await first_replica.health()
        changed = analysis.diff(await first_replica.metrics(), before)
        words = await account_words(loadgen, fake, opts.settle)
        await rooms.close_all()
    return {
        "kind": "failover",
        "description": (
            f"{len(tokens)} rooms of {opts.per_room} active speakers on two replicas (one process each)"
            " sharing"
            f" a nats-server; Talk's requests go to replica a, which places each room on the less loaded"
            f" replica; replica b is killed with SIGKILL while every room has captions. Its leases"
            f" expire (LT_CLUSTER_LEASE_TTL_SECONDS, default {ttl:g} s) and replica a takes its rooms over."
        ),
        "times_s": times,
        "summary": scale.resume_summary(times, moved),
        "moved": sorted(moved),
        "deadline_s": opts.failover_deadline,
        "health_before": health_before,
        "health_after": health_after,
        "metrics": _metrics_named(changed, "cluster", "rooms_opened", "rooms_closed"),
        "words": words,
    }


async def profile_service(pid: int, opts: Options, label: str) -> Json:
    if not PY_SPY.exists():
        return {"error": "py-spy not installed"}
    raw = opts.work / f"profile-{label}.txt"
    svg = opts.work / f"profile-{label}.svg"
    results: Json = {"seconds": opts.profile_seconds, "svg": str(svg), "raw": str(raw)}
    for fmt, path in (("raw", raw), ("flamegraph", svg)):
        proc = await asyncio.create_subprocess_exec(
            *record_command(pid, opts.profile_seconds / 2, fmt, path, native=opts.profile_native),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(opts.profile_seconds + 60):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return results | {"error": "py-spy timed out"}
        if proc.returncode != 0:
            return results | {"error": err.decode(errors="replace")[-500:]}
    stacks = analysis.parse_collapsed(raw.read_text().splitlines())
    results["samples"] = sum(stacks.values())
    results["self"] = [asdict(e) for e in analysis.top_self(stacks, 20)]
    results["inclusive"] = [asdict(e) for e in analysis.top_inclusive(stacks, 40)]
    results["stages"] = stages.split(stacks)
    return results


async def scenario_churn(opts: Options, word_map: WordMap | None) -> Json:
    """Speaker join/leave cycles in one room, then room open/close cycles;
    RSS and live-object counts before and after."""
    async with stack(opts, word_map, "churn") as (loadgen, service):
        home = "churnhome"
        reply = await loadgen.call("room", token=home)
        await service.transcribe(home, reply["target"])
        await service.wait_health("home room open", lambda b: b.get("rooms") == 1)

        async def speaker_cycles(count: int) -> Json:
            return await loadgen.call(
                "cycle_speakers",
                token=home,
                count=count,
                concurrency=opts.churn_concurrency,
                hold_ms=300,
                deadline=3600,
            )

        async def room_cycles(count: int, start: int) -> int:
            failures = 0
            for i in range(start, start + count):
                token = f"churnroom{i:04d}"
                target = (await loadgen.call("room", token=token))["target"]
                await loadgen.call("speakers", token=token, count=2, kind="active")
                await service.transcribe(token, target)
                got = await loadgen.call("wait_connected_room", token=token, count=2, timeout=30, deadline=60)
                failures += got["connected"] < 2
                await service.leave(token)
                await loadgen.call("end_room", token=token)
            await service.wait_health("rooms closed", lambda b: b.get("rooms") == 1)
            return failures

        # warm-up: allocator and caches reach their working size
        await speaker_cycles(50)
        await room_cycles(5, 0)
        await service.wait_health("speakers gone", lambda b: b.get("speakers") == 0)
        await asyncio.sleep(5)
        rss_before = service.sample().rss_bytes
        metrics_before = await service.metrics()
        objects_before = live_objects(metrics_before)
        started = time.monotonic()
        speakers = await speaker_cycles(opts.speaker_cycles)
        speaker_seconds = time.monotonic() - started
        await service.wait_health("speakers gone", lambda b: b.get("speakers") == 0)
        started = time.monotonic()
        room_failures = await room_cycles(opts.room_cycles, 100)
        room_seconds = time.monotonic() - started
        await asyncio.sleep(5)
        rss_after = service.sample().rss_bytes
        health_home_open = await service.health()
        await service.leave(home)
        await loadgen.call("end_room", token=home)
        health_end = await service.wait_health("all rooms closed", lambda b: b.get("rooms") == 0)
        # the last closes (aiortc's, the HPB link's goodbye) finish just after
        # the rooms are gone: give them a bounded moment, and say how long
        settled = time.monotonic()
        metrics_after = await service.metrics()
        while time.monotonic() - settled < 10:
            objects = live_objects(metrics_after)
            if objects["peer_connections"] == 0 and objects["tasks"] <= objects_before["tasks"]:
                break
            await asyncio.sleep(0.5)
            metrics_after = await service.metrics()
        settle_seconds = time.monotonic() - settled
        changed = analysis.diff(metrics_after, metrics_before)
        lg = await loadgen.call("stats", reset=False)
        return {
            "objects_before": objects_before,
            "objects_end": live_objects(metrics_after),
            "objects_settle_s": round(settle_seconds, 1),
            "speaker_cycles": speakers,
            "concurrency": opts.churn_concurrency,
            "speaker_seconds": round(speaker_seconds, 1),
            "room_cycles": opts.room_cycles,
            "room_failures": room_failures,
            "room_seconds": round(room_seconds, 1),
            "rss_before_mb": rss_before / 2**20,
            "rss_after_mb": rss_after / 2**20,
            "rss_growth_mb": (rss_after - rss_before) / 2**20,
            "health_home_open": health_home_open,
            "health_end": health_end,
            "speakers_started": analysis.total(changed, "live_transcription_speakers_started_total"),
            "speakers_ended": analysis.total(changed, "live_transcription_speakers_ended_total"),
            "rooms_opened": analysis.total(changed, "live_transcription_rooms_opened_total"),
            "rooms_closed": analysis.total(changed, "live_transcription_rooms_closed_total"),
            "live_speakers_metric": analysis.total(metrics_after, "live_transcription_speakers_started_total")
            - analysis.total(metrics_after, "live_transcription_speakers_ended_total"),
            "live_rooms_metric": analysis.total(metrics_after, "live_transcription_rooms_opened_total")
            - analysis.total(metrics_after, "live_transcription_rooms_closed_total"),
            "generator_subscriptions_left": lg["subscriptions"],
            "generator_offers": lg["offers"],
            "generator_stale_answers": lg["stale_answers"],
        }


def live_objects(scrape: analysis.Scrape) -> Json:
    """Peer connections in memory and event-loop tasks, from a /metrics scrape."""
    return {
        "peer_connections": int(analysis.total(scrape, "live_transcription_peer_connections")),
        "tasks": int(analysis.total(scrape, "live_transcription_event_loop_tasks")),
    }


def machine_reference() -> Json:
    """This hour's speed of the machine: ``bench.packet_path`` in a child
    process (the same packets and code give the same figure on the same
    machine, so a slower hour shows here as well as in the figures)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.packet_path", "--packets", "10000", "--rounds", "5"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
            cwd=ROOT,
        )
        reference: Json = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"error": repr(exc)}
    return reference


async def scenario_soak(opts: Options, word_map: WordMap | None) -> Json:
    duration = opts.soak_minutes * 60
    interval = min(60.0, max(5.0, duration / 20))
    samples: list[Json] = []
    async with stack(opts, word_map, "soak") as (loadgen, service):
        generator = ProcessSampler(loadgen.pid)
        rooms = Rooms(service, loadgen, opts.per_room, "soak")
        await rooms.grow_to(opts.soak_speakers, "active")
        await asyncio.sleep(opts.warmup)
        start = time.monotonic()
        before = service.sample()
        gen_before = generator.sample()
        metrics_before = await service.metrics()
        await loadgen.call("stats", reset=True)
        previous = before
        while time.monotonic() - start < duration:
            await asyncio.sleep(min(interval, max(0.0, duration - (time.monotonic() - start))))
            now = service.sample()
            health = await service.health()
            samples.append(
                {
                    "minutes": round((now.wall - start) / 60, 2),
                    "rss_mb": round(now.rss_bytes / 2**20, 2),
                    "cpu_percent": round(cpu_percent(previous, now), 2),
                    "rooms": health.get("rooms"),
                    "speakers": health.get("speakers"),
                }
                | live_objects(await service.metrics())
            )
            previous = now
            if not service.alive():
                break
        after = service.sample()
        stats = await loadgen.call("stats", reset=True)
        changed = analysis.diff(await service.metrics(), metrics_before)
        latencies = [1000 * v for v in stats["latencies"]]
        result: Json = {
            "speakers": opts.soak_speakers,
            "minutes": round((after.wall - start) / 60, 2),
            "samples": samples,
            "cpu_percent": cpu_percent(before, after),
            "generator_cpu_percent": cpu_percent(gen_before, generator.sample()),
            "rss_start_mb": before.rss_bytes / 2**20,
            "rss_end_mb": after.rss_bytes / 2**20,
            "rss_slope_mb_per_hour": 60
            * slope([s["minutes"] for s in samples], [s["rss_mb"] for s in samples])
            if len(samples) > 1
            else math.nan,
            "latency_ms": {f"p{q}": round(percentile(latencies, q), 2) for q in (50, 95, 99)},
            "frames_dropped": analysis.total(changed, "live_transcription_audio_frames_dropped_total"),
        }
        await rooms.close_all()
    return result


def _brief(window: Window) -> str:
    return (
        f"rss {window.rss_mb:.1f} MB, cpu {window.cpu_percent:.1f} % "
        f"(kernel {window.cpu_system_percent:.1f} %), "
        f"gen {window.generator_cpu_percent:.1f} %, "
        f"latency {window.latency_ms}, drops {window.frames_dropped:.0f}, connected {window.connected}"
    )


# --- main -------------------------------------------------------------------------------------


def machine() -> Json:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else "")


async def run(opts: Options, command: str) -> Json:
    opts.work.mkdir(parents=True, exist_ok=True)
    pattern = build_pattern(TALK_MS, PAUSE_MS, seed=1)
    word_map = await compute_word_map(pattern)
    results: Json = {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "revision": git_revision(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "pattern": {"talk_ms": TALK_MS, "pause_ms": PAUSE_MS, "period_packets": pattern.period},
        "word_map": asdict(word_map) if word_map else None,
    }
    results_path = opts.work / "results.json"
    results["reference_start"] = await asyncio.to_thread(machine_reference)
    runs: Json = results.setdefault("runs", {})
    maps: dict[tuple[str, bool], WordMap | None] = {}
    for engine, shape, scenario in load_runs(opts):
        levels = shape == "present"
        key = f"{scenario}/{engine}/{shape}"
        if scenario == "meeting" and opts.meeting_workers != 1:
            key += f"/w{opts.meeting_workers}"  # apart from the one-process run
        started = time.monotonic()
        log.info("scenario %s", key)
        try:
            model = "instant" if engine == "instant" else "energy"
            if (model, levels) not in maps:
                maps[model, levels] = (
                    word_map
                    if (model, levels) == ("instant", True)
                    else await compute_word_map(pattern, engine=engine, levels=levels)
                )
            if scenario == "meeting":
                # words per utterance from its onset: the fake's model only
                # (the instant engine's count runs across utterances)
                turn_map = maps[model, levels] if model == "energy" else None
                runs[key] = await scenario_meeting(opts, turn_map, engine=engine, levels=levels)
            else:
                steps = opts.speakers if scenario == "active" else opts.silent
                runs[key] = await scenario_production(
                    opts, maps[model, levels], scenario, steps, engine=engine, levels=levels
                )
                if engine == "instant" and levels:
                    results[scenario] = runs[key]  # the lower bound's own tables
        except Exception as exc:
            log.exception("scenario %s failed", key)
            runs[key] = {"kind": scenario, "engine": engine, "levels": shape, "error": repr(exc)}
        results.setdefault("durations_s", {})[key] = round(time.monotonic() - started)
        results_path.write_text(json.dumps(results, indent=1, default=str))
    if "capacity" in opts.scenarios:
        engine = opts.engines[0]
        model = "instant" if engine == "instant" else "energy"
        if (model, True) not in maps:
            maps[model, True] = (
                word_map
                if model == "instant"
                else await compute_word_map(pattern, engine=engine, levels=True)
            )
        for workers in opts.workers:
            key = f"capacity/{engine}/present/w{workers}"
            started = time.monotonic()
            log.info("scenario %s", key)
            try:
                runs[key] = await scenario_production(
                    opts,
                    maps[model, True],
                    "active",
                    opts.capacity_steps,
                    engine=engine,
                    levels=True,
                    workers=workers,
                )
            except Exception as exc:
                log.exception("scenario %s failed", key)
                runs[key] = {"kind": "active", "engine": engine, "workers": workers, "error": repr(exc)}
            results.setdefault("durations_s", {})[key] = round(time.monotonic() - started)
            results_path.write_text(json.dumps(results, indent=1, default=str))
    if "failover" in opts.scenarios:
        engine = opts.engines[0]
        model = "instant" if engine == "instant" else "energy"
        if (model, True) not in maps:
            maps[model, True] = (
                word_map
                if model == "instant"
                else await compute_word_map(pattern, engine=engine, levels=True)
            )
        failover = results.setdefault("failover", {})
        for what, scenario_fn in (
            ("kill a worker process", failover_worker),
            ("kill a replica", failover_replica),
        ):
            started = time.monotonic()
            log.info("scenario failover: %s", what)
            try:
                failover[what] = await scenario_fn(opts, maps[model, True], engine)
                log.info("failover %s: %s", what, failover[what]["summary"])
            except Exception as exc:
                log.exception("failover %s failed", what)
                failover[what] = {"error": repr(exc)}
            results.setdefault("durations_s", {})[f"failover: {what}"] = round(time.monotonic() - started)
            results_path.write_text(json.dumps(results, indent=1, default=str))
    if "capacity" in opts.scenarios or "failover" in opts.scenarios or opts.meeting_workers != 1:
        results["scale_commands"] = [command]
    for scenario in (s for s in opts.scenarios if s not in LOAD_SCENARIOS and s not in SCALE_SCENARIOS):
        started = time.monotonic()
        log.info("scenario %s", scenario)
        try:
            if scenario == "churn":
                results["churn"] = await scenario_churn(opts, word_map)
            elif scenario == "soak":
                results["soak"] = await scenario_soak(opts, word_map)
        except Exception as exc:
            log.exception("scenario %s failed", scenario)
            results[scenario] = {"error": repr(exc)}
        results.setdefault("durations_s", {})[scenario] = round(time.monotonic() - started)
        results_path.write_text(json.dumps(results, indent=1, default=str))
    results["reference_end"] = await asyncio.to_thread(machine_reference)
    results_path.write_text(json.dumps(results, indent=1, default=str))
    return results


def merge_scale(results: Json, other: Json) -> None:
    """Bring another run's scale-out figures (capacity and worker runs,
    fail-over) into ``results``, with the command that produced them."""
    runs = results.setdefault("runs", {})
    for key, run in (other.get("runs") or {}).items():
        if isinstance(run, dict) and "workers" in run:
            runs[key] = run
    if other.get("failover"):
        results["failover"] = other["failover"]
    commands = results.setdefault("scale_commands", [])
    for command in other.get("scale_commands") or [other.get("command")]:
        if command and command not in commands:
            commands.append(command)
    for key, seconds in (other.get("durations_s") or {}).items():
        results.setdefault("durations_s", {})[key] = seconds


def load_runs(opts: Options) -> list[tuple[str, str, str]]:
    """(engine, levels, scenario) of every load run, in order: each
    ``--engine`` with each ``--levels`` and load scenario, then each
    ``--also-engines`` once (active speakers, levels present)."""
    runs = [
        (engine, shape, scenario)
        for engine in opts.engines
        for shape in opts.levels
        for scenario in opts.scenarios
        if scenario in LOAD_SCENARIOS
    ]
    if "active" in opts.scenarios:
        runs += [(engine, "present", "active") for engine in opts.also_engines if engine not in opts.engines]
    return runs


def parse_args(argv: list[str] | None) -> tuple[Options, str]:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        default="all",
        help="active, silent, meeting, churn, soak or all (comma list); capacity and failover"
        " (scale-out: worker processes, replicas through NATS) are not part of all",
    )
    parser.add_argument("--workers", default="1,2", help="capacity: worker counts (LT_WORKERS), comma list")
    parser.add_argument(
        "--capacity-steps", default="50,100,150,200,250,300,400,500", help="capacity: active speaker counts"
    )
    parser.add_argument("--meeting-workers", type=int, default=1, help="meeting mix: LT_WORKERS")
    parser.add_argument(
        "--failover-rooms", type=int, default=10, help="failover: rooms of --per-room speakers"
    )
    parser.add_argument("--failover-deadline", type=float, default=90.0, help="failover: seconds to wait")
    parser.add_argument(
        "--merge-from",
        type=Path,
        action="append",
        default=[],
        help="another run's results.json whose scale-out figures join this report",
    )
    parser.add_argument(
        "--engine",
        default="modal",
        help="comma list of modal, moshi (production clients over TLS to the fake STT) and instant"
        " (in-process, zero cost: a lower bound only); active/silent/meeting run once per engine",
    )
    parser.add_argument(
        "--also-engines",
        default="moshi,instant",
        help="engines run once more, active speakers with levels only ('' for none)",
    )
    parser.add_argument(
        "--levels", default="present,absent", help="RFC 6464 levels in the RTP: present, absent or both"
    )
    parser.add_argument("--participants", default="100,300", help="meeting mix: participant counts")
    parser.add_argument("--room-size", default="5-20", help="meeting mix: room sizes, MIN-MAX")
    parser.add_argument("--talk-share", type=float, default=0.15, help="meeting mix: share of time talking")
    parser.add_argument("--seed", type=int, default=1, help="meeting mix: seed of rooms and turns")
    parser.add_argument(
        "--stt-delay-frames",
        type=int,
        default=0,
        help="fake STT model delay, 80 ms frames (0: added latency only)",
    )
    parser.add_argument(
        "--settle", type=float, default=4.0, help="seconds of hush around each window (lost-word count)"
    )
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames; slower)")
    parser.add_argument(
        "--generator",
        choices=GENERATORS,
        default="aiortc",
        help="load generator: aiortc (aiortc's sender per stream, ~200 streams per process) or lean"
        " (aiortc for ICE/DTLS only, then pre-protected SRTP on one tick: bench.lean_bridge)",
    )
    parser.add_argument(
        "--generator-ahead",
        type=int,
        default=DEFAULT_AHEAD,
        help=f"lean generator: packets protected ahead per batch and stream (1-{MAX_AHEAD})",
    )
    parser.add_argument("--speakers", default="1,10,50,100,150,200", help="active speaker counts")
    parser.add_argument("--silent", default="10,50,100,200", help="silent participant counts")
    parser.add_argument("--per-room", type=int, default=10)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before each window")
    parser.add_argument("--measure", type=float, default=30.0, help="seconds per window")
    parser.add_argument("--speaker-cycles", type=int, default=1000)
    parser.add_argument("--room-cycles", type=int, default=100)
    parser.add_argument("--churn-concurrency", type=int, default=10, help="speakers joining at once")
    parser.add_argument("--soak-minutes", type=float, default=5.0)
    parser.add_argument("--soak-speakers", type=int, default=50)
    parser.add_argument("--partial-interval-ms", type=int, default=0, help="LT_PARTIAL_INTERVAL_MS")
    parser.add_argument("--profile-at", type=int, default=100, help="profile at this N (0: never)")
    parser.add_argument("--profile-seconds", type=float, default=30.0, help="half raw, half flame graph")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--max-hours", type=float, default=3.0, help="hard stop of everything")
    parser.add_argument("--from-results", type=Path, help="only write the report from a results.json")
    parser.add_argument(
        "--service-cmd", default="", help="command that runs the service (default: live-transcription serve)"
    )
    parser.add_argument("--service-log-level", default="WARNING", help="LT_LOG_LEVEL of the service")
    args = parser.parse_args(argv)
    scenarios = list(ALL_SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    unknown = set(scenarios) - set(ALL_SCENARIOS) - set(SCALE_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    engines = [e for e in args.engine.split(",") if e]
    also = [e for e in args.also_engines.split(",") if e]
    if not engines or set(engines) - set(ENGINES) or set(also) - set(ENGINES):
        parser.error(f"--engine, --also-engines: comma lists of {', '.join(ENGINES)}")
    levels = [shape for shape in args.levels.split(",") if shape]
    if not levels or set(levels) - {"present", "absent"}:
        parser.error("--levels: present, absent or present,absent")
    if not 1 <= args.generator_ahead <= MAX_AHEAD:
        parser.error(f"--generator-ahead: 1..{MAX_AHEAD}")
    try:
        room_min, room_max = (int(part) for part in args.room_size.split("-"))
    except ValueError:
        parser.error("--room-size: MIN-MAX")
    opts = Options(
        scenarios=scenarios,
        speakers=[int(s) for s in args.speakers.split(",") if s.strip()],
        silent=[int(s) for s in args.silent.split(",") if s.strip()],
        per_room=args.per_room,
        warmup=args.warmup,
        measure=args.measure,
        speaker_cycles=args.speaker_cycles,
        churn_concurrency=args.churn_concurrency,
        room_cycles=args.room_cycles,
        soak_minutes=args.soak_minutes,
        soak_speakers=args.soak_speakers,
        partial_interval_ms=args.partial_interval_ms,
        profile_at=args.profile_at,
        profile_seconds=args.profile_seconds,
        out=args.out,
        img=args.img,
        work=args.work,
        max_seconds=args.max_hours * 3600,
        service_cmd=args.service_cmd,
        service_log_level=args.service_log_level,
        engines=engines,
        also_engines=also,
        levels=levels,
        stt_delay_frames=args.stt_delay_frames,
        participants=[int(p) for p in args.participants.split(",") if p.strip()],
        room_min=room_min,
        room_max=room_max,
        talk_share=args.talk_share,
        seed=args.seed,
        settle=args.settle,
        profile_native=args.profile_native,
        generator=args.generator,
        generator_ahead=args.generator_ahead,
        workers=[int(w) for w in args.workers.split(",") if w.strip()],
        capacity_steps=[int(n) for n in args.capacity_steps.split(",") if n.strip()],
        meeting_workers=args.meeting_workers,
        failover_rooms=args.failover_rooms,
        failover_deadline=args.failover_deadline,
        merge_from=list(args.merge_from),
    )
    if args.from_results:
        opts.work = args.from_results.parent
    return opts, reproduce_command(opts)


def reproduce_command(opts: Options) -> str:
    """Every option spelled out, so the run can be repeated when defaults change."""
    ints = ",".join
    parts = [
        "python -m bench.run",
        f"--scenario {','.join(opts.scenarios)}",
        f"--engine {','.join(opts.engines)}",
        f"--also-engines '{','.join(opts.also_engines)}'",
        f"--levels {','.join(opts.levels)}",
        f"--speakers {ints(map(str, opts.speakers))}",
        f"--silent {ints(map(str, opts.silent))}",
        f"--participants {ints(map(str, opts.participants))}",
        f"--room-size {opts.room_min}-{opts.room_max}",
        f"--talk-share {opts.talk_share:g}",
        f"--seed {opts.seed}",
        f"--per-room {opts.per_room}",
        f"--warmup {opts.warmup:g}",
        f"--measure {opts.measure:g}",
        f"--settle {opts.settle:g}",
        f"--stt-delay-frames {opts.stt_delay_frames}",
        f"--partial-interval-ms {opts.partial_interval_ms}",
        f"--profile-at {opts.profile_at}",
        f"--profile-seconds {opts.profile_seconds:g}",
        f"--generator {opts.generator}",
    ]
    if opts.generator == "lean":
        parts.append(f"--generator-ahead {opts.generator_ahead}")
    if opts.profile_native:
        parts.append("--profile-native")
    if "churn" in opts.scenarios:
        parts.append(
            f"--speaker-cycles {opts.speaker_cycles} --room-cycles {opts.room_cycles}"
            f" --churn-concurrency {opts.churn_concurrency}"
        )
    if "soak" in opts.scenarios:
        parts.append(f"--soak-minutes {opts.soak_minutes:g} --soak-speakers {opts.soak_speakers}")
    if "capacity" in opts.scenarios:
        parts.append(
            f"--workers {','.join(map(str, opts.workers))}"
            f" --capacity-steps {','.join(map(str, opts.capacity_steps))}"
        )
    if "meeting" in opts.scenarios and opts.meeting_workers != 1:
        parts.append(f"--meeting-workers {opts.meeting_workers}")
    if "failover" in opts.scenarios:
        parts.append(f"--failover-rooms {opts.failover_rooms} --failover-deadline {opts.failover_deadline:g}")
    parts += [f"--out {opts.out}", f"--img {opts.img}", f"--work {opts.work}"]
    if opts.service_cmd:
        parts.append(f"--service-cmd {shlex.quote(opts.service_cmd)}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    opts, command = parse_args(argv)
    print(f"to reproduce: {command}", file=sys.stderr)
    if "--from-results" in (argv if argv is not None else sys.argv):
        results = json.loads((opts.work / "results.json").read_text())
    else:
        if not opts.service_cmd and shutil.which("live-transcription", path=str(VENV_BIN)) is None:
            print("live-transcription is not installed in this venv", file=sys.stderr)
            return 2
        try:
            results = asyncio.run(asyncio.wait_for(run(opts, command), opts.max_seconds))
        except TimeoutError:
            print("the benchmark hit --max-hours", file=sys.stderr)
            return 1
    for other in opts.merge_from:
        merge_scale(results, json.loads(other.read_text()))
    report.write(results, opts.out, opts.img)
    print(f"wrote {opts.out} and plots in {opts.img}", file=sys.stderr)
    print(f"to reproduce: {results.get('command', command)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
