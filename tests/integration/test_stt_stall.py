"""A pooled STT connection that stops answering (open, reading audio, sending
nothing back) against the fake Modal server, over real sockets, on a manual
clock: the stream leaves it while the speaker is still talking, replays its
unacknowledged audio on a new connection and loses no word; the idle
connections that went silent with it are not leased next."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from live_transcription.clock import ManualClock
from live_transcription.stt.base import FRAME_SAMPLES, Frame, Pause, StreamError, SttEvent
from live_transcription.stt.modal import ModalEngine, ModalProtocol
from live_transcription.stt.moshi import MoshiEngine
from live_transcription.stt.pool import PoolOptions
from live_transcription.stt.remote import RemoteOptions, RemoteStream
from tests.fakes import VOCABULARY, silence_frame, speech
from tests.fakes.modal_kyutai import FakeModalKyutai
from tests.fakes.moshi_server import FakeMoshiServer
from tests.fakes.streams import collect_until, count_words, words
from tests.waiting import until

HEADERS = {"Modal-Key": "test-key", "Modal-Secret": "test-secret"}
DEADLINE = 30.0
OPTIONS = RemoteOptions(backoff_jitter=0.0)
BOUND = OPTIONS.stall_seconds + ModalProtocol.delay_frames * 0.08
"""No answer for this long to audio sent: the connection is given up."""

_ENGINES: list[ModalEngine | MoshiEngine] = []


@pytest.fixture(autouse=True)
async def _close_engines() -> AsyncIterator[None]:
    yield
    while _ENGINES:
        await _ENGINES.pop().aclose()


def modal(fake: FakeModalKyutai, clock: ManualClock, pool: PoolOptions) -> ModalEngine:
    engine = ModalEngine(fake.url, HEADERS, clock=clock, options=OPTIONS, pool=pool)
    _ENGINES.append(engine)
    return engine


def stalls(events: list[SttEvent]) -> int:
    return sum(1 for e in events if isinstance(e, StreamError) and e.reason == "stalled")


def noise(frames: int) -> list[Frame]:
    """Voiced audio without any word in it (a laugh, a cough)."""
    rng = np.random.default_rng(7)
    return [(0.1 * rng.standard_normal(FRAME_SAMPLES)).astype(np.float32) for _ in range(frames)]


async def test_a_connection_that_stops_answering_is_left_without_waiting_for_a_pause() -> None:
    """The speaker talks on, never pausing: once the audio has had no answer
    for the bound, the stream replays it on a new connection and the words
    come, each once, while the speaker is still talking."""
    clock = ManualClock()
    ids = list(range(10))
    frames = speech(ids)  # 40 frames: the words of 0-7 are due within them
    async with FakeModalKyutai(silent_connections=frozenset({1})) as fake:
        engine = modal(fake, clock, PoolOptions(headroom=0))
        async with engine.open_stream("en") as stream:
            assert isinstance(stream, RemoteStream)
            for frame in frames:
                stream.push(frame)
            await until(lambda: fake.frames_received >= len(frames), deadline=DEADLINE)
            assert stream.stalls == 0 and fake.connections == 1
            clock.skip(BOUND)
            events = await collect_until(stream, count_words(8))  # no end_of_speech
            assert words(events) == [VOCABULARY[i] for i in range(8)]
            assert stalls(events) == 1 and stream.stalls == 1
            assert fake.connections == 2 and fake.words_by_connection.get(1) is None
            await until(lambda: len(fake.frames_by_connection[2]) >= len(frames), deadline=DEADLINE)
            assert fake.frames_by_connection[2] == fake.frames_by_connection[1]  # the same audio again
            stream.end_of_speech()  # the last two words come with the flush
            events += await collect_until(stream, count_words(2))
            await until(lambda: stream.awaiting_flush, deadline=DEADLINE)
            clock.skip(OPTIONS.flush_quiet_seconds)
            events += await collect_until(stream, lambda e: isinstance(e[-1], Pause))
        assert words(events) == [VOCABULARY[i] for i in ids]
        assert engine.pool().stalled == 1


async def test_a_short_utterance_on_a_silent_connection_is_not_lost_at_its_flush() -> None:
    """Modal answers nothing to audio without words, so a quiet flush with no
    answer to the voiced audio is not trusted: the utterance is replayed on
    a new connection and its words arrive."""
    clock = ManualClock()
    ids = [0, 1, 2, 3, 4]  # 15 voiced frames: more than stall_voiced_seconds
    async with FakeModalKyutai(silent_connections=frozenset({1})) as fake:
        engine = modal(fake, clock, PoolOptions(headroom=0))
        async with engine.open_stream("en") as stream:
            assert isinstance(stream, RemoteStream)
            for frame in [*speech(ids), *[silence_frame()] * 8]:
                stream.push(frame)
            stream.end_of_speech()
            await until(lambda: stream.awaiting_flush, deadline=DEADLINE)
            clock.skip(OPTIONS.flush_quiet_seconds)
            events = await collect_until(stream, count_words(len(ids)))
            await until(lambda: stream.awaiting_flush, deadline=DEADLINE)
            clock.skip(OPTIONS.flush_quiet_seconds)
            events += await collect_until(stream, lambda e: isinstance(e[-1], Pause))
        assert words(events) == [VOCABULARY[i] for i in ids]
        assert stalls(events) == 1 and fake.connections == 2


async def test_voiced_audio_without_words_costs_one_replay_and_no_more() -> None:
    """A healthy server, a laugh: the first flush is not trusted, the replay
    on a new connection is silent too, and that one is taken as no words."""
    clock = ManualClock()
    async with FakeModalKyutai() as fake:
        engine = modal(fake, clock, PoolOptions(headroom=0))
        async with engine.open_stream("en") as stream:
            assert isinstance(stream, RemoteStream)
            for frame in [*noise(20), *[silence_frame()] * 8]:
                stream.push(frame)
            stream.end_of_speech()
            await until(lambda: stream.awaiting_flush, deadline=DEADLINE)
            clock.skip(OPTIONS.flush_quiet_seconds)
            await until(lambda: stream.stalls == 1 and stream.awaiting_flush, deadline=DEADLINE)
            clock.skip(OPTIONS.flush_quiet_seconds)
            events = await collect_until(stream, lambda e: isinstance(e[-1], Pause))
        assert words(events) == []
        assert stalls(events) == 1 and fake.connections == 2


async def test_idle_connections_silent_since_the_stall_are_closed_and_a_new_one_is_leased() -> None:
    """The engine hangs: the leased and the idle connection stop answering.
    The stream does not move to the idle one (it would stall again): the pool
    closes it and the replay goes to a connection opened after."""
    clock = ManualClock()
    async with FakeModalKyutai() as fake:
        engine = modal(fake, clock, PoolOptions(headroom=1))
        async with engine.open_stream("en") as stream:
            assert isinstance(stream, RemoteStream)
            pool = engine.pool()
            for frame in speech([0, 1, 2]):
                stream.push(frame)
            events = await collect_until(stream, count_words(1))
            await until(lambda: pool.idle == 1 and pool.leased == 1, deadline=DEADLINE)
            assert fake.silence_open_connections() == 2
            clock.skip(1.0)
            for frame in speech([3, 4, 5, 6, 7]):
                stream.push(frame)
            await until(lambda: fake.frames_received >= 32, deadline=DEADLINE)
            clock.skip(BOUND)
            # the replay (32 frames) brings 0-5 again; the deduper drops "alpha"
            events += await collect_until(stream, count_words(5))
            assert words(events) == [VOCABULARY[i] for i in range(6)]
            assert pool.stalled == 1 and pool.stale_closed == 1
            # the replay went to a connection opened after the stall, not to the idle one
            assert 2 not in fake.words_by_connection and max(fake.words_by_connection) >= 3
            stream.end_of_speech()  # the last two words come with the flush
            events += await collect_until(stream, count_words(2))
            await until(lambda: stream.awaiting_flush, deadline=DEADLINE)
            clock.skip(OPTIONS.flush_quiet_seconds)
            events += await collect_until(stream, lambda e: isinstance(e[-1], Pause))
        assert words(events) == [VOCABULARY[i] for i in range(8)]
        assert stalls(events) == 1


async def test_stalls_of_one_episode_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    async with FakeModalKyutai(silent_connections=frozenset({1, 2})) as fake:
        engine = modal(fake, clock, PoolOptions(headroom=0))
        async with engine.open_stream("en") as a, engine.open_stream("en") as b:
            assert isinstance(a, RemoteStream) and isinstance(b, RemoteStream)
            for frame in speech([0, 1, 2, 3]):
                a.push(frame)
                b.push(frame)
            await until(lambda: fake.frames_received >= 32, deadline=DEADLINE)
            clock.skip(BOUND)
            a_events = await collect_until(a, count_words(2))
            b_events = await collect_until(b, count_words(2))
            for stream, events in ((a, a_events), (b, b_events)):
                stream.end_of_speech()
                events.extend(await collect_until(stream, count_words(2)))
            await until(lambda: a.awaiting_flush and b.awaiting_flush, deadline=DEADLINE)
            clock.skip(OPTIONS.flush_quiet_seconds)
            a_events += await collect_until(a, lambda e: isinstance(e[-1], Pause))
            b_events += await collect_until(b, lambda e: isinstance(e[-1], Pause))
        assert words(a_events) == words(b_events) == [VOCABULARY[i] for i in range(4)]
        assert engine.pool().stalled == 2
        warnings = [r for r in caplog.records if "stopped answering" in r.getMessage()]
        assert len(warnings) == 1


async def test_moshi_a_connection_without_steps_is_left_and_the_replay_loses_no_word() -> None:
    """moshi-server answers every frame with a step: a connection that sends
    nothing at all is stalled, and the words replayed on the new connection
    (exact start times) are each delivered once."""
    clock = ManualClock()
    ids = list(range(8))
    async with FakeMoshiServer(silent_connections=frozenset({1})) as fake:
        engine = MoshiEngine(fake.url, "test-key", clock=clock, options=OPTIONS, pool=PoolOptions(headroom=0))
        _ENGINES.append(engine)
        async with engine.open_stream("en") as stream:
            assert isinstance(stream, RemoteStream)
            for frame in speech(ids):
                stream.push(frame)
            await until(lambda: fake.frames_received >= 32, deadline=DEADLINE)
            clock.skip(BOUND)
            events = await collect_until(stream, count_words(6))  # before any pause
            assert stream.stalls == 1
            stream.end_of_speech()  # the marker's return ends the flush
            events += await collect_until(stream, lambda e: isinstance(e[-1], Pause))
        assert words(events) == [VOCABULARY[i] for i in ids]
        assert stalls(events) == 1 and fake.connections == 2
