"""The pooled remote streams against the fake Kyutai servers, over real
sockets: only speech (and the flush) reaches the server, the pre-roll comes
before the first voiced frame on a warm connection, speakers that share a
connection never get each other's words, and a full server makes speakers
wait without losing a word. Counts, not times: the flush's quiet period runs
on a manual clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from live_transcription.clock import ManualClock
from live_transcription.stt.base import FRAME_SECONDS, Frame, Pause, StreamError, SttEvent, SttStream
from live_transcription.stt.modal import ModalEngine
from live_transcription.stt.moshi import MoshiEngine
from live_transcription.stt.pool import PoolOptions
from live_transcription.stt.remote import RemoteEngine, RemoteOptions, RemoteStream
from tests.fakes import VOCABULARY, silence_frame, speech
from tests.fakes.modal_kyutai import FakeModalKyutai
from tests.fakes.moshi_server import FakeMoshiServer
from tests.fakes.streams import collect_until, count_words, words
from tests.waiting import until, wait_event

HEADERS = {"Modal-Key": "test-key", "Modal-Secret": "test-secret"}
PREROLL_FRAMES = 3  # the audio gate's 240 ms
HANGOVER_FRAMES = 8  # its 600 ms of silence before it calls the speech ended
DEADLINE = 30.0

_ENGINES: list[RemoteEngine] = []


@pytest.fixture(autouse=True)
async def _close_engines() -> AsyncIterator[None]:
    yield
    while _ENGINES:
        await _ENGINES.pop().aclose()


def modal(fake: FakeModalKyutai, clock: ManualClock, pool: PoolOptions) -> ModalEngine:
    engine = ModalEngine(fake.url, HEADERS, clock=clock, options=RemoteOptions(backoff_jitter=0.0), pool=pool)
    _ENGINES.append(engine)
    return engine


def moshi(fake: FakeMoshiServer, clock: ManualClock, pool: PoolOptions) -> MoshiEngine:
    engine = MoshiEngine(
        fake.url, "test-key", clock=clock, options=RemoteOptions(backoff_jitter=0.0), pool=pool
    )
    _ENGINES.append(engine)
    return engine


def utterance(word_ids: list[int]) -> list[Frame]:
    """What the audio gate hands on for one utterance: pre-roll, the words, the hangover."""
    return [silence_frame()] * PREROLL_FRAMES + speech(word_ids, gap=0) + [silence_frame()] * HANGOVER_FRAMES


def audio_seconds(kind: str) -> float:
    value = REGISTRY.get_sample_value("live_transcription_stt_audio_seconds_total", {"kind": kind})
    return value or 0.0


def speakers_waiting() -> float | None:
    return REGISTRY.get_sample_value("live_transcription_stt_speakers_waiting")


def lease_waits(reason: str) -> float:
    value = REGISTRY.get_sample_value("live_transcription_stt_lease_waits_total", {"reason": reason})
    return value or 0.0


def until_pause(events: list[SttEvent]) -> bool:
    return isinstance(events[-1], Pause)


async def modal_utterance_done(clock: ManualClock, stream: SttStream, expected: int) -> list[SttEvent]:
    """Modal's flush ends on a quiet period: once the words are in, move the clock past it."""
    assert isinstance(stream, RemoteStream)
    events = await collect_until(stream, count_words(expected))
    await until(lambda: stream.awaiting_flush, deadline=DEADLINE)  # the padding is out
    clock.skip(RemoteOptions().flush_quiet_seconds)
    return events + await collect_until(stream, until_pause)


@pytest.mark.parametrize("engine_name", ["modal", "moshi"])
async def test_only_speech_and_the_flush_reach_the_server(engine_name: str) -> None:
    """Four utterances of 1.2 s with 1.8 s pauses (the burst pattern): the
    server receives the gate's frames and the flush padding, nothing of the
    pauses, and the padding counts the hangover's quiet frames."""
    clock = ManualClock()
    fake: FakeModalKyutai | FakeMoshiServer = (
        FakeModalKyutai() if engine_name == "modal" else FakeMoshiServer()
    )
    async with fake:
        pool = PoolOptions(headroom=1)
        engine = modal(fake, clock, pool) if isinstance(fake, FakeModalKyutai) else moshi(fake, clock, pool)
        speech_before, flush_before = audio_seconds("speech"), audio_seconds("flush")
        pushed = 0
        received: list[str] = []
        async with engine.open_stream("en") as stream:
            for turn in range(4):
                ids = list(range(turn * 5, turn * 5 + 5))
                frames = utterance(ids)
                for frame in frames:
                    stream.push(frame)
                pushed += len(frames)
                stream.end_of_speech()
                if engine_name == "modal":
                    events = await modal_utterance_done(clock, stream, 5)
                else:  # the server's pause may come first: the marker's return ends the lease
                    events = await collect_until(stream, count_words(5))
                    await until(lambda: engine.pool().leased == 0, deadline=DEADLINE)
                received += words(events)
                clock.skip(1.8)  # the pause: nothing is streamed
        assert received == [VOCABULARY[i] for i in range(20)]
        pool_state = engine.pool()
        # Modal: >= 1 s of quiet after the speech (13 frames), 8 of them the hangover;
        # moshi: delay + 1 quiet frames (the hangover has them), a Marker, delay + 1 more
        flush_per_utterance = 13 - HANGOVER_FRAMES if engine_name == "modal" else 0 + 7
        expected = pushed + 4 * flush_per_utterance + pool_state.keepalives
        await until(lambda: fake.frames_received >= expected, deadline=DEADLINE)  # all sent; in flight
        assert fake.frames_received == expected
        assert pool_state.keepalives <= 1  # 4 x 3 s of meeting: at most one keep-alive frame
        assert audio_seconds("speech") - speech_before == pytest.approx(pushed * FRAME_SECONDS)
        assert audio_seconds("flush") - flush_before == pytest.approx(4 * flush_per_utterance * FRAME_SECONDS)
        # STT audio as a share of the meeting's real time (before the pool: 1.03)
        share = fake.frames_received * FRAME_SECONDS / (4 * 3.0)
        assert share < 0.9


async def test_preroll_reaches_a_warm_connection_before_the_first_voiced_frame() -> None:
    clock = ManualClock()
    async with FakeMoshiServer() as fake:
        engine = moshi(fake, clock, PoolOptions(headroom=1))
        cold_before = lease_waits("cold")
        async with engine.open_stream("en") as stream:
            pool = engine.pool()
            await until(lambda: pool.idle == 1, deadline=DEADLINE)  # warm before anyone talks
            handshakes = fake.handshakes
            assert handshakes == 1
            for frame in utterance([4, 5]):
                stream.push(frame)
            stream.end_of_speech()
            events = await collect_until(stream, until_pause)
        assert words(events) == ["echo", "foxtrot"]
        assert lease_waits("cold") == cold_before  # leased at once: no handshake on the caption path
        codes = fake.frames_by_connection[1]
        first_voiced = next(i for i, code in enumerate(codes) if code > 0)
        # the whole pre-roll, then the first syllable: nothing lost before it
        assert codes[first_voiced - PREROLL_FRAMES : first_voiced] == [0] * PREROLL_FRAMES
        assert codes[first_voiced : first_voiced + 3] == [5, 5, 5]
        assert codes.count(5) == 3 and codes.count(6) == 3


async def test_speakers_alternating_on_one_connection_get_only_their_own_words() -> None:
    """One connection for two speakers: the second waits for the first one's
    flush (a capacity wait), then gets the connection; each word is tagged by
    its speaker (ids 0-9 for one, 10-19 for the other)."""
    clock = ManualClock()
    async with FakeMoshiServer() as fake:
        engine = moshi(fake, clock, PoolOptions(headroom=0, max_connections=1))
        capacity_before = lease_waits("capacity")
        heard: dict[str, list[str]] = {"a": [], "b": []}

        async def talk(name: str, stream: SttStream, turns: list[list[int]], go: list[asyncio.Event]) -> None:
            for ids, event in zip(turns, go, strict=True):
                await event.wait()
                for frame in utterance(ids):
                    stream.push(frame)
                stream.end_of_speech()
                heard[name] += words(await collect_until(stream, until_pause))

        a_turns, b_turns = [[0, 1, 2], [3, 4]], [[10, 11, 12], [13, 14]]
        a_go = [asyncio.Event(), asyncio.Event()]
        b_go = [asyncio.Event(), asyncio.Event()]
        async with (
            engine.open_stream("en") as a,
            engine.open_stream("en") as b,
            asyncio.TaskGroup() as group,
        ):
            group.create_task(talk("a", a, a_turns, a_go))
            group.create_task(talk("b", b, b_turns, b_go))
            a_go[0].set()
            await until(lambda: engine.pool().leased == 1, deadline=DEADLINE)
            b_go[0].set()  # b starts talking while a holds the only connection
            await until(lambda: len(heard["a"]) == 3, deadline=DEADLINE)
            a_go[1].set()  # and a again while b may hold it
            await until(lambda: len(heard["b"]) == 3, deadline=DEADLINE)
            b_go[1].set()
            await until(lambda: len(heard["a"]) == 5 and len(heard["b"]) == 5, deadline=DEADLINE)
        assert heard["a"] == [VOCABULARY[i] for i in (0, 1, 2, 3, 4)]
        assert heard["b"] == [VOCABULARY[i] for i in (10, 11, 12, 13, 14)]
        assert fake.connections == 1
        # all of it on the one connection, each speaker's words in order
        on_the_wire = fake.words_by_connection[1]
        assert len(on_the_wire) == 10
        assert [w for w in on_the_wire if w in heard["a"]] == heard["a"]
        assert [w for w in on_the_wire if w in heard["b"]] == heard["b"]
        assert lease_waits("capacity") > capacity_before
        assert engine.pool().unattributed == 0


async def test_a_full_server_makes_the_speaker_wait_and_its_words_come_late() -> None:
    """Modal answers HTTP 429 while its one session is taken: the second
    speaker's audio waits (buffered) until the first one's flush frees it."""
    clock = ManualClock()
    async with FakeModalKyutai(max_sessions=1) as fake:
        engine = modal(fake, clock, PoolOptions(headroom=0, max_connections=2))
        capacity_before = lease_waits("capacity")
        async with engine.open_stream("en") as a, engine.open_stream("en") as b:
            for frame in utterance([0, 1]):
                a.push(frame)
            a_events = await collect_until(a, count_words(1))
            pool = engine.pool()
            assert pool.leased == 1
            for frame in utterance([10, 11, 12]):
                b.push(frame)
            b.end_of_speech()
            b_events = await collect_until(
                b, lambda e: isinstance(e[-1], StreamError) and e[-1].reason == "capacity"
            )
            assert fake.refused_full >= 1 and pool.capacity_refusals >= 1
            assert speakers_waiting() == 1  # visible while it lasts, not only once it ends
            a.end_of_speech()
            a_events += await modal_utterance_done(clock, a, 1)
            # the freed connection goes to b; its buffered speech is sent whole
            b_events += await modal_utterance_done(clock, b, 3)
        assert words(a_events) == ["alpha", "bravo"]
        assert words(b_events) == ["kilo", "lima", "mike"]
        assert b.frames_dropped == 0
        assert fake.connections == 1
        assert lease_waits("capacity") > capacity_before
        assert speakers_waiting() == 0


async def test_a_connection_dropped_mid_lease_loses_no_word_and_the_next_speaker_gets_a_new_one() -> None:
    clock = ManualClock()
    ids_a, ids_b = list(range(8)), [10, 11, 12]
    async with FakeMoshiServer(drop_after_frames=20) as fake:
        engine = moshi(fake, clock, PoolOptions(headroom=0, max_connections=1))
        async with engine.open_stream("en") as a, engine.open_stream("en") as b:
            for frame in utterance(ids_a):
                a.push(frame)
            a.end_of_speech()
            for frame in utterance(ids_b):
                b.push(frame)
            b.end_of_speech()
            a_events = await collect_until(a, until_pause)
            b_events = await collect_until(b, until_pause)
        assert words(a_events) == [VOCABULARY[i] for i in ids_a]
        assert words(b_events) == [VOCABULARY[i] for i in ids_b]
        assert fake.drops == 1
        assert a.reconnects == 1  # type: ignore[attr-defined]
        assert any(isinstance(e, StreamError) and e.reason == "connection" for e in a_events)
        # b never saw a's replay: its words came on a connection a had flushed
        assert all(w in {VOCABULARY[i] for i in ids_b} for w in words(b_events))


async def test_speech_resumed_while_the_flush_is_out_keeps_the_connection_until_it_is_flushed() -> None:
    """The speaker talks again after its flush went out: that audio's words
    are still in the model when the first flush completes, so the connection
    must not go to the waiting speaker before a second flush."""
    clock = ManualClock()
    quiet = RemoteOptions().flush_quiet_seconds
    async with FakeModalKyutai() as fake:
        engine = modal(fake, clock, PoolOptions(headroom=0, max_connections=1))
        async with engine.open_stream("en") as a, engine.open_stream("en") as b:
            assert isinstance(a, RemoteStream)
            for frame in utterance([0, 1]):
                a.push(frame)
            a.end_of_speech()
            a_events = await collect_until(a, count_words(2))
            await until(lambda: a.awaiting_flush, deadline=DEADLINE)
            for frame in speech([2, 3]):  # no hangover: the model still holds "delta"
                a.push(frame)
            a.end_of_speech()
            for frame in utterance([10, 11]):
                b.push(frame)
            b.end_of_speech()
            await until(lambda: fake.frames_received >= 17 + 5 + 8, deadline=DEADLINE)
            clock.skip(quiet)  # the first flush completes; a's new audio is not flushed yet
            a_events += await collect_until(a, count_words(2))
            await until(lambda: a.awaiting_flush, deadline=DEADLINE)
            clock.skip(quiet)
            a_events += await collect_until(a, until_pause)
            b_events = await modal_utterance_done(clock, b, 2)
        assert words(a_events) == ["alpha", "bravo", "charlie", "delta"]
        assert words(b_events) == ["kilo", "lima"]
        assert fake.connections == 1


async def test_idle_connections_get_one_silent_frame_per_keepalive_period_and_no_more() -> None:
    clock = ManualClock()
    async with FakeMoshiServer() as fake:
        engine = moshi(fake, clock, PoolOptions(headroom=2, keepalive_seconds=10.0))
        keepalive_before = audio_seconds("keepalive")
        async with engine.open_stream("en"):
            pool = engine.pool()
            await until(lambda: pool.idle == 2, deadline=DEADLINE)
            clock.skip(9.0)
            await asyncio.sleep(0)
            assert pool.keepalives == 0
            for period in range(1, 4):
                clock.skip(10.0)
                await until(lambda p=period: fake.frames_received == 2 * p, deadline=DEADLINE)  # type: ignore[misc]
            assert pool.keepalives == 6
            assert fake.idle_closes == 0
        assert audio_seconds("keepalive") - keepalive_before == pytest.approx(6 * FRAME_SECONDS)
        assert fake.frames_by_connection == {1: [0, 0, 0], 2: [0, 0, 0]}


async def test_the_first_onset_without_headroom_waits_for_a_cold_connection_and_surplus_closes() -> None:
    clock = ManualClock()
    async with FakeModalKyutai() as fake:
        engine = modal(fake, clock, PoolOptions(headroom=0, surplus_seconds=30.0))
        cold_before = lease_waits("cold")
        async with engine.open_stream("en") as stream:
            for frame in utterance([0]):
                stream.push(frame)
            stream.end_of_speech()
            events = await modal_utterance_done(clock, stream, 1)
            assert words(events) == ["alpha"]
            assert lease_waits("cold") == cold_before + 1
            pool = engine.pool()
            assert pool.idle == 1  # given back after the flush
            clock.skip(30.0)
            await until(lambda: fake.client_closes == 1, deadline=DEADLINE)
            assert pool.idle == 0 and pool.surplus_closed == 1


async def test_a_cold_start_is_absorbed_by_the_headroom() -> None:
    """The replacement for the leased connection takes a cold start (its
    handshake is held); the speaker, on the warm one, does not wait for it."""
    clock = ManualClock()
    async with FakeModalKyutai() as fake:
        engine = modal(fake, clock, PoolOptions(headroom=1))
        cold_before = lease_waits("cold")
        async with engine.open_stream("en") as stream:
            pool = engine.pool()
            await until(lambda: pool.idle == 1, deadline=DEADLINE)
            fake.handshake_gate = asyncio.Event()  # from now on the server is scaling up
            fake.handshake_started.clear()
            for frame in utterance([6, 7]):
                stream.push(frame)
            stream.end_of_speech()
            await wait_event(fake.handshake_started, DEADLINE)  # the headroom is being replaced
            events = await modal_utterance_done(clock, stream, 2)
            assert pool.opening == 1  # still cold
            fake.handshake_gate.set()
        assert words(events) == ["golf", "hotel"]
        assert lease_waits("cold") == cold_before
        assert fake.frames_by_connection[1][PREROLL_FRAMES] == 7


async def test_the_pool_runs_inside_running_and_closes_its_connections_when_it_ends() -> None:
    async with FakeMoshiServer() as fake:
        engine = MoshiEngine(fake.url, "test-key", clock=ManualClock(), pool=PoolOptions(headroom=1))
        tasks_before = set(asyncio.all_tasks())
        async with engine.running():
            async with engine.open_stream("en") as stream:
                await until(lambda: engine.pool().idle == 1, deadline=DEADLINE)
                for frame in utterance([2]):
                    stream.push(frame)
                stream.end_of_speech()
                events = await collect_until(stream, until_pause)
            assert words(events) == ["charlie"]
            assert engine.pool().idle >= 1
        await until(lambda: fake.active == 0, deadline=DEADLINE)
        assert set(asyncio.all_tasks()) <= tasks_before
        await engine.aclose()
