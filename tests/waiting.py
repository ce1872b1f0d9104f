"""Waiting on conditions in tests: yield to the loop until true, with a
generous deadline; never a fixed sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], deadline: float = 15.0, what: str = "") -> None:
    async with asyncio.timeout(deadline):
        # polls state the test does not own; the deadline is generous, the step tiny
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    assert condition(), what


async def wait_event(event: asyncio.Event, deadline: float = 15.0) -> None:
    async with asyncio.timeout(deadline):
        await event.wait()
