"""The bookkeeping every engine's stream shares.

A stream is driven by one task (``run``) that owns all of its state. ``push``
and ``end_of_speech`` only append to bounded buffers and wake it; events go
out through a bounded ``EventChannel``. Subclasses say what one step of work
is (``_step``) and what to release at the end (``_release``).
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from live_transcription.audio.ring import DropOldestRing
from live_transcription.stt.base import FRAME_SECONDS, Frame, StreamError, SttEvent, SttStream
from live_transcription.stt.replay import EventChannel

log = logging.getLogger(__name__)


class DrivenStream(SttStream):
    """Pushed frames wait in a drop-oldest ring (counted) for the driver."""

    def __init__(self, buffer_seconds: float) -> None:
        buffer_frames = max(1, round(buffer_seconds / FRAME_SECONDS))
        self._ring: DropOldestRing[tuple[int, Frame]] = DropOldestRing(buffer_frames)
        self._pushed = 0
        self._events = EventChannel()
        self._wake = asyncio.Event()
        self._closing = False
        self._finished = False

    # --- SttStream ---------------------------------------------------------------
    def push(self, frame: Frame) -> None:
        if self._finished:
            return
        self._ring.push((self._pushed, frame))
        self._pushed += 1
        self._wake.set()

    def events(self) -> AsyncIterator[SttEvent]:
        return self._events.__aiter__()

    @property
    def frames_dropped(self) -> int:
        return self._ring.dropped

    @property
    def events_dropped(self) -> int:
        return self._events.dropped

    # --- lifecycle ---------------------------------------------------------------
    def request_close(self) -> None:
        """Flush what is left, then end (``events()`` ends after the flush)."""
        if not self._closing:
            self._closing = True
            self._on_close_requested()
            self.end_of_speech()
            self._wake.set()

    def fail(self, reason: str, message: str) -> None:
        """End the stream at once with a fatal error."""
        if not self._finished:
            self._events.put(StreamError(message, fatal=True, reason=reason))
            self._finished = True
            self._ring.clear()
            self._wake.set()

    async def run(self) -> None:
        try:
            await self._prepare()
            while not self._finished:
                self._wake.clear()
                if not await self._step() and not self._finished and not self._wake.is_set():
                    await self._wake.wait()
        except Exception as exc:
            log.exception("stt stream failed")
            self._events.put(StreamError(f"internal error: {exc}", fatal=True, reason="internal"))
        finally:
            self._finished = True
            await self._release()
            self._ring.clear()
            self._events.close()

    # --- for subclasses ----------------------------------------------------------
    async def _prepare(self) -> None:
        """Before the first step (e.g. wait for the model)."""

    def _on_close_requested(self) -> None:
        """``request_close`` was called (e.g. arm a deadline)."""

    @abstractmethod
    async def _step(self) -> bool:
        """One unit of work; False when there is nothing to do until woken."""

    async def _release(self) -> None:
        """The stream has ended: give back what it holds."""


@asynccontextmanager
async def running(stream: DrivenStream) -> AsyncIterator[SttStream]:
    """``open_stream``'s body: the driver runs while the block does; leaving
    it flushes, and the block ends once the stream has."""
    async with asyncio.TaskGroup() as group:
        group.create_task(stream.run())
        try:
            yield stream
        finally:
            stream.request_close()
