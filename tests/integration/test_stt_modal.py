"""The Modal engine against the Modal-Kyutai fake, over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from live_transcription.clock import ManualClock
from live_transcription.stt.base import Pause, StreamError, SttEvent, SttStream, Word
from live_transcription.stt.modal import ModalEngine
from live_transcription.stt.pool import PoolOptions
from live_transcription.stt.remote import RemoteOptions
from tests.fakes import VOCABULARY, speech
from tests.fakes.modal_kyutai import FakeModalKyutai
from tests.fakes.streams import advance_until_pause as advance_to_pause
from tests.fakes.streams import collect_until, count_words, never, words

HEADERS = {"Modal-Key": "test-key", "Modal-Secret": "test-secret"}


_ENGINES: list[ModalEngine] = []


@pytest.fixture(autouse=True)
async def _close_engines() -> AsyncIterator[None]:
    yield
    while _ENGINES:
        await _ENGINES.pop().aclose()


def engine_for(
    fake: FakeModalKyutai,
    clock: ManualClock,
    headers: dict[str, str] | None = None,
    pool: PoolOptions | None = None,
    **options: float,
) -> ModalEngine:
    """No headroom unless asked: connections open when speech needs them."""
    engine = ModalEngine(
        fake.url,
        HEADERS if headers is None else headers,
        clock=clock,
        options=RemoteOptions(backoff_jitter=0.0, **options),  # type: ignore[arg-type]
        pool=pool or PoolOptions(headroom=0),
    )
    _ENGINES.append(engine)
    return engine


async def advance_until_pause(clock: ManualClock, stream: SttStream, events: list[SttEvent]) -> None:
    await advance_to_pause(clock, stream, events, RemoteOptions().flush_quiet_seconds)


async def test_words_come_back_in_order_and_flush_delivers_the_last_ones() -> None:
    clock = ManualClock()
    async with FakeModalKyutai() as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("en") as stream:
            for frame in speech(range(5)):
                stream.push(frame)
            # the last word is still inside the model delay: only the flush frees it
            events = await collect_until(stream, count_words(3))
            assert words(events) == list(VOCABULARY[:3])
            stream.end_of_speech()
            events += await collect_until(stream, count_words(2))
            await advance_until_pause(clock, stream, events)
        assert words(events) == list(VOCABULARY[:5])
        assert isinstance(events[-1], Pause)
        assert fake.connections == 1


async def test_word_audio_end_is_stream_time() -> None:
    clock = ManualClock()
    async with FakeModalKyutai() as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("en") as stream:
            for frame in speech([0]):
                stream.push(frame)
            stream.end_of_speech()
            events = await collect_until(stream, count_words(1))
            await advance_until_pause(clock, stream, events)
        word = events[0]
        assert isinstance(word, Word)
        # the word's audio ended after 3 frames; the padding is not stream time
        assert word.audio_end is not None
        assert 0.2 <= word.audio_end <= 0.33


async def test_legacy_server_pieces_are_joined() -> None:
    clock = ManualClock()
    async with FakeModalKyutai(legacy=True, ping_every_frames=2) as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("en") as stream:
            for frame in speech([2, 3]):
                stream.push(frame)
            stream.end_of_speech()
            events = await collect_until(stream, count_words(4))
            await advance_until_pause(clock, stream, events)
        pieces = [e for e in events if isinstance(e, Word)]
        assert [p.joins_previous for p in pieces] == [False, True, False, True]
        assert "".join(p.text if p.joins_previous else " " + p.text for p in pieces).strip() == (
            "charlie delta"
        )


async def test_reconnect_mid_utterance_loses_and_duplicates_nothing() -> None:
    clock = ManualClock()
    ids = list(range(12))
    async with FakeModalKyutai(drop_after_frames=22) as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("en") as stream:
            for frame in speech(ids):
                stream.push(frame)
            stream.end_of_speech()
            events = await collect_until(stream, count_words(len(ids)))
            await advance_until_pause(clock, stream, events)
        delivered = words(events)
        assert delivered == [VOCABULARY[i] for i in ids]
        assert fake.drops == 1
        assert fake.connections == 2
        assert stream.duplicates_dropped > 0  # type: ignore[attr-defined]
        assert any(isinstance(e, StreamError) and e.reason == "connection" for e in events)


async def test_bad_credentials_are_fatal_without_retry_loop() -> None:
    clock = ManualClock()
    async with FakeModalKyutai() as fake:
        engine = engine_for(fake, clock, headers={"Modal-Key": "wrong", "Modal-Secret": "x"})
        async with engine.open_stream("en") as stream:
            for frame in speech([0, 1]):
                stream.push(frame)
            events = await collect_until(stream, never)
        assert [(e.reason, e.fatal) for e in events if isinstance(e, StreamError)] == [("auth", True)]
        assert fake.handshakes == 1
        # a speaker that reopens at once is refused without touching the server
        for _ in range(5):
            clock.skip(1.0)
            async with engine.open_stream("en") as again:
                again.push(speech([0])[0])
                events = await collect_until(again, never)
            assert isinstance(events[0], StreamError) and events[0].reason == "auth"
        assert fake.handshakes == 1
        # after the cool-off the engine tries once more
        clock.skip(60.0)
        async with engine.open_stream("en") as later:
            later.push(speech([0])[0])
            await collect_until(later, never)
        assert fake.handshakes == 2


async def test_cold_start_buffers_audio_and_loses_nothing() -> None:
    clock = ManualClock()
    gate = asyncio.Event()
    async with FakeModalKyutai(handshake_gate=gate) as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("en") as stream:
            for frame in speech(range(3)):
                stream.push(frame)
            async with asyncio.timeout(30):
                await fake.handshake_started.wait()
            for frame in speech(range(3, 6)):
                stream.push(frame)
            clock.skip(30.0)  # the slow-handshake warning fires; nothing else happens
            gate.set()
            stream.end_of_speech()
            events = await collect_until(stream, count_words(6))
            await advance_until_pause(clock, stream, events)
        assert words(events) == list(VOCABULARY[:6])
        assert stream.frames_dropped == 0
        assert fake.handshakes == 1


async def test_idle_server_close_then_next_speech_reconnects() -> None:
    clock = ManualClock()
    async with FakeModalKyutai(idle_close_seconds=0.2) as fake:
        engine = engine_for(fake, clock)
        async with engine.open_stream("en") as stream:
            for frame in speech([0]):
                stream.push(frame)
            stream.end_of_speech()
            events = await collect_until(stream, count_words(1))
            await advance_until_pause(clock, stream, events)
            async with asyncio.timeout(30):
                await fake.idle_closed.wait()
            for frame in speech([1]):
                stream.push(frame)
            stream.end_of_speech()
            events += await collect_until(stream, count_words(1))
            await advance_until_pause(clock, stream, events)
        assert words(events) == ["alpha", "bravo"]
        assert fake.connections == 2


async def test_stream_closes_its_idle_socket_itself() -> None:
    clock = ManualClock()
    async with FakeModalKyutai() as fake:
        engine = engine_for(fake, clock, pool=PoolOptions(headroom=0, surplus_seconds=5.0))
        async with engine.open_stream("en") as stream:
            for frame in speech([0]):
                stream.push(frame)
            stream.end_of_speech()
            events = await collect_until(stream, count_words(1))
            await advance_until_pause(clock, stream, events)
            clock.skip(10.0)
            async with asyncio.timeout(30):
                await fake.client_closed.wait()
            for frame in speech([1]):
                stream.push(frame)
            stream.end_of_speech()
            events += await collect_until(stream, count_words(1))
            await advance_until_pause(clock, stream, events)
        assert words(events) == ["alpha", "bravo"]
        assert fake.connections == 2
        assert fake.idle_closes == 0


async def test_leaving_the_block_flushes() -> None:
    clock = ManualClock()
    async with FakeModalKyutai() as fake:
        engine = engine_for(fake, clock)
        events: list[SttEvent] = []

        async def consume(stream: SttStream) -> None:
            async for event in stream.events():
                events.append(event)
                if len(words(events)) == 3:
                    clock.skip(RemoteOptions().flush_quiet_seconds)

        async with asyncio.TaskGroup() as group, engine.open_stream("en") as stream:
            group.create_task(consume(stream))
            for frame in speech(range(3)):
                stream.push(frame)
        assert words(events) == list(VOCABULARY[:3])
        assert isinstance(events[-1], Pause)


async def test_unsupported_language_is_fatal() -> None:
    engine = ModalEngine("ws://127.0.0.1:9/v1/stream", HEADERS, clock=ManualClock())
    _ENGINES.append(engine)
    async with engine.open_stream("xx") as stream:
        events = await collect_until(stream, never)
    assert isinstance(events[0], StreamError) and events[0].reason == "language"
    assert engine.connection_attempts == 0


async def test_unreachable_server_is_retried_with_exponential_backoff() -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = ManualClock()
    engine = ModalEngine(
        f"ws://127.0.0.1:{port}/v1/stream",
        HEADERS,
        clock=clock,
        options=RemoteOptions(backoff_jitter=0.0, close_grace_seconds=0.0),
        pool=PoolOptions(headroom=0),
    )
    _ENGINES.append(engine)
    failures: list[StreamError] = []
    async with engine.open_stream("en") as stream:
        stream.push(speech([0])[0])
        for expected_delay in (0.5, 1.0, 2.0, 4.0):
            events = await collect_until(stream, lambda e: isinstance(e[-1], StreamError))
            failures += [e for e in events if isinstance(e, StreamError)]
            attempts = engine.connection_attempts
            clock.skip(expected_delay * 0.9)
            assert engine.connection_attempts == attempts  # not yet
            clock.skip(expected_delay * 0.2)
        events = await collect_until(stream, lambda e: isinstance(e[-1], StreamError))
        failures += [e for e in events if isinstance(e, StreamError)]
    assert engine.connection_attempts == 5
    assert [f.reason for f in failures] == ["connection"] * 5
    assert not any(f.fatal for f in failures)
