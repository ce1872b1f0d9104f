"""Time as a dependency, so timeouts, backoff and idle timers are testable
without waiting.

``MonotonicClock`` is the real one. ``ManualClock`` only moves when a test
tells it to; timers fire and sleepers wake in deadline order as it passes
them. Timers only call a plain callback (the STT streams and pool use them to
wake their driver, which then reads ``now()`` and decides).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` (on the event loop) after ``delay`` seconds."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and the running loop's timers."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return _DeadlineTimer(asyncio.get_running_loop(), time.monotonic() + max(0.0, delay), callback)


class _DeadlineTimer:
    """A loop timer that never fires before its deadline on ``time.monotonic``:
    the loop may run a timer up to a millisecond early (selector timeouts are
    rounded), and a driver that then finds its deadline not reached would wait
    for a wake-up that never comes."""

    __slots__ = ("_callback", "_deadline", "_handle", "_loop")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deadline: float, callback: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._deadline = deadline
        self._callback = callback
        self._handle = loop.call_later(max(0.0, deadline - time.monotonic()), self._fire)

    def _fire(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining > 0:
            self._handle = self._loop.call_later(remaining, self._fire)
        else:
            self._callback()

    def cancel(self) -> None:
        self._handle.cancel()


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "deadline", "sleeper")

    def __init__(self, deadline: float, callback: Callable[[], None], sleeper: bool = False) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False
        self.sleeper = sleeper

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock for tests and simulations.

    ``await advance(seconds)`` wakes every timer and sleeper whose deadline
    passes, in order, letting each woken task run before the next deadline
    (so a task that sleeps in a loop wakes once per period). ``skip(seconds)``
    does the same at once, without yielding: the woken tasks run when the
    caller next awaits. ``sleepers`` and ``pending_timers`` let a test wait
    until the code under test has armed its wait before moving time.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()
        self._changed: asyncio.Event | None = None

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return self._add(_ManualTimer(self._now + max(0.0, delay), callback))

    def _add(self, timer: _ManualTimer) -> _ManualTimer:
        heapq.heappush(self._timers, (timer.deadline, next(self._order), timer))
        if self._changed is not None:
            self._changed.set()
        return timer

    @property
    def pending_timers(self) -> int:
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, timer in self._timers if timer.sleeper and not timer.cancelled)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self._add(_ManualTimer(self._now + seconds, wake, sleeper=True))
        try:
            await future
        finally:
            timer.cancel()

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Wait (on events, not time) until at least ``count`` tasks sleep."""
        if self._changed is None:
            self._changed = asyncio.Event()
        while self.sleepers < count:
            self._changed.clear()
            await self._changed.wait()

    def _fire_next(self, target: float) -> bool:
        if not self._timers or self._timers[0][0] > target:
            return False
        deadline, _, timer = heapq.heappop(self._timers)
        self._now = max(self._now, deadline)
        if not timer.cancelled:
            timer.cancelled = True
            timer.callback()
        return True

    def skip(self, seconds: float) -> None:
        """Move time forward at once, firing every timer that falls due."""
        target = self._now + seconds
        while self._fire_next(target):
            pass
        self._now = target

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passed, and
        let the woken tasks run."""
        target = self._now + seconds
        while self._fire_next(target):
            for _ in range(5):  # let the woken task run before the next deadline
                await asyncio.sleep(0)
        self._now = target
        for _ in range(5):
            await asyncio.sleep(0)
