"""The embedded engine: streaming over Whisper with real speech, and its
bounds (ring, one decode per stream, fixed worker pool) with a scripted model.

The scripted model reads words out of the audio itself: every 0.5 s block of
constant amplitude ``k / 1000`` is the word ``w<k>``, so any window, cut or
coalesced pass decodes to the same words at the same times as real speech
would, and tests can check that each word arrives exactly once, in order.
"""

from __future__ import annotations

import asyncio
import threading
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import soxr

from live_transcription.config import load_settings
from live_transcription.stt.base import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    SAMPLE_RATE,
    Frame,
    Pause,
    StreamError,
    SttEvent,
    SttStream,
    Word,
)
from live_transcription.stt.embedded import (
    WHISPER_RATE,
    Audio,
    EmbeddedEngine,
    EmbeddedOptions,
    EmbeddedStream,
    TimedWord,
    Transcriber,
)
from tests.waiting import until

FIXTURES = Path(__file__).parents[1] / "fixtures" / "speech"
DEADLINE = 30.0
BLOCK_SECONDS = 0.5


# --- helpers -----------------------------------------------------------------------
def speech_frames(name: str) -> list[Frame]:
    """A fixture WAV as the service pushes it: 24 kHz float32, 1920-sample frames."""
    with wave.open(str(FIXTURES / name)) as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
        rate = wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, SAMPLE_RATE).astype(np.float32)
    padded = np.concatenate([audio, np.zeros(-len(audio) % FRAME_SAMPLES, dtype=np.float32)])
    return list(padded.reshape(-1, FRAME_SAMPLES))


def word_frames(first: int, count: int) -> list[Frame]:
    """Audio the scripted model reads as ``w<first> .. w<first+count-1>``."""
    per_block = round(BLOCK_SECONDS * SAMPLE_RATE)
    audio = np.concatenate(
        [np.full(per_block, k / 1000, dtype=np.float32) for k in range(first, first + count)]
    )
    audio = np.concatenate([audio, np.zeros(-len(audio) % FRAME_SAMPLES, dtype=np.float32)])
    return list(audio.reshape(-1, FRAME_SAMPLES))


class ScriptedModel(Transcriber):
    """Decodes the block amplitudes; records calls and concurrency. ``gate``
    holds the first call until the test opens it (threading: it blocks a pool
    thread, which is the point)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, fail_first: bool = False) -> None:
        self._loop = loop
        self.gate: threading.Event | None = None
        self.started = asyncio.Event()
        self.fail_first = fail_first
        self.calls: list[float] = []
        self.prompts: list[str | None] = []
        self.finals: list[bool] = []
        self._running: list[int] = []
        self.max_in_flight = 0

    def transcribe(self, audio: Audio, language: str, prompt: str | None, final: bool) -> list[TimedWord]:
        self._running.append(1)  # list ops are atomic under the GIL
        self.max_in_flight = max(self.max_in_flight, len(self._running))
        try:
            self.calls.append(len(audio) / WHISPER_RATE)
            self.prompts.append(prompt)
            self.finals.append(final)
            self._loop.call_soon_threadsafe(self.started.set)
            gate = self.gate
            if gate is not None and len(self.calls) == 1:
                assert gate.wait(DEADLINE)
            if self.fail_first and len(self.calls) == 1:
                raise RuntimeError("scripted decode failure")
            return self._words(audio)
        finally:
            self._running.pop()

    @staticmethod
    def _words(audio: Audio) -> list[TimedWord]:
        block = round(BLOCK_SECONDS * WHISPER_RATE)
        words = []
        for index in range(0, len(audio) // (block // 2)):
            start = index * block
            piece = audio[start + block // 8 : start + block - block // 8]
            if len(piece) < block // 4:
                break
            value = round(float(np.median(piece)) * 1000)
            if value > 0:
                words.append(TimedWord(f" w{value}", start / WHISPER_RATE, (start + block) / WHISPER_RATE))
        return words


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[EmbeddedEngine, ScriptedModel]]:
    model = ScriptedModel(asyncio.get_running_loop())
    engine = EmbeddedEngine(workers=2, loader=lambda: model)
    try:
        yield engine, model
    finally:
        if model.gate is not None:
            model.gate.set()
        await engine.aclose()


@pytest.fixture(scope="module")
def whisper() -> Iterator[EmbeddedEngine]:
    """The real bundled model, loaded once for this module."""
    engine = EmbeddedEngine(threads=1, workers=2)
    yield engine
    asyncio.run(engine.aclose())


async def read_until_pauses(stream: SttStream, pauses: int) -> list[SttEvent]:
    events: list[SttEvent] = []
    async with asyncio.timeout(DEADLINE):
        async for event in stream.events():
            events.append(event)
            if sum(isinstance(e, Pause) for e in events) >= pauses:
                break
    return events


async def read_all(stream: SttStream) -> list[SttEvent]:
    async with asyncio.timeout(DEADLINE):
        return [event async for event in stream.events()]


def texts(events: list[SttEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, Word)]


def spoken(events: list[SttEvent]) -> str:
    return " ".join(texts(events)).casefold()


# --- real speech ---------------------------------------------------------------------
async def test_paced_speech_streams_agreed_words_once_then_pauses(whisper: EmbeddedEngine) -> None:
    """Pushed about one step at a time, words arrive before the end of speech
    (two passes agreed) and none is repeated; two utterances, two pauses."""
    frames_per_step = 13  # just over decode_step_seconds
    events: list[SttEvent] = []
    words_before_end: list[int] = []

    async def consume(stream: SttStream) -> None:
        async for event in stream.events():
            events.append(event)

    async with whisper.open_stream("en") as stream, asyncio.TaskGroup() as group:
        assert isinstance(stream, EmbeddedStream)
        group.create_task(consume(stream))
        for name in ("speech_1.wav", "speech_2.wav"):
            for index, frame in enumerate(speech_frames(name), start=1):
                stream.push(frame)
                if index % frames_per_step == 0:
                    decodes = stream.decodes
                    await until(lambda: stream.decodes > decodes, DEADLINE)  # noqa: B023
            words_before_end.append(len(texts(events)))
            stream.end_of_speech()
            pauses = len(words_before_end)
            await until(lambda: sum(isinstance(e, Pause) for e in events) >= pauses, DEADLINE)  # noqa: B023
        stream.request_close()
    first_pause = next(i for i, e in enumerate(events) if isinstance(e, Pause))
    first, second = spoken(events[:first_pause]), spoken(events[first_pause:])
    for key in ("quick", "lazy", "dog", "report", "finance", "friday"):
        assert key in first, first
    assert "fox" in first or "foc" in first or "fark" in first, first  # tiny hears "round-fark"
    for key in ("morning", "meeting", "minutes", "call"):
        assert key in second, second
    # streaming, not batch: most words came before the end of speech
    assert words_before_end[0] >= 5 and words_before_end[1] - first_pause >= 1, words_before_end
    words = texts(events)
    for once in ("lazy", "report", "finance", "morning", "meeting"):
        assert sum(once in w.casefold() for w in words) == 1, words
    assert [i for i, e in enumerate(events) if isinstance(e, Pause)] == [first_pause, len(events) - 1]
    ends = [e.audio_end or 0.0 for e in events if isinstance(e, Word)]
    assert all(ends) and ends == sorted(ends)
    assert stream.frames_dropped == 0


async def test_fast_push_is_buffered_and_coalesced(whisper: EmbeddedEngine) -> None:
    """Two utterances pushed at once, frame by frame, with an end of speech
    between them: few decodes, both transcribed, a pause after each."""
    async with whisper.open_stream("en") as stream:
        assert isinstance(stream, EmbeddedStream)
        one, two = speech_frames("speech_1.wav"), speech_frames("speech_2.wav")
        for frame in one:
            stream.push(frame)
        stream.end_of_speech()
        for frame in two:
            stream.push(frame)
        stream.end_of_speech()
        events = await read_until_pauses(stream, 2)
    pauses = [i for i, e in enumerate(events) if isinstance(e, Pause)]
    assert len(pauses) == 2 and pauses[1] == len(events) - 1
    first, second = spoken(events[: pauses[0]]), spoken(events[pauses[0] :])
    for key in ("quick", "lazy", "dog", "report", "finance", "friday"):
        assert key in first, first
    assert "fox" in first or "foc" in first or "fark" in first, first
    for key in ("morning", "meeting", "minutes", "call"):
        assert key in second, second
    # one pass per utterance: the driver drains everything pushed before deciding
    assert stream.decodes <= 4
    assert stream.frames_dropped == 0
    pause = events[pauses[0]]
    assert isinstance(pause, Pause) and pause.audio_time == pytest.approx(len(one) * FRAME_SECONDS)


async def test_leaving_the_stream_flushes_the_last_words(whisper: EmbeddedEngine) -> None:
    async with whisper.open_stream("en") as stream:
        for frame in speech_frames("speech_2.wav"):
            stream.push(frame)
    events = await read_all(stream)
    assert "morning" in spoken(events) and "call" in spoken(events), spoken(events)
    assert isinstance(events[-1], Pause)
    words = [e for e in events if isinstance(e, Word)]
    assert words and not any(w.text.startswith(" ") for w in words)
    assert all(not w.joins_previous for w in words)


async def test_worker_pool_is_shared_and_fixed(whisper: EmbeddedEngine) -> None:
    """Five streams decoding at once add no thread (Python or native)."""
    process = psutil.Process()
    counts: list[tuple[int, int]] = []

    async def speaker() -> list[SttEvent]:
        async with whisper.open_stream("en") as stream:
            for frame in speech_frames("speech_2.wav")[:20]:
                stream.push(frame)
            stream.end_of_speech()
            events = await read_until_pauses(stream, 1)
            counts.append((threading.active_count(), process.num_threads()))
            return events

    async def speakers(count: int) -> list[list[SttEvent]]:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(speaker()) for _ in range(count)]
        return [task.result() for task in tasks]

    await speakers(whisper.workers)  # the pool grows to its fixed size on demand
    pool = [t for t in threading.enumerate() if t.name.startswith("stt-embedded")]
    assert len(pool) == whisper.workers
    python_threads, native_threads = threading.active_count(), process.num_threads()
    counts.clear()

    for events in await speakers(5):
        assert "morning" in spoken(events)
    assert len(counts) == 5
    assert all(python <= python_threads and native <= native_threads for python, native in counts), (
        counts,
        python_threads,
        native_threads,
    )
    assert [t for t in threading.enumerate() if t.name.startswith("stt-embedded")] == pool


async def test_a_missing_model_is_a_failure_and_a_fatal_stream_error(tmp_path: Path) -> None:
    engine = EmbeddedEngine(tmp_path / "nowhere")
    try:
        assert not await engine.wait_ready()
        assert not engine.ready()
        reason = engine.failure()
        assert reason is not None and "model.bin" in reason and "nowhere" in reason
        async with engine.open_stream("en") as stream:
            stream.push(np.zeros(FRAME_SAMPLES, dtype=np.float32))
        events = await read_all(stream)
        assert len(events) == 1
        error = events[0]
        assert isinstance(error, StreamError) and error.fatal and error.reason == "model"
    finally:
        await engine.aclose()


async def test_streams_opened_while_loading_fail_when_the_load_fails(tmp_path: Path) -> None:
    gate = threading.Event()

    def failing_loader() -> Transcriber:
        assert gate.wait(DEADLINE)
        raise OSError("disk on fire")

    engine = EmbeddedEngine(loader=failing_loader)
    try:
        async with engine.open_stream("en") as stream:
            assert not engine.ready() and engine.failure() is None
            stream.push(np.zeros(FRAME_SAMPLES, dtype=np.float32))
            gate.set()
            events = await read_all(stream)
        assert [type(e) for e in events] == [StreamError]
        assert isinstance(events[0], StreamError) and events[0].fatal and events[0].reason == "model"
        assert "disk on fire" in (engine.failure() or "")
    finally:
        gate.set()
        await engine.aclose()


# --- scripted model: bounds and policy ------------------------------------------------
async def test_unsupported_language_is_a_clear_fatal_error(
    scripted: tuple[EmbeddedEngine, ScriptedModel],
) -> None:
    engine, model = scripted
    assert "xx" not in engine.languages() and "en" in engine.languages()
    async with engine.open_stream("xx") as stream:
        stream.push(word_frames(1, 1)[0])
        events = await read_all(stream)
    assert len(events) == 1
    error = events[0]
    assert isinstance(error, StreamError) and error.fatal and error.reason == "language"
    assert "'xx'" in error.message and "en" in error.message
    assert model.calls == []


async def test_push_is_bounded_while_the_model_loads() -> None:
    gate = threading.Event()
    model = ScriptedModel(asyncio.get_running_loop())

    def slow_loader() -> Transcriber:
        assert gate.wait(DEADLINE)
        return model

    options = EmbeddedOptions(buffer_seconds=2.0)
    engine = EmbeddedEngine(loader=slow_loader, options=options)
    try:
        async with engine.open_stream("en") as stream:
            assert isinstance(stream, EmbeddedStream)
            frames = word_frames(1, 60)  # 30 s against a 2 s ring
            for frame in frames:
                stream.push(frame)
            capacity = round(options.buffer_seconds / FRAME_SECONDS)
            assert not engine.ready()
            assert stream.frames_buffered == capacity
            assert stream.frames_dropped == len(frames) - capacity
            gate.set()
            stream.end_of_speech()
            events = await read_until_pauses(stream, 1)
        # the newest audio survived: the last words spoken
        assert texts(events) == ["w57", "w58", "w59", "w60"]
        assert engine.ready()
    finally:
        gate.set()
        await engine.aclose()


async def test_one_decode_in_flight_per_stream_and_passes_coalesce(
    scripted: tuple[EmbeddedEngine, ScriptedModel],
) -> None:
    engine, model = scripted
    model.gate = threading.Event()
    async with engine.open_stream("en") as stream:
        assert isinstance(stream, EmbeddedStream)
        frames = word_frames(1, 14)  # 7 s
        for frame in frames[:13]:
            stream.push(frame)
        async with asyncio.timeout(DEADLINE):
            await model.started.wait()
        for frame in frames[13:]:  # 6 s more while the first pass is held
            stream.push(frame)
            await asyncio.sleep(0)  # let the driver run: it must not start another pass
        assert len(model.calls) == 1 and stream.frames_buffered == len(frames) - 13
        model.gate.set()
        stream.end_of_speech()
        events = await read_until_pauses(stream, 1)
    assert texts(events) == [f"w{k}" for k in range(1, 15)]
    assert model.max_in_flight == 1  # two workers, yet never two passes of one stream
    assert len(model.calls) == 2 and model.finals == [False, True]
    assert model.calls[1] == pytest.approx(len(frames) * FRAME_SECONDS, abs=0.01)


async def test_long_speech_is_cut_into_windows_without_losing_or_repeating_words(
    scripted: tuple[EmbeddedEngine, ScriptedModel],
) -> None:
    model = scripted[1]
    engine = EmbeddedEngine(loader=lambda: model, options=EmbeddedOptions(max_window_seconds=3.0))
    try:
        async with engine.open_stream("en") as stream:
            assert isinstance(stream, EmbeddedStream)
            for index, frame in enumerate(word_frames(1, 30), start=1):  # 15 s
                stream.push(frame)
                if index % 13 == 0:
                    decodes = stream.decodes
                    await until(lambda: stream.decodes > decodes, DEADLINE)  # noqa: B023
            stream.end_of_speech()
            events = await read_until_pauses(stream, 1)
    finally:
        await engine.aclose()
    assert texts(events) == [f"w{k}" for k in range(1, 31)]
    assert max(model.calls) <= 3.0 + FRAME_SECONDS
    ends = [e.audio_end or 0.0 for e in events if isinstance(e, Word)]
    assert ends == sorted(ends)
    assert ends[-1] == pytest.approx(15.0, abs=0.1)
    assert any(prompt for prompt in model.prompts)  # after a cut, the emitted words prompt


async def test_a_failed_decode_is_reported_and_the_stream_goes_on() -> None:
    model = ScriptedModel(asyncio.get_running_loop(), fail_first=True)
    engine = EmbeddedEngine(loader=lambda: model)
    try:
        async with engine.open_stream("en") as stream:
            for frame in word_frames(1, 3)[:13]:
                stream.push(frame)
            async with asyncio.timeout(DEADLINE):
                await model.started.wait()
            for frame in word_frames(1, 3)[13:]:
                stream.push(frame)
            stream.end_of_speech()
            events = await read_until_pauses(stream, 1)
    finally:
        await engine.aclose()
    errors = [e for e in events if isinstance(e, StreamError)]
    assert len(errors) == 1 and not errors[0].fatal and errors[0].reason == "decode"
    assert texts(events) == ["w1", "w2", "w3"]
    assert isinstance(events[-1], Pause)


async def test_end_of_speech_is_idempotent_until_the_next_push(
    scripted: tuple[EmbeddedEngine, ScriptedModel],
) -> None:
    engine, _model = scripted
    async with engine.open_stream("en") as stream:
        stream.end_of_speech()  # nothing pushed: no pause
        for frame in word_frames(1, 2):
            stream.push(frame)
        stream.end_of_speech()
        stream.end_of_speech()
    events = await read_all(stream)
    assert texts(events) == ["w1", "w2"]
    assert sum(isinstance(e, Pause) for e in events) == 1


def test_from_settings_reads_model_dir_and_threads(tmp_path: Path) -> None:
    settings = load_settings(
        LT_STT_ENGINE="embedded", LT_EMBEDDED_MODEL_DIR=str(tmp_path), LT_EMBEDDED_THREADS=1
    )
    engine = EmbeddedEngine.from_settings(settings)
    try:
        assert engine.name == "embedded"
        assert engine.threads == 1 and 1 <= engine.workers <= 2
        asyncio.run(engine.wait_ready())
        assert str(tmp_path) in (engine.failure() or "")
    finally:
        asyncio.run(engine.aclose())


class PiecesModel(Transcriber):
    """Whisper's word pieces: a piece without a leading space continues a word."""

    def transcribe(self, audio: Audio, language: str, prompt: str | None, final: bool) -> list[TimedWord]:
        return [TimedWord(" round", 0.0, 0.4), TimedWord("-fox", 0.4, 0.8), TimedWord(" jumps.", 0.8, 1.0)]


async def test_word_text_drops_the_leading_space_and_pieces_join() -> None:
    engine = EmbeddedEngine(loader=PiecesModel)
    try:
        async with engine.open_stream("en") as stream:
            for _ in range(2):
                for frame in word_frames(1, 2):
                    stream.push(frame)
                stream.end_of_speech()
        events = await read_all(stream)
    finally:
        await engine.aclose()
    words = [(e.text, e.joins_previous) for e in events if isinstance(e, Word)]
    assert words == [("round", False), ("-fox", True), ("jumps.", False)] * 2
    assert [type(e) for e in events].count(Pause) == 2
