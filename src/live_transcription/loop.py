"""Which event loop runs the service, and how it reads UDP.

uvloop (libuv, in C) by default: receiving a UDP datagram through the
default asyncio loop costs about 22 us of CPU before any of our code runs,
uvloop about 5 us (``python -m bench.floor``), and every participant in a
call sends 50 of them a second. ``LT_EVENT_LOOP=asyncio`` selects the
standard loop (for debugging, or where uvloop is not available).

On either loop, the UDP sockets of the WebRTC connections are read on a
shared tick of ``LT_UDP_TICK_MS`` (default 10 ms) rather than with one
wake-up per datagram (``media/ticked_udp.py`` says why); 0 turns that off.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from live_transcription.media.ticked_udp import TickedUdpReader, create_ticked_endpoint

T = TypeVar("T")

DEFAULT_UDP_TICK_MS = 10


class TickedUdpLoop(asyncio.AbstractEventLoop):
    """Mixed into a loop class: unconnected UDP endpoints bound to a local
    address (aioice's host candidates) are read on ``udp_reader``'s tick."""

    udp_reader: TickedUdpReader

    async def create_datagram_endpoint(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.DatagramProtocol],
        local_addr: tuple[str, int] | None = None,
        remote_addr: tuple[str, int] | None = None,
        *,
        family: int = 0,
        proto: int = 0,
        flags: int = 0,
        **options: Any,
    ) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]:
        plain = not options and not flags and proto in (0, socket.IPPROTO_UDP)
        if local_addr is not None and remote_addr is None and plain:
            return await create_ticked_endpoint(self, self.udp_reader, protocol_factory, local_addr, family)
        return await super().create_datagram_endpoint(
            protocol_factory, local_addr, remote_addr, family=family, proto=proto, flags=flags, **options
        )

    def close(self) -> None:
        self.udp_reader.close()
        super().close()


def loop_factory(
    name: str,
    udp_tick_ms: int = DEFAULT_UDP_TICK_MS,
    on_udp_send_dropped: Callable[[], None] = lambda: None,
) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of the named loop (``uvloop`` or ``asyncio``), reading UDP on
    a tick of ``udp_tick_ms`` (0: one wake-up per datagram, the loop's own)."""
    base = _base_loop(name)
    if udp_tick_ms < 0:
        raise ValueError("udp_tick_ms must be >= 0")
    if udp_tick_ms == 0:
        return base
    ticked = _ticked_class(base)

    def new_loop() -> asyncio.AbstractEventLoop:
        loop = ticked()
        loop.udp_reader = TickedUdpReader(loop, udp_tick_ms / 1000, on_udp_send_dropped)
        return loop

    return new_loop


def _base_loop(name: str) -> type[asyncio.AbstractEventLoop]:
    if name == "asyncio":
        return asyncio.SelectorEventLoop
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 - only when selected

        return uvloop.Loop
    raise ValueError(f"unknown event loop {name!r} (uvloop or asyncio)")


_ticked_classes: dict[str, type[TickedUdpLoop]] = {}


def _ticked_class(base: type[asyncio.AbstractEventLoop]) -> type[TickedUdpLoop]:
    name = f"TickedUdp_{base.__module__}.{base.__name__}"
    if name not in _ticked_classes:
        _ticked_classes[name] = type(name, (TickedUdpLoop, base), {})
    return _ticked_classes[name]


def run(
    main: Coroutine[Any, Any, T],
    loop: str,
    udp_tick_ms: int = DEFAULT_UDP_TICK_MS,
    on_udp_send_dropped: Callable[[], None] = lambda: None,
) -> T:
    """``asyncio.run`` on the selected loop."""
    with asyncio.Runner(loop_factory=loop_factory(loop, udp_tick_ms, on_udp_send_dropped)) as runner:
        return runner.run(main)
