"""The embedded Whisper engine transcribes real speech through the stream API."""

from __future__ import annotations

import itertools
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr

from live_transcription.stt.base import FRAME_SAMPLES, SAMPLE_RATE, Pause, StreamError, Word
from live_transcription.stt.embedded import EmbeddedEngine
from tests.fakes.streams import collect_until, ends_with_pause, never

FIXTURES = Path(__file__).parents[1] / "fixtures" / "speech"


def frames_of(path: Path) -> list[np.ndarray]:
    with wave.open(str(path)) as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
        rate = wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, rate, SAMPLE_RATE).astype(np.float32)
    padded = np.concatenate([audio, np.zeros(-len(audio) % FRAME_SAMPLES, dtype=np.float32)])
    return list(padded.reshape(-1, FRAME_SAMPLES))


@pytest.fixture(scope="module")
def engine() -> EmbeddedEngine:
    return EmbeddedEngine()


async def transcribe(engine: EmbeddedEngine, path: Path) -> list[Word]:
    async with engine.open_stream("en") as stream:
        for frame in frames_of(path):
            stream.push(frame)
        stream.end_of_speech()
        events = await collect_until(stream, ends_with_pause)
    assert not [e for e in events if isinstance(e, StreamError)]
    assert isinstance(events[-1], Pause)
    return [e for e in events if isinstance(e, Word)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("speech_1.wav", {"quick", "lazy", "dog", "report", "finance", "friday"}),
        ("speech_2.wav", {"morning", "meeting", "minutes", "call"}),
    ],
)
async def test_real_speech_is_transcribed(engine: EmbeddedEngine, name: str, expected: set[str]) -> None:
    words = await transcribe(engine, FIXTURES / name)
    spoken = {w.text.strip(".,!?").casefold() for w in words}
    assert expected <= spoken, [w.text for w in words]
    # no word twice in a row (LocalAgreement must not repeat confirmed words)
    texts = [w.text.casefold() for w in words]
    assert all(a != b for a, b in itertools.pairwise(texts)), texts
    ends = [w.audio_end or 0.0 for w in words]
    assert ends == sorted(ends)


async def test_unsupported_language_is_fatal(engine: EmbeddedEngine) -> None:
    async with engine.open_stream("xx") as stream:
        events = await collect_until(stream, never)
    assert isinstance(events[0], StreamError) and events[0].reason == "language"


async def test_only_languages_the_bundled_model_speaks_are_offered(engine: EmbeddedEngine) -> None:
    from faster_whisper import WhisperModel

    from live_transcription.stt.embedded import bundled_model_dir

    model = WhisperModel(str(bundled_model_dir()), device="cpu", compute_type="int8")
    if not model.model.is_multilingual:
        assert set(engine.languages()) == {"en"}
