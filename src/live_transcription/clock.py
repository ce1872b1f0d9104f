"""Time as a dependency, so timeouts and backoff are testable without waiting.

``MonotonicClock`` is the real one. ``ManualClock`` only moves when a test
calls ``advance``; sleepers wake in deadline order as it passes them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock for tests: ``sleep`` returns once ``advance`` has moved time past
    its deadline. ``sleepers`` tells a test how many are waiting, so it can
    wait for the code under test to reach its sleep before advancing."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._changed = asyncio.Event()

    def now(self) -> float:
        return self._now

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, fut in self._heap if not fut.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self._now + seconds, next(self._order), fut))
        self._changed.set()
        await fut

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Wait (on events, not time) until at least ``count`` tasks sleep."""
        while self.sleepers < count:
            self._changed.clear()
            await self._changed.wait()

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passed, and
        let the woken tasks run."""
        target = self._now + seconds
        while self._heap and self._heap[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._heap)
            self._now = max(self._now, deadline)
            if not fut.done():
                fut.set_result(None)
            # let the woken task run before the next deadline
            for _ in range(5):
                await asyncio.sleep(0)
        self._now = target
        for _ in range(5):
            await asyncio.sleep(0)
