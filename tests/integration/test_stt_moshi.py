"""The moshi-server engine against the moshi-server fake, over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import connect

from live_transcription.clock import ManualClock
from live_transcription.stt.base import Pause, StreamError, Word
from live_transcription.stt.moshi import MoshiEngine
from live_transcription.stt.pool import PoolOptions
from live_transcription.stt.remote import RemoteOptions
from tests.fakes import VOCABULARY, speech
from tests.fakes.moshi_server import FakeMoshiServer
from tests.fakes.streams import collect_until, ends_with_pause, never, words

_ENGINES: list[MoshiEngine] = []


@pytest.fixture(autouse=True)
async def _close_engines() -> AsyncIterator[None]:
    yield
    while _ENGINES:
        await _ENGINES.pop().aclose()


def engine_for(
    fake: FakeMoshiServer, clock: ManualClock, key: str = "test-key", pool: PoolOptions | None = None
) -> MoshiEngine:
    """No headroom unless asked: connections open when speech needs them."""
    options = RemoteOptions(backoff_jitter=0.0)
    engine = MoshiEngine(fake.url, key, clock=clock, options=options, pool=pool or PoolOptions(headroom=0))
    _ENGINES.append(engine)
    return engine


async def test_words_then_exact_flush_by_marker() -> None:
    clock = ManualClock()
    async with FakeMoshiServer() as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("fr") as stream:
            for frame in speech(range(4)):
                stream.push(frame)
            stream.end_of_speech()
            # no clock needed: the marker coming back ends the flush
            events = await collect_until(stream, ends_with_pause)
        assert words(events) == list(VOCABULARY[:4])
        assert fake.markers_echoed == 1
        pauses = [e for e in events if isinstance(e, Pause)]
        assert len(pauses) == 1  # the server's pause and the flush: one Pause
        first = events[0]
        assert isinstance(first, Word) and first.audio_start == 0.0


async def test_server_pause_signal_emits_pause_once() -> None:
    clock = ManualClock()
    async with FakeMoshiServer() as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("en") as stream:
            frames = speech([0]) + speech([], gap=0) + [speech([0])[-1]] * 20
            for frame in frames:
                stream.push(frame)
            events = await collect_until(stream, ends_with_pause)
            assert words(events) == ["alpha"]
            stream.end_of_speech()
        assert fake.connections == 1


async def test_reconnect_mid_utterance_loses_and_duplicates_nothing() -> None:
    clock = ManualClock()
    ids = list(range(15))
    async with FakeMoshiServer(drop_after_frames=30) as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("en") as stream:
            for frame in speech(ids):
                stream.push(frame)
            stream.end_of_speech()
            events = await collect_until(stream, ends_with_pause)
        assert words(events) == [VOCABULARY[i] for i in ids]
        assert fake.drops == 1 and fake.connections == 2
        assert stream.duplicates_dropped > 0  # type: ignore[attr-defined]
        # the replayed words kept their stream times
        starts = [e.audio_start or 0.0 for e in events if isinstance(e, Word)]
        assert starts == sorted(starts)
        assert starts[-1] == (len(ids) - 1) * 4 * 0.08


async def test_bad_key_is_fatal_and_not_retried() -> None:
    clock = ManualClock()
    async with FakeMoshiServer() as fake:
        engine = engine_for(fake, clock, key="nope")
        async with engine.open_stream("en") as stream:
            stream.push(speech([0])[0])
            events = await collect_until(stream, never)
        assert [(e.reason, e.fatal) for e in events if isinstance(e, StreamError)] == [("auth", True)]
        clock.skip(10.0)
        async with engine.open_stream("en") as stream:
            stream.push(speech([0])[0])
            await collect_until(stream, never)
        assert fake.handshakes == 1


async def test_no_free_channels_backs_off_and_succeeds_when_one_frees() -> None:
    clock = ManualClock()
    async with FakeMoshiServer(channels=1) as fake:
        engine = engine_for(fake, clock)
        async with connect(fake.url, additional_headers={"kyutai-api-key": "test-key"}) as hog:
            await hog.recv()  # Ready: the only channel is taken
            async with engine.open_stream("en") as stream:
                for frame in speech(range(3)):
                    stream.push(frame)
                events = await collect_until(
                    stream, lambda e: isinstance(e[-1], StreamError) and e[-1].reason == "capacity"
                )
                attempts = engine.connection_attempts
                assert attempts == 1
                # backoff: nothing happens until the clock moves
                clock.skip(0.1)
                assert engine.connection_attempts == attempts
                await hog.close()
                async with asyncio.timeout(30):
                    while fake.active:
                        await fake.client_closed.wait()
                        fake.client_closed.clear()
                clock.skip(1.0)
                stream.end_of_speech()
                events += await collect_until(stream, ends_with_pause)
        assert words(events) == list(VOCABULARY[:3])
        assert fake.refused_full == 1
        assert engine.connection_attempts == 2


async def test_server_idle_close_is_survived() -> None:
    clock = ManualClock()
    async with FakeMoshiServer(idle_close_seconds=0.2) as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("en") as stream:
            for frame in speech([0]):
                stream.push(frame)
            stream.end_of_speech()
            events = await collect_until(stream, ends_with_pause)
            async with asyncio.timeout(30):
                await fake.idle_closed.wait()
            for frame in speech([1]):
                stream.push(frame)
            stream.end_of_speech()
            events += await collect_until(stream, ends_with_pause)
        assert words(events) == ["alpha", "bravo"]
        assert fake.connections == 2


async def test_auth_by_query_parameter_is_accepted_by_the_fake() -> None:
    async with FakeMoshiServer() as fake, connect(fake.url + "?auth_id=test-key") as ws:
        assert b"Ready" in await ws.recv(decode=False)
