"""Pure bookkeeping that makes a reconnect lose no word and repeat none.

Stream time counts only the speaker's own frames (``push``); the silence a
stream sends to flush the model is not stream time. Each connection has its
own server timeline (starting at 0), so a ``ConnectionTimeline`` maps server
frame positions back to stream time.

After a drop the stream replays the audio it sent since the last flushed
pause (bounded) and the ``ReplayDeduper`` drops what the server recognises a
second time:

* words with an exact start time (moshi-server) are duplicates when they start
  no later than the last word already delivered;
* words without times (Modal) are matched, in order, against the words
  already delivered from the replayed audio; the first word that matches
  none ends the replay phase.
"""

from __future__ import annotations

import asyncio
import string
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from live_transcription.stt.base import FRAME_SECONDS, SttEvent, Word


@dataclass(slots=True)
class _Segment:
    server_start: int
    stream_start: int
    count: int
    advances: bool
    """False for flush padding: every padded frame maps to the same stream time."""


class ConnectionTimeline:
    """Server frame index -> stream frame index for one connection."""

    __slots__ = ("_segments", "server_frames")

    MAX_SEGMENTS = 256

    def __init__(self, start_frame: int = 0) -> None:
        self._segments: deque[_Segment] = deque(maxlen=self.MAX_SEGMENTS)
        self.server_frames = start_frame
        """Frames the connection has carried (those sent before this lease included)."""

    def record_audio(self, stream_index: int) -> None:
        last = self._segments[-1] if self._segments else None
        if (
            last is not None
            and last.advances
            and last.stream_start + last.count == stream_index
            and last.server_start + last.count == self.server_frames
        ):
            last.count += 1
        else:
            self._segments.append(_Segment(self.server_frames, stream_index, 1, True))
        self.server_frames += 1

    def record_padding(self, stream_anchor: int, count: int) -> None:
        self._segments.append(_Segment(self.server_frames, stream_anchor, count, False))
        self.server_frames += count

    def stream_frame_at(self, server_frame: float) -> float:
        """Stream position (in frames, fractional) of a server position."""
        if not self._segments:
            return 0.0
        chosen = self._segments[0]
        for segment in self._segments:
            if segment.server_start <= server_frame:
                chosen = segment
            else:
                break
        offset = max(0.0, server_frame - chosen.server_start)
        if chosen.advances:
            return chosen.stream_start + min(offset, float(chosen.count))
        return float(chosen.stream_start)

    def stream_time_at(self, server_seconds: float) -> float:
        return self.stream_frame_at(server_seconds / FRAME_SECONDS) * FRAME_SECONDS


_STRIP = string.punctuation + " \u00a0\u2019\u00bf\u00a1"


def normalise(text: str) -> str:
    return text.strip(_STRIP).casefold()


class ReplayDeduper:
    """Decides, word by word, whether a word is new or a replayed duplicate."""

    __slots__ = ("_delivered", "_expected", "_last_start", "_replaying", "duplicates_dropped")

    MAX_REMEMBERED = 256
    START_TOLERANCE = FRAME_SECONDS / 2

    def __init__(self) -> None:
        self._delivered: deque[Word] = deque(maxlen=self.MAX_REMEMBERED)
        self._expected: deque[str] = deque()
        self._last_start: float | None = None
        self._replaying = False
        self.duplicates_dropped = 0

    @property
    def replaying(self) -> bool:
        return self._replaying

    def start_replay(self, replay_from: float) -> None:
        """A new connection replays the audio from stream time ``replay_from``."""
        self._expected = deque(
            normalise(word.text)
            for word in self._delivered
            if word.audio_end is None or word.audio_end >= replay_from
        )
        self._expected = deque(text for text in self._expected if text)
        self._replaying = bool(self._delivered)

    def acknowledge_all(self) -> None:
        """Everything sent so far is flushed (a pause): nothing left to replay."""
        self._delivered.clear()
        self._expected.clear()
        self._replaying = False

    def accept(self, word: Word) -> bool:
        """True to deliver ``word``; False when it repeats a delivered word."""
        if self._replaying:
            if word.audio_start is not None and self._last_start is not None:
                if word.audio_start <= self._last_start + self.START_TOLERANCE:
                    self.duplicates_dropped += 1
                    return False
                self._replaying = False
            else:
                text = normalise(word.text)
                if text and self._match_expected(text):
                    self.duplicates_dropped += 1
                    return False
                if text:
                    self._replaying = False
                    self._expected.clear()
        self._delivered.append(word)
        if word.audio_start is not None:
            self._last_start = word.audio_start
        return True

    def _match_expected(self, text: str) -> bool:
        expected = self._expected
        for index, candidate in enumerate(expected):
            if candidate == text:
                for _ in range(index + 1):
                    expected.popleft()
                if not expected:
                    self._replaying = False
                return True
        return False


class EventChannel:
    """The bounded queue behind ``SttStream.events()``.

    Words are small and the consumer is the speaker's own task, so the bound is
    only a safety net: when full the oldest event goes (counted). ``close``
    always gets through.
    """

    __slots__ = ("_closed", "_queue", "dropped")

    def __init__(self, maxsize: int = 1024) -> None:
        self._queue: asyncio.Queue[SttEvent | None] = asyncio.Queue(maxsize=maxsize)
        self._closed = False
        self.dropped = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, event: SttEvent | None) -> None:
        if self._closed:
            return
        if event is None:
            self._closed = True
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    def close(self) -> None:
        self.put(None)

    def __aiter__(self) -> AsyncIterator[SttEvent]:
        return _EventIterator(self._queue)


class _EventIterator:
    """Not a generator: a cancelled ``__anext__`` (a timeout) leaves it usable."""

    __slots__ = ("_ended", "_queue")

    def __init__(self, queue: asyncio.Queue[SttEvent | None]) -> None:
        self._queue = queue
        self._ended = False

    def __aiter__(self) -> _EventIterator:
        return self

    async def __anext__(self) -> SttEvent:
        if self._ended:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            self._ended = True
            self._queue.put_nowait(None)  # later iterators end too
            raise StopAsyncIteration
        return event
