"""UDP endpoints whose sockets are read on one shared tick.

Every participant in a call sends 50 datagrams a second, and the senders'
clocks spread them over time. An event loop that wakes up for each datagram
pays the wake-up (a poll system call, a context switch, a trip through the
loop) for each one: at 100 participants 5,000 times a second, more than the
work done on a silent participant's datagram (``python -m bench.floor
--sender spread`` measures both). Here the sockets are registered in one
selector that the loop polls every ``interval``: one wake-up covers every
participant's datagrams of that period. A datagram waits at most one
interval (10 ms by default, half that on average) before it is read.

The loop (``live_transcription.loop``) creates these endpoints for every
``create_datagram_endpoint`` call that binds a local address and has no
remote one, which is how aioice opens its host candidates. Connected
endpoints (TURN) go to the loop's own implementation.

Sending is immediate. A datagram the kernel will not take right now
(``EAGAIN``) is dropped and counted, as the network would drop it: media
must not queue behind a full socket buffer.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
from collections.abc import Callable
from typing import Any

RECEIVE_SIZE = 2048  # larger than any RTP, RTCP, STUN or DTLS datagram we take
MAX_PASSES = 16  # datagrams read from one socket in one tick, at most


_CLOSED_PROTOCOL = asyncio.DatagramProtocol()
"""What a closed transport points at instead of its protocol."""


class TickedUdpReader:
    """Reads every registered endpoint's socket each ``interval`` seconds.

    Each tick reads in passes: a pass polls the selector without waiting and
    reads one datagram from each ready socket; the tick ends when a pass
    finds nothing ready (or after ``MAX_PASSES``). So a socket with a backlog
    is drained, and no read ends in ``EAGAIN``. The timer runs only while
    an endpoint is registered."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        interval: float,
        on_send_dropped: Callable[[], None] = lambda: None,
    ) -> None:
        if interval <= 0:
            raise ValueError("the tick interval must be positive")
        self._loop = loop
        self.interval = interval
        self.on_send_dropped = on_send_dropped
        self._selector = selectors.DefaultSelector()
        self._timer: asyncio.TimerHandle | None = None
        self.ticks = 0
        self.datagrams = 0
        self.sends_dropped = 0

    @property
    def endpoints(self) -> int:
        return len(self._selector.get_map())

    def add(self, endpoint: TickedDatagramTransport) -> None:
        self._selector.register(endpoint.fileno, selectors.EVENT_READ, endpoint)
        if self._timer is None:
            self._timer = self._loop.call_later(self.interval, self._tick)

    def remove(self, endpoint: TickedDatagramTransport) -> None:
        self._selector.unregister(endpoint.fileno)
        if not self._selector.get_map() and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._selector.close()

    def _tick(self) -> None:
        self.ticks += 1
        # rescheduled first: an endpoint's handler may close endpoints
        self._timer = self._loop.call_later(self.interval, self._tick)
        select = self._selector.select
        for _ in range(MAX_PASSES):
            ready = select(0)
            if not ready:
                break
            for key, _events in ready:
                endpoint: TickedDatagramTransport = key.data
                if endpoint.read_one():
                    self.datagrams += 1


class TickedDatagramTransport(asyncio.DatagramTransport):
    """An ``asyncio.DatagramTransport`` over a bound, non-blocking socket,
    read by a ``TickedUdpReader``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        reader: TickedUdpReader,
    ) -> None:
        super().__init__(extra={"socket": sock, "sockname": sock.getsockname(), "peername": None})
        self._loop = loop
        self._sock = sock
        self.fileno = sock.fileno()
        self._protocol = protocol
        self._reader = reader
        self._closing = False
        self._recvfrom = sock.recvfrom

    def read_one(self) -> bool:
        """Read one datagram if there is one and hand it to the protocol."""
        if self._closing:
            return False
        try:
            data, addr = self._recvfrom(RECEIVE_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:  # e.g. an ICMP port unreachable from an earlier send
            self._protocol.error_received(exc)
            return False
        # looked up each time: the media layer re-routes it after ICE gathering
        self._protocol.datagram_received(data, addr)
        return True

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._reader.sends_dropped += 1
            self._reader.on_send_dropped()
        except OSError as exc:
            self._protocol.error_received(exc)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.DatagramProtocol)
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._reader.remove(self)
        self._loop.call_soon(self._finish_close)

    def abort(self) -> None:
        self.close()

    def _finish_close(self) -> None:
        try:
            self._protocol.connection_lost(None)
        finally:
            self._sock.close()
            # the protocol holds this transport: let go of it, so neither
            # waits for the cyclic garbage collector
            self._protocol = _CLOSED_PROTOCOL

    def get_write_buffer_size(self) -> int:
        return 0


async def create_ticked_endpoint(
    loop: asyncio.AbstractEventLoop,
    reader: TickedUdpReader,
    protocol_factory: Callable[[], asyncio.DatagramProtocol],
    local_addr: tuple[str, int],
    family: int = 0,
) -> tuple[TickedDatagramTransport, asyncio.DatagramProtocol]:
    """Bind a UDP socket to ``local_addr`` and read it on ``reader``'s tick."""
    infos = await loop.getaddrinfo(
        local_addr[0], local_addr[1], family=family, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP
    )
    if not infos:
        raise OSError(f"getaddrinfo({local_addr[0]!r}) returned nothing")
    error: OSError | None = None
    for info_family, kind, proto, _name, address in infos:
        sock = socket.socket(info_family, kind, proto)
        try:
            sock.setblocking(False)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        protocol = protocol_factory()
        transport = TickedDatagramTransport(loop, sock, protocol, reader)
        protocol.connection_made(transport)
        reader.add(transport)
        return transport, protocol
    assert error is not None
    raise error
