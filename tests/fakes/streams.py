"""Helpers for tests that drive an ``SttStream`` and read its events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from live_transcription.clock import ManualClock
from live_transcription.stt.base import Pause, SttEvent, SttStream, Word

DEADLINE_SECONDS = 30.0


async def collect_until(stream: SttStream, done: Callable[[list[SttEvent]], bool]) -> list[SttEvent]:
    """Events until ``done(events)`` or the stream ends (generous deadline)."""
    events: list[SttEvent] = []
    async with asyncio.timeout(DEADLINE_SECONDS):
        async for event in stream.events():
            events.append(event)
            if done(events):
                break
    return events


def words(events: list[SttEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, Word)]


def count_words(n: int) -> Callable[[list[SttEvent]], bool]:
    return lambda events: len(words(events)) >= n


def ends_with_pause(events: list[SttEvent]) -> bool:
    return isinstance(events[-1], Pause)


def never(events: list[SttEvent]) -> bool:
    return False


async def advance_until_pause(
    clock: ManualClock, stream: SttStream, events: list[SttEvent], quiet: float
) -> None:
    """A quiet-period flush ends on the clock: once the flushed words are in,
    advancing by the quiet period ends it with a Pause."""
    clock.skip(quiet)
    events += await collect_until(stream, ends_with_pause)
