"""The load generator: HPB emulator + an SFU made of direct aiortc peers.

Run as its own process (``python -m bench.loadgen``), driven by the harness
over stdin/stdout, one JSON object per line. It holds:

* a ``MeasuringEmulator``: the HPB emulator, which also timestamps every
  transcript message the service sends (the moment it arrives at the HPB);
* a ``DirectBridge``: the emulator's ``MediaBridge``. It is the SFU itself:
  for each ``requestoffer`` it creates a send-only aiortc peer connection
  whose audio comes from a pre-encoded ``Pattern`` (no Janus: one Janus
  would be the bottleneck at hundreds of streams, and its cost would be
  mixed into the figures). Sending costs no encoding: aiortc's sender is
  handed the Opus payloads and only packetizes, encrypts and sends them;
* a ``Ticker``: one timer for every stream (20 ms split into phases so the
  streams are spread over the period), instead of one sleep per stream;
* a stub of Nextcloud's signaling-settings route (no STUN/TURN) for the
  service's ICE server lookup.

``--generator lean`` replaces the last two: aiortc makes the peer
connections and runs ICE and DTLS, then a ``LeanBridge`` sends SRTP packets
protected ahead of time on one ``SendTicker`` (``bench.lean_bridge``), at a
fraction of aiortc's cost per stream. Same patterns, same commands, same
counts.

Commands (``{"id": n, "cmd": ...}``, answered with ``{"id": n, ...}``):
``room`` (create a room with one caption target), ``speakers`` (add
publishers in call with audio), ``remove`` (participants leave),
``end_room``, ``wait_connected``, ``stats``, ``last_captions`` (when each
room's last transcript arrived), ``watch_captions`` and ``watched`` (each
room's first transcript after a moment), ``room_clients`` (the service's
sessions in each room) and ``quit``. The process stops by
itself on ``quit``, on end of input (the harness went away) or after
``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCEncodedFrame

from bench.latency import SendLog, WordLatency, WordMap
from bench.lean_bridge import DEFAULT_AHEAD, LeanBridge, LeanStream, SendTicker
from bench.meeting import MixShape, talk_schedule
from bench.patterns import PACKET_MS, PACKET_SAMPLES, Pattern, build_pattern
from bench.subscriptions import SubscriptionBook
from live_transcription.hpb.protocol import IN_CALL, WITH_AUDIO
from live_transcription.sim.emulator import HpbEmulator

log = logging.getLogger("bench.loadgen")

Json = dict[str, Any]
SPEAKER_FLAGS = IN_CALL | WITH_AUDIO | 4  # in call, audio, video (a browser's 7)
TARGET_FLAGS = IN_CALL  # listening, no microphone: not a speaker itself
GENERATORS = ("aiortc", "lean")
MEASURABLE_GAP_PACKETS = 50
"""An utterance whose word latency is matched starts after 1 s of silence at
least: the service's gate (600 ms speech end) has closed and frames restart
at its onset, as in the word map."""
SILENT_AFTER_S = 3.0
"""A word for a speaker silent this long cannot be theirs (longest flush + delay is ~1.6 s)."""


# --- pacing -----------------------------------------------------------------------------


class Ticker:
    """One timer for all streams: every ``PACKET_MS / phases`` a tick; a stream
    waits for the ticks of its phase, so it sends every 20 ms and the streams
    are spread over the period. Lateness of the timer itself is recorded:
    it shows whether the generator kept up."""

    def __init__(self, phases: int = 4) -> None:
        self.phases = phases
        self.step = PACKET_MS / 1000 / phases
        self._events = [asyncio.Event() for _ in range(phases)]
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self.tick = 0
        self.skipped = 0
        self.lag_max = 0.0
        self.lag_over_5ms = 0
        self.hushed = False
        """Every stream sends its silence (the harness' quiet end of a window)."""
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._start = self._loop.time()
        self._handle = self._loop.call_at(self._start + self.step, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for event in self._events:
            event.set()

    def reset_stats(self) -> None:
        self.skipped = 0
        self.lag_max = 0.0
        self.lag_over_5ms = 0

    def _fire(self) -> None:
        now = self._loop.time()
        self.tick += 1
        lag = now - (self._start + self.tick * self.step)
        self.lag_max = max(self.lag_max, lag)
        if lag > 0.005:
            self.lag_over_5ms += 1
        if lag > self.step:
            missed = int(lag / self.step)
            self.tick += missed
            self.skipped += missed
        phase = self.tick % self.phases
        event = self._events[phase]
        self._events[phase] = asyncio.Event()
        event.set()
        self._handle = self._loop.call_at(self._start + (self.tick + 1) * self.step, self._fire)

    async def wait(self, phase: int) -> None:
        await self._events[phase % self.phases].wait()


class GcPauses:
    """How long this process' garbage collections stop its loop (the
    generator's own health: a long pause delays every stream's packets)."""

    def __init__(self) -> None:
        self._started = 0.0
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.full = 0
        self.total = 0.0
        self.longest = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.count += 1
        self.full += info.get("generation") == 2
        self.total += pause
        self.longest = max(self.longest, pause)


# --- one stream -------------------------------------------------------------------------


class PatternTrack(MediaStreamTrack):
    """An audio track that loops pre-encoded packets, paced by the ticker.
    Its sender is patched (``attach``) to take the payloads as they are."""

    kind = "audio"

    def __init__(
        self, pattern: Pattern, offset: int, ticker: Ticker, phase: int, *, levels: bool = True
    ) -> None:
        super().__init__()
        self.pattern = pattern
        self.offset = offset
        self._ticker = ticker
        self._phase = phase
        self._levels = levels
        self.log = SendLog()
        self.talk_packets = 0
        self.utterances = 0
        self.talking = False
        self.last_talk = -math.inf
        self._silence = 0

    def _position(self, index: int) -> tuple[int, bool]:
        """The pattern position of packet ``index`` and whether it is talk."""
        position = (self.offset + index) % self.pattern.period
        return position, position < self.pattern.talk_packets

    async def recv(self) -> Any:
        raise MediaStreamError("PatternTrack is read through its sender's patched encoder step")

    async def next_frame(self, codec: object) -> RTCEncodedFrame | None:
        """Stands in for ``RTCRtpSender._next_encoded_frame``: no encoder, the
        payload goes out as it is, with its audio level extension."""
        if self.readyState != "live":
            raise MediaStreamError
        await self._ticker.wait(self._phase)
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        index = self.log.record(now)
        position, talking = self._position(index)
        if self._ticker.hushed and talking:
            talking = False
            position = self.pattern.talk_packets + self._silence % max(1, self.pattern.pause_packets)
            self._silence += 1
        if talking:
            self.talk_packets += 1
            self.utterances += not self.talking
            self.last_talk = now
        self.talking = talking
        # aiortc writes the extension as -audio_level: pass the level negated;
        # None sends no level at all (the service must find silence itself)
        return RTCEncodedFrame(
            [self.pattern.payloads[position]],
            index * PACKET_SAMPLES,
            -self.pattern.levels[position] if self._levels else None,  # type: ignore[arg-type]
        )


class ScheduledTrack(PatternTrack):
    """A meeting participant: talks when its schedule (one byte per packet,
    looping) says so and sends the pattern's noise floor otherwise. Every
    turn starts at the beginning of the pattern's talk (looping it when
    longer) and every pause at the beginning of its pause, so each onset
    looks to the service as the pattern's do, and the word map holds from
    the onset (``WordLatency.on_turn_transcript``) for the first loop of talk."""

    def __init__(
        self, pattern: Pattern, schedule: bytes, ticker: Ticker, phase: int, *, levels: bool
    ) -> None:
        super().__init__(pattern, 0, ticker, phase, levels=levels)
        self.schedule = schedule
        self.onsets: collections.deque[int] = collections.deque(maxlen=64)
        """Packet indexes where this participant's recent utterances started."""
        self.unmeasured: set[int] = set()
        """Onsets too soon after the previous utterance for the word map to hold."""
        self._quiet = MEASURABLE_GAP_PACKETS
        self._talk_cursor = 0
        self._pause_cursor = 0

    def _position(self, index: int) -> tuple[int, bool]:
        if self.schedule[index % len(self.schedule)] and not self._ticker.hushed:
            if not self.talking:
                self._talk_cursor = 0
                self.onsets.append(index)
                if self._quiet < MEASURABLE_GAP_PACKETS:
                    self.unmeasured.add(index)
                self.unmeasured = {o for o in self.unmeasured if o >= self.onsets[0]}
            self._quiet = 0
            position = self._talk_cursor % max(1, self.pattern.talk_packets)
            self._talk_cursor += 1
            return position, True
        if self.talking:
            self._pause_cursor = 0
        position = self.pattern.talk_packets + self._pause_cursor % max(1, self.pattern.pause_packets)
        self._pause_cursor += 1
        self._quiet += 1
        return position, False


@dataclass(eq=False)
class Subscription:
    sid: str
    subscriber: str
    publisher: str
    pc: RTCPeerConnection
    track: PatternTrack
    created: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class PublisherSpec:
    pattern: Pattern
    offset: int
    schedule: bytes | None = None


class DirectBridge(SubscriptionBook[Subscription]):
    """``MediaBridge`` for the emulator: every subscription is a direct,
    send-only aiortc peer connection. One owner (the loadgen's loop)."""

    def __init__(self, ticker: Ticker, *, levels: bool = True) -> None:
        super().__init__()
        self._ticker = ticker
        self._levels = levels
        self._publishers: dict[str, PublisherSpec] = {}
        self._sids = (f"direct-{n}" for n in itertools.count(1))
        self._phases = itertools.count()

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        return self._subscriptions

    def add_publisher(
        self, session_id: str, pattern: Pattern, offset: int, schedule: bytes | None = None
    ) -> None:
        self._publishers[session_id] = PublisherSpec(pattern, offset, schedule)

    async def remove_publisher(self, session_id: str) -> None:
        self._publishers.pop(session_id, None)
        await self._close_publisher(session_id)

    def subscription_of(self, publisher: str) -> Subscription | None:
        return self._by_publisher.get(publisher)

    def connected(self) -> int:
        return sum(1 for s in self._subscriptions.values() if s.pc.connectionState == "connected")

    def is_up(self, sub: Subscription) -> bool:
        return sub.pc.connectionState == "connected"

    async def request_offer(self, subscriber: str, publisher: str) -> tuple[str, str]:
        spec = self._publishers.get(publisher)
        if spec is None:
            raise LookupError(f"session {publisher} publishes no media")
        await self._close_earlier(subscriber, publisher)
        pc = RTCPeerConnection()
        phase = next(self._phases)
        track = (
            PatternTrack(spec.pattern, spec.offset, self._ticker, phase, levels=self._levels)
            if spec.schedule is None
            else ScheduledTrack(spec.pattern, spec.schedule, self._ticker, phase, levels=self._levels)
        )
        sender = pc.addTrack(track)
        # instance attribute shadows the method for aiortc's own send loop
        sender._next_encoded_frame = track.next_frame  # type: ignore[method-assign]
        await pc.setLocalDescription(await pc.createOffer())
        if self._publishers.get(publisher) is not spec:
            # the publisher left while the offer was being made
            track.stop()
            await pc.close()
            raise LookupError(f"session {publisher} left")
        sid = next(self._sids)
        self._add(Subscription(sid, subscriber, publisher, pc, track))
        return sid, pc.localDescription.sdp

    def _release(self, sub: Subscription) -> None:
        sub.track.stop()


# --- the HPB emulator, measuring -----------------------------------------------------------


class MeasuringEmulator(HpbEmulator):
    """The emulator, timestamping each transcript message as it arrives."""

    def __init__(self, *args: Any, on_transcript: Callable[[float, Json], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_transcript = on_transcript

    async def _message(self, session: Any, msg_id: object, body: Json) -> None:
        data = body.get("data")
        if isinstance(data, dict) and data.get("type") == "transcript":
            self._on_transcript(time.monotonic(), data)
        await super()._message(session, msg_id, body)


# --- the process -------------------------------------------------------------------------------


@dataclass
class Counters:
    transcripts: int = 0
    transcripts_unknown_speaker: int = 0
    words_seen: int = 0
    words_delivered: int = 0
    """New words in transcripts (each word once, partial or final)."""
    words_while_silent: int = 0
    """New words for a speaker who had not talked for ``SILENT_AFTER_S``: misattributed."""


class LoadGenerator:
    def __init__(
        self,
        internal_secret: str,
        word_map: WordMap | None,
        patterns: dict[str, Pattern],
        *,
        levels: bool = True,
        generator: str = "aiortc",
        ahead: int = DEFAULT_AHEAD,
    ) -> None:
        if generator not in GENERATORS:
            raise ValueError(f"generator: one of {', '.join(GENERATORS)}")
        self.levels = levels
        self.generator = generator
        self.ahead = ahead
        self._shown: dict[str, int] = {}
        self.internal_secret = internal_secret
        self.patterns = patterns
        self.word_latency = WordLatency(word_map) if word_map is not None else None
        self.counters = Counters()
        self.totals = Counters()
        """The same counts, never reset (a scenario's lost-word check)."""
        self._speaker_kind: dict[str, str] = {}
        self._rooms: dict[str, list[str]] = {}
        self._room_of: dict[str, str] = {}
        self._last_caption: dict[str, float] = {}
        """Per room, when its last transcript message arrived (monotonic)."""
        self._watch_since = math.inf
        self._first_caption: dict[str, float] = {}
        """Per room, its first transcript message after ``_watch_since``."""
        self._names = itertools.count(1)
        self._ticker: Ticker | SendTicker | None = None
        self._bridge: DirectBridge | LeanBridge | None = None
        self._emulator: MeasuringEmulator | None = None
        self.nextcloud_port = 0
        self.gc_pauses = GcPauses()

    @property
    def bridge(self) -> DirectBridge | LeanBridge:
        assert self._bridge is not None
        return self._bridge

    @property
    def emulator(self) -> MeasuringEmulator:
        assert self._emulator is not None
        return self._emulator

    def _transcript(self, arrived: float, data: Json) -> None:
        self.counters.transcripts += 1
        speaker = data.get("speakerSessionId")
        text = data.get("message")
        if not isinstance(speaker, str) or not isinstance(text, str):
            return
        room = self._room_of.get(speaker)
        if room is not None:
            self._last_caption[room] = arrived
            if arrived >= self._watch_since and room not in self._first_caption:
                self._first_caption[room] = arrived
        sub = self.bridge.subscription_of(speaker)
        count = len(text.split())
        final = data.get("final") is not False
        new = max(0, count - self._shown.get(speaker, 0))
        self._shown[speaker] = 0 if final else max(count, self._shown.get(speaker, 0))
        self.counters.words_delivered += new
        self.totals.words_delivered += new
        if sub is not None and new and arrived - sub.track.last_talk > SILENT_AFTER_S:
            self.counters.words_while_silent += new
            self.totals.words_while_silent += new
        if sub is None:
            self.totals.transcripts_unknown_speaker += 1
        if sub is None or self.word_latency is None:
            self.counters.transcripts_unknown_speaker += sub is None
            return
        track = sub.track
        if isinstance(track, ScheduledTrack) or (isinstance(track, LeanStream) and track.scheduled):
            self.counters.words_seen += self.word_latency.on_turn_transcript(
                speaker,
                text,
                final=final,
                arrived=arrived,
                log=track.log,
                onsets=track.onsets,
                unmeasured=track.unmeasured,
            )
            return
        self.counters.words_seen += self.word_latency.on_transcript(
            speaker,
            text,
            final=data.get("final") is not False,
            arrived=arrived,
            log=sub.track.log,
            offset=sub.track.offset,
        )

    async def run(self, max_seconds: float) -> None:
        if self.generator == "lean":
            lean = SendTicker(ahead=self.ahead)
            self._ticker = lean
            self._bridge = LeanBridge(lean, levels=self.levels)
        else:
            ticker = Ticker()
            self._ticker = ticker
            self._bridge = DirectBridge(ticker, levels=self.levels)
        self._ticker.start()
        self.gc_pauses.install()
        runner = web.AppRunner(_nextcloud_stub())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = getattr(site, "_server", None)
        assert server is not None and server.sockets
        self.nextcloud_port = server.sockets[0].getsockname()[1]
        backend = f"http://127.0.0.1:{self.nextcloud_port}"
        try:
            emulator = MeasuringEmulator(
                self.internal_secret,
                backend,
                bridge=self._bridge,
                recording_limit=1000,
                on_transcript=self._transcript,
            )
            self._emulator = emulator
            async with emulator:
                ready = {"hpb_port": emulator.port, "nextcloud_url": backend, "pid": os.getpid()}
                _emit({"ready": True} | ready)
                async with asyncio.timeout(max_seconds):
                    await self._serve_commands()
        except TimeoutError:
            log.warning("loadgen: --max-seconds reached, stopping")
        finally:
            await self._bridge.aclose()
            self._ticker.stop()
            self.gc_pauses.uninstall()
            await runner.cleanup()

    async def _serve_commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                return  # the harness went away
            try:
                command = json.loads(line)
                if not isinstance(command, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                _emit({"error": f"bad command: {exc}"})
                continue
            reply: Json = {"id": command.get("id")}
            try:
                result = await self._handle(command)
            except Exception as exc:  # a bad command must not stop the generator
                log.exception("command %s failed", command.get("cmd"))
                reply["error"] = repr(exc)
            else:
                if result is None:
                    _emit(reply | {"ok": True})
                    return
                reply |= result
            _emit(reply)

    async def _handle(self, command: Json) -> Json | None:
        cmd = command.get("cmd")
        if cmd == "quit":
            return None
        if cmd == "room":
            token = str(command["token"])
            target_nc = f"nc-target-{token}"
            self.emulator.create_room(token)
            await self.emulator.add_participant(
                token, nextcloud_session_id=target_nc, in_call=TARGET_FLAGS, user_id=f"target-{token}"
            )
            self._rooms.setdefault(token, [])
            return {"target": target_nc}
        if cmd == "speakers":
            return {"sessions": await self._add_speakers(command)}
        if cmd == "remove":
            for sid in command["sessions"]:
                await self._remove(str(sid))
            return {}
        if cmd == "end_room":
            token = str(command["token"])
            for sid in list(self._rooms.get(token, ())):
                await self._remove(sid)
            self._last_caption.pop(token, None)
            for sid in self.emulator.sessions_in_room(token, internal=False):
                await self.emulator.remove_participant(sid)
            self._rooms.pop(token, None)
            return {}
        if cmd == "wait_connected":
            return await self._wait_connected(int(command["count"]), float(command.get("timeout", 60)))
        if cmd == "wait_connected_room":
            members = self._rooms.get(str(command["token"]), [])
            connected = await self._wait_members(list(members), float(command.get("timeout", 30)))
            return {"connected": connected}
        if cmd == "cycle_speakers":
            return await self._cycle_speakers(
                str(command["token"]),
                int(command["count"]),
                int(command.get("concurrency", 10)),
                float(command.get("hold_ms", 300)) / 1000,
            )
        if cmd == "internal_sessions":
            token = str(command["token"])
            return {"count": len(self.emulator.sessions_in_room(token, internal=True))}
        if cmd == "stats":
            return self._stats(bool(command.get("reset", False)))
        if cmd == "meeting":
            return {"sessions": await self._add_meeting(command)}
        if cmd == "hush":
            assert self._ticker is not None
            self._ticker.hushed = bool(command.get("on", True))
            return {}
        if cmd == "talking":
            return self._talking()
        if cmd == "last_captions":
            # monotonic clocks are one clock across the machine's processes
            return {"now": time.monotonic(), "rooms": dict(self._last_caption)}
        if cmd == "watch_captions":
            # from ``since`` (the harness' monotonic time) on, note each
            # room's first transcript message (fail-over: captions resume)
            self._watch_since = float(command["since"])
            self._first_caption = {}
            return {}
        if cmd == "room_clients":
            # the service's own sessions in each room: a room re-opened by
            # another worker or replica shows a new one
            return {
                "rooms": {
                    token: self.emulator.sessions_in_room(token, internal=True) for token in self._rooms
                }
            }
        if cmd == "watched":
            return {"now": time.monotonic(), "rooms": dict(self._first_caption)}
        raise ValueError(f"unknown command {cmd!r}")

    async def _add_speakers(self, command: Json) -> list[str]:
        token = str(command["token"])
        kind = str(command.get("kind", "active"))
        pattern = self.patterns[kind]
        sessions = []
        for _ in range(int(command["count"])):
            n = next(self._names)
            sid = f"speaker-{n}"
            # start in the pause, before the pre-roll a gate keeps, so the
            # service sees whole utterances; spread the streams over it
            spread = max(1, pattern.pause_packets - 20)
            offset = (pattern.talk_packets + (n * 37) % spread) % pattern.period
            self.bridge.add_publisher(sid, pattern, offset)
            await self.emulator.add_participant(
                token, session_id=sid, in_call=SPEAKER_FLAGS, user_id=f"user-{n}"
            )
            self._rooms.setdefault(token, []).append(sid)
            self._room_of[sid] = token
            self._speaker_kind[sid] = kind
            sessions.append(sid)
        return sessions

    async def _add_meeting(self, command: Json) -> list[str]:
        """``count`` participants with meeting-mix schedules (``bench.meeting``)
        seeded by ``seed`` and their number."""
        token = str(command["token"])
        shape = MixShape(
            talk_share=float(command.get("talk_share", 0.15)),
            turn_median_s=float(command.get("turn_median_s", 2.5)),
        )
        period = float(command.get("period_s", 120.0))
        seed = int(command.get("seed", 1))
        pattern = self.patterns["active"]
        sessions = []
        for _ in range(int(command["count"])):
            n = next(self._names)
            sid = f"speaker-{n}"
            self.bridge.add_publisher(sid, pattern, 0, talk_schedule(shape, seed * 1_000_003 + n, period))
            await self.emulator.add_participant(
                token, session_id=sid, in_call=SPEAKER_FLAGS, user_id=f"user-{n}"
            )
            self._rooms.setdefault(token, []).append(sid)
            self._room_of[sid] = token
            self._speaker_kind[sid] = "meeting"
            sessions.append(sid)
        return sessions

    def _talking(self) -> Json:
        """Streams talking now (their last packet was talk)."""
        subs = self.bridge.subscriptions.values()
        return {"talking": sum(1 for s in subs if s.track.talking), "streams": len(self.bridge.subscriptions)}

    async def _remove(self, sid: str) -> None:
        await self.emulator.remove_participant(sid)
        await self.bridge.remove_publisher(sid)
        self._speaker_kind.pop(sid, None)
        self._shown.pop(sid, None)
        self._room_of.pop(sid, None)
        if self.word_latency is not None:
            self.word_latency.forget(sid)
        for members in self._rooms.values():
            if sid in members:
                members.remove(sid)

    async def _wait_connected(self, count: int, deadline_seconds: float) -> Json:
        deadline = time.monotonic() + deadline_seconds
        # polling a count of peers (no event to wait on across aiortc's
        # internals); bounded by the deadline
        while time.monotonic() < deadline:
            if self.bridge.connected() >= count:
                break
            await asyncio.sleep(0.1)
        return {"connected": self.bridge.connected(), "subscriptions": len(self.bridge.subscriptions)}

    def _members_connected(self, members: list[str]) -> int:
        count = 0
        bridge = self.bridge
        for sid in members:
            if isinstance(bridge, LeanBridge):
                lean = bridge.subscription_of(sid)
                count += lean is not None and bridge.is_up(lean)
            else:
                sub = bridge.subscription_of(sid)
                count += sub is not None and bridge.is_up(sub)
        return count

    async def _wait_members(self, members: list[str], deadline_seconds: float) -> int:
        deadline = time.monotonic() + deadline_seconds
        # a bounded poll: aiortc's connection states have no shared event to wait on
        while self._members_connected(members) < len(members) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return self._members_connected(members)

    async def _cycle_speakers(self, token: str, count: int, concurrency: int, hold: float) -> Json:
        """``count`` speakers join the room's call, get connected to by the
        service, talk for ``hold`` seconds and leave; ``concurrency`` at a time."""
        cycles = iter(range(count))
        outcome = {"connected": 0, "not_connected": 0}

        async def worker() -> None:
            for _ in cycles:
                sid = (await self._add_speakers({"token": token, "count": 1, "kind": "active"}))[0]
                if await self._wait_members([sid], 20.0):
                    outcome["connected"] += 1
                    await asyncio.sleep(hold)
                else:
                    outcome["not_connected"] += 1
                await self._remove(sid)

        async with asyncio.TaskGroup() as tasks:
            for _ in range(max(1, concurrency)):
                tasks.create_task(worker())
        return outcome

    def _stats(self, reset: bool) -> Json:
        ticker = self._ticker
        assert ticker is not None
        wl = self.word_latency
        result: Json = {
            "transcripts": self.counters.transcripts,
            "transcripts_unknown_speaker": self.counters.transcripts_unknown_speaker,
            "words_matched": self.counters.words_seen,
            "latencies": wl.take() if wl is not None and reset else (list(wl.latencies) if wl else []),
            "unmatched_words": wl.unmatched if wl else 0,
            "early_words": wl.early if wl else 0,
            "finals": wl.finals if wl else 0,
            "partials": wl.partials if wl else 0,
            "subscriptions": len(self.bridge.subscriptions),
            "connected": self.bridge.connected(),
            "offers": self.bridge.offers,
            "stale_answers": self.bridge.stale_answers,
            "bad_answers": self.bridge.bad_answers,
            "closed": self.bridge.closed,
            "ticker_skipped": ticker.skipped,
            "ticker_lag_max_ms": round(ticker.lag_max * 1000, 2),
            "ticker_lag_over_5ms": ticker.lag_over_5ms,
            "packets_sent": sum(s.track.log.sent for s in self.bridge.subscriptions.values()),
            "talk_packets": sum(s.track.talk_packets for s in self.bridge.subscriptions.values()),
            "utterances": sum(s.track.utterances for s in self.bridge.subscriptions.values()),
            "words_delivered": self.counters.words_delivered,
            "words_while_silent": self.counters.words_while_silent,
            "words_delivered_total": self.totals.words_delivered,
            "words_while_silent_total": self.totals.words_while_silent,
            "transcripts_unknown_speaker_total": self.totals.transcripts_unknown_speaker,
            "gc_collections": self.gc_pauses.count,
            "gc_full_collections": self.gc_pauses.full,
            "gc_pause_total_ms": round(self.gc_pauses.total * 1000, 1),
            "gc_pause_max_ms": round(self.gc_pauses.longest * 1000, 1),
            "generator": self.generator,
        }
        if isinstance(ticker, SendTicker):
            result |= {
                "send_errors": ticker.send_errors,
                "reports_sent": ticker.reports_sent,
                "report_errors": ticker.report_errors,
            }
        if reset:
            for sub in self.bridge.subscriptions.values():
                sub.track.talk_packets = sub.track.utterances = 0
            ticker.reset_stats()
            self.gc_pauses.reset()
            self.counters = Counters()
            if wl is not None:
                wl.unmatched = wl.early = wl.finals = wl.partials = 0
        return result


def _nextcloud_stub() -> web.Application:
    """Nextcloud's routes the service calls: signaling settings (no STUN or
    TURN: loopback only) and AppAPI's init progress."""

    async def settings(_: web.Request) -> web.Response:
        return web.json_response(
            {"ocs": {"meta": {"status": "ok"}, "data": {"stunservers": [], "turnservers": []}}}
        )

    async def status(_: web.Request) -> web.Response:
        return web.json_response({"ocs": {"meta": {"status": "ok"}, "data": []}})

    app = web.Application()
    app.router.add_get("/ocs/v2.php/apps/spreed/api/v3/signaling/settings", settings)
    app.router.add_put("/ocs/v1.php/apps/app_api/apps/status/{app}", status)
    return app


def _emit(message: Json) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--internal-secret", required=True)
    parser.add_argument("--talk-ms", type=int, default=3000)
    parser.add_argument("--pause-ms", type=int, default=1500)
    parser.add_argument("--word-map", default="", help="JSON {period, word_packets}")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("--no-levels", action="store_true", help="send no RFC 6464 audio level")
    parser.add_argument(
        "--generator",
        choices=GENERATORS,
        default="aiortc",
        help="aiortc: aiortc's sender per stream; lean: aiortc for ICE/DTLS, then pre-protected"
        " SRTP on one tick (bench.lean_bridge)",
    )
    parser.add_argument(
        "--ahead", type=int, default=DEFAULT_AHEAD, help="lean: packets protected per batch and stream"
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="event loop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    patterns = {
        "active": build_pattern(args.talk_ms, args.pause_ms, seed=1),
        "silent": build_pattern(0, args.talk_ms + args.pause_ms, seed=2),
    }
    word_map = None
    if args.word_map:
        raw = json.loads(args.word_map)
        word_map = WordMap(
            int(raw["period"]), tuple(tuple(int(p) for p in words) for words in raw["utterances"])
        )
    generator = LoadGenerator(
        args.internal_secret,
        word_map,
        patterns,
        levels=not args.no_levels,
        generator=args.generator,
        ahead=args.ahead,
    )
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(generator.run(args.max_seconds))
    else:
        asyncio.run(generator.run(args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
