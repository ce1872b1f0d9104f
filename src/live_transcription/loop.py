"""Which event loop runs the service.

uvloop (libuv, in C) by default: receiving a UDP datagram through the
default asyncio loop costs about 22 us of CPU before any of our code runs,
uvloop about 5 us (``python -m bench.floor``), and every participant in a
call sends 50 of them a second. ``LT_EVENT_LOOP=asyncio`` selects the
standard loop (for debugging, or where uvloop is not available).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``None`` means asyncio's default loop."""
    if name == "asyncio":
        return None
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 - only when selected

        return uvloop.new_event_loop
    raise ValueError(f"unknown event loop {name!r} (uvloop or asyncio)")


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """``asyncio.run`` on the selected loop."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
