"""The engine interface every STT backend implements.

An engine lists its languages and opens one stream per speaker. A stream takes
24 kHz mono float32 frames of 80 ms and yields word and pause events. The
caption builder only sees these events, never the engine behind them.

Lifecycle of a stream (structured: the stream's own tasks live inside
``async with``)::

    async with engine.open_stream("en") as stream:
        stream.push(frame)          # non-blocking, bounded: drops oldest, counts
        stream.end_of_speech()      # the audio gate saw silence: flush, then Pause
        async for event in stream.events():
            ...
    # leaving the block flushes: words still inside the model delay are
    # delivered to events() before it ends.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 24_000
"""Every engine takes 24 kHz mono float32 audio."""

FRAME_SAMPLES = 1_920
"""80 ms at 24 kHz: the frame size Kyutai expects (7680 bytes as float32)."""

FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE

Frame = npt.NDArray[np.float32]
"""One frame: FRAME_SAMPLES float32 samples in [-1, 1]."""


@dataclass(frozen=True, slots=True)
class Language:
    """A language an engine can caption, as Talk wants to see it."""

    code: str
    name: str
    separator: str = " "
    rtl: bool = False

    def as_talk_entry(self) -> dict[str, object]:
        return {"name": self.name, "metadata": {"separator": self.separator, "rtl": self.rtl}}


@dataclass(frozen=True, slots=True)
class Word:
    """One recognised word (or word piece when ``joins_previous``).

    ``audio_end`` is the stream time in seconds (samples pushed / SAMPLE_RATE)
    of the end of the audio that carried the word, when the engine knows it;
    latency measurement and reconnect replay use it.
    """

    text: str
    audio_start: float | None = None
    audio_end: float | None = None
    joins_previous: bool = False
    """True for a piece that continues the previous word (no space before it)."""


@dataclass(frozen=True, slots=True)
class Pause:
    """The speaker paused: the current caption line may be finalised."""

    audio_time: float | None = None


@dataclass(frozen=True, slots=True)
class StreamError:
    """Something went wrong. ``fatal`` errors end the stream (bad credentials,
    unsupported language); others are informational (a reconnect happened)."""

    message: str
    fatal: bool = False
    reason: str = "error"
    """A short metric label: auth, capacity, connection, protocol, timeout, ..."""


SttEvent = Word | Pause | StreamError


class SttStream(ABC):
    """One speaker's stream. Owned by one Speaker; not shared."""

    @abstractmethod
    def push(self, frame: Frame) -> None:
        """Queue one 80 ms frame. Never blocks; the queue is bounded and drops
        the oldest frame (counted in ``frames_dropped``) when full."""

    @abstractmethod
    def end_of_speech(self) -> None:
        """The audio gate saw the speaker stop. The stream pushes what the
        engine needs to emit the words still inside its delay, delivers them,
        then yields a ``Pause``. Idempotent until the next ``push``."""

    @abstractmethod
    def events(self) -> AsyncIterator[SttEvent]:
        """Words, pauses and errors in order. Ends after the stream is closed
        and flushed (or on a fatal error)."""

    @property
    @abstractmethod
    def frames_dropped(self) -> int:
        """Frames dropped because the engine fell behind."""


class SttEngine(ABC):
    """A speech-to-text backend. One per process, shared by all speakers."""

    name: str = "engine"

    @abstractmethod
    def languages(self) -> dict[str, Language]:
        """Languages this engine captions, keyed by Talk language id."""

    @abstractmethod
    def open_stream(self, language: str) -> AbstractAsyncContextManager[SttStream]:
        """A stream for one speaker. Entering starts it (connecting may happen
        lazily in the background); leaving flushes and closes it."""

    def running(self) -> AbstractAsyncContextManager[None]:
        """The engine's background work (a remote engine's connection pool)
        runs inside this block, in its own task group; most engines have none."""
        return contextlib.nullcontext()

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing
        """Release shared resources (model, worker pool) at shutdown."""

    def failure(self) -> str | None:
        """Why the engine cannot work at all right now (e.g. the server
        rejected the credentials), or None. Health reports it and Talk gets
        HTTP 550 while it lasts."""
        return None

    def ready(self) -> bool:
        """False while the engine is still starting (e.g. loading a model)."""
        return True
