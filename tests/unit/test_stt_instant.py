from __future__ import annotations

import numpy as np

from live_transcription.stt.base import FRAME_SAMPLES, Pause, StreamError, SttEvent, Word
from live_transcription.stt.instant import InstantEngine

VOICED = (0.1 * np.sin(np.arange(FRAME_SAMPLES) / 5)).astype(np.float32)
SILENT = np.zeros(FRAME_SAMPLES, dtype=np.float32)


async def test_words_name_the_frame_that_completed_them() -> None:
    engine = InstantEngine(frames_per_word=2)
    events: list[SttEvent] = []
    async with engine.open_stream("en") as stream:
        for frame in (VOICED, SILENT, VOICED, VOICED, VOICED):
            stream.push(frame)
        stream.end_of_speech()
        stream.end_of_speech()  # idempotent until more speech
    async for event in stream.events():
        events.append(event)
    words = [e for e in events if isinstance(e, Word)]
    assert [w.text for w in words] == ["w2", "w4"]
    assert words[0].audio_end is not None
    assert abs(words[0].audio_end - 3 * 0.08) < 1e-9
    assert sum(isinstance(e, Pause) for e in events) == 1


async def test_unsupported_language_is_a_fatal_stream_error() -> None:
    async with InstantEngine().open_stream("xx") as stream:
        events = [event async for event in stream.events()]
    assert len(events) == 1
    assert isinstance(events[0], StreamError)
    assert events[0].fatal
