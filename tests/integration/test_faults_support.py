"""Shared setup of the fault tests (no tests here): a captioned call over real
sockets (HPB emulator, direct WebRTC bridge, the whole service), a census of
the service's peer connections, and the "nothing left behind" check."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiortc import RTCIceServer
from prometheus_client import REGISTRY

from live_transcription.api.app import Runtime
from live_transcription.config import load_settings
from live_transcription.media.peer import ReceivePeer
from live_transcription.rooms import speaker as speaker_module
from live_transcription.service import running_service
from live_transcription.sim.direct_bridge import DirectBridge, DirectPublisher
from live_transcription.sim.emulator import HpbEmulator
from live_transcription.sim.publisher import write_wav

BACKEND = "http://backend.invalid"
DEADLINE = 60.0


async def no_ice_servers() -> list[RTCIceServer]:
    return []


def talking_wav(path: Path, freq: float, talk: float = 1.0, pause: float = 1.0) -> Path:
    """A tone then silence: looped, one utterance (and one final) per cycle."""
    rate = 48_000
    t = np.arange(int(rate * talk)) / rate
    voice = 0.3 * np.sin(2 * np.pi * freq * t)
    pcm = np.concatenate([voice, np.zeros(int(rate * pause))])
    write_wav(path, (pcm * 32767).astype(np.int16), rate)
    return path


class PeerCensus:
    """Counts the service's receive peers entered and left."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0

    @property
    def open(self) -> int:
        return self.opened - self.closed

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        census = self

        class CountedPeer(ReceivePeer):
            async def __aenter__(self) -> CountedPeer:
                census.opened += 1
                try:
                    await super().__aenter__()
                except BaseException:
                    census.closed += 1
                    raise
                return self

            async def __aexit__(self, *exc: Any) -> None:
                try:
                    await super().__aexit__(*exc)
                finally:
                    census.closed += 1

        monkeypatch.setattr(speaker_module, "ReceivePeer", CountedPeer)


def metric(name: str, labels: Mapping[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, dict(labels or {})) or 0.0


@dataclass
class Call:
    hpb: HpbEmulator
    bridge: DirectBridge
    runtime: Runtime
    publishers: dict[str, DirectPublisher]
    census: PeerCensus
    secret: str
    tasks_before: set[asyncio.Task[Any]] = field(default_factory=set)


@asynccontextmanager
async def captioned_call(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    room: str,
    speakers: Iterable[str] = ("alice", "bob"),
    *,
    hpb_resume_window: float = 30.0,
    **settings: object,
) -> AsyncIterator[Call]:
    """The service captioning ``speakers`` (looping tone+pause) in ``room``;
    on exit, asserts that nothing is left behind."""
    census = PeerCensus()
    census.install(monkeypatch)
    tasks_before = set(asyncio.all_tasks())
    bridge = DirectBridge()
    publishers = {
        name: bridge.add_publisher(name, talking_wav(tmp_path / f"{name}.wav", 200 + 60 * i), loop=True)
        for i, name in enumerate(speakers)
    }
    secret = secrets.token_hex(8)
    try:
        async with HpbEmulator(secret, BACKEND, bridge=bridge, resume_window=hpb_resume_window) as hpb:
            for name in publishers:
                await hpb.add_participant(
                    room, session_id=name, nextcloud_session_id=f"talk-{name}", in_call=7, user_id=name
                )
            options: dict[str, object] = {
                "LT_HPB_URL": hpb.url,
                "LT_INTERNAL_SECRET": secret,
                "NEXTCLOUD_URL": BACKEND,
                "LT_STT_ENGINE": "instant",
                "APP_SECRET": "x",
                "LT_ROOM_LINGER_SECONDS": 0.5,
            }
            options.update(settings)
            async with running_service(load_settings(**options), ice_servers=no_ice_servers) as runtime:
                call = Call(hpb, bridge, runtime, publishers, census, secret, tasks_before)
                yield call
            # the service is gone: every room, speaker, peer and HPB socket with it
            assert runtime.manager.rooms() == []
            assert runtime.manager.admission.active == 0
            assert census.open == 0, f"{census.open} peer connection(s) left open"
            await hpb.wait_for(lambda: hpb.sessions_in_room(room, internal=True) == [])
            await hpb.wait_for(lambda: hpb.open_connections == 0)
    finally:
        await bridge.aclose()
    await assert_no_tasks_left(tasks_before)


async def assert_no_tasks_left(before: set[asyncio.Task[Any]]) -> None:
    leftover = set(asyncio.all_tasks()) - before - {asyncio.current_task()}
    if leftover:
        # aiortc's own close-time tasks end by themselves: wait on them, not on time
        await asyncio.wait(leftover, timeout=DEADLINE)
    still_running = sorted(t.get_name() for t in leftover if not t.done())
    assert still_running == [], still_running


def finals(messages: list[dict[str, Any]], speaker: str) -> int:
    return sum(1 for m in messages if m["speakerSessionId"] == speaker and m["final"])
