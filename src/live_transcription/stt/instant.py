"""A zero-delay stand-in engine for benchmarks and tests of the service itself.

It recognises nothing: every ``frames_per_word`` voiced frames it emits one
word named after the stream frame that completed it, ``w<index>`` (0-based
count of frames pushed to this stream), with ``audio_end`` at that frame's
end; ``end_of_speech`` yields a ``Pause`` at once. So the words arrive the
moment their audio does, and a harness can tell from a word's text exactly
which audio carried it: what is measured is the service's own cost and
latency. Never selected unless ``LT_STT_ENGINE=instant``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Self

import numpy as np

from live_transcription.stt.base import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    Frame,
    Language,
    Pause,
    StreamError,
    SttEngine,
    SttEvent,
    SttStream,
    Word,
)
from live_transcription.stt.replay import EventChannel

LANGUAGES = {
    "en": Language("en", "English"),
    "fr": Language("fr", "French"),
}

_SILENCE_POWER = 1e-6  # mean square below this is silence (-60 dBFS)


class InstantStream(SttStream):
    def __init__(self, frames_per_word: int) -> None:
        self._frames_per_word = frames_per_word
        self._events = EventChannel()
        self._frames = 0
        self._voiced = 0
        self._in_speech = False

    def push(self, frame: Frame) -> None:
        index = self._frames
        self._frames += 1
        if float(np.dot(frame, frame)) < _SILENCE_POWER * FRAME_SAMPLES:
            return
        self._in_speech = True
        self._voiced += 1
        if self._voiced % self._frames_per_word == 0:
            end = (index + 1) * FRAME_SECONDS
            self._events.put(Word(f"w{index}", audio_start=end - FRAME_SECONDS, audio_end=end))

    def end_of_speech(self) -> None:
        if self._in_speech:
            self._in_speech = False
            self._events.put(Pause(self._frames * FRAME_SECONDS))

    def events(self) -> AsyncIterator[SttEvent]:
        return aiter(self._events)

    @property
    def frames_dropped(self) -> int:
        return 0

    def close(self) -> None:
        self.end_of_speech()
        self._events.close()

    def fail(self, message: str) -> Self:
        self._events.put(StreamError(message, fatal=True, reason="language"))
        self._events.close()
        return self


class InstantEngine(SttEngine):
    name = "instant"

    def __init__(self, frames_per_word: int = 4) -> None:
        if frames_per_word < 1:
            raise ValueError("frames_per_word must be at least 1")
        self.frames_per_word = frames_per_word
        self.streams_opened = 0

    def languages(self) -> dict[str, Language]:
        return dict(LANGUAGES)

    @asynccontextmanager
    async def open_stream(self, language: str) -> AsyncIterator[SttStream]:
        stream = InstantStream(self.frames_per_word)
        self.streams_opened += 1
        if language not in LANGUAGES:
            stream.fail(f"unsupported language {language!r}")
        try:
            yield stream
        finally:
            stream.close()
