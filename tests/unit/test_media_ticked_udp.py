"""UDP endpoints read on a shared tick. Ticks are driven by hand here (the
reader's own timer is set far in the future): loopback UDP has queued a
datagram by the time ``sendto`` returns, so each tick's work is exact."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvloop

from live_transcription import loop as event_loop
from live_transcription.config import ConfigError, load_settings
from live_transcription.media.ticked_udp import (
    MAX_PASSES,
    TickedDatagramTransport,
    TickedUdpReader,
    create_ticked_endpoint,
)
from tests.waiting import until

NEVER = 3600.0


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.errors: list[Exception] = []
        self.lost = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.datagrams.append(data)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def endpoint(reader: TickedUdpReader) -> tuple[TickedDatagramTransport, Collect]:
    transport, protocol = await create_ticked_endpoint(
        asyncio.get_running_loop(), reader, Collect, ("127.0.0.1", 0)
    )
    assert isinstance(protocol, Collect)
    return transport, protocol


async def test_datagrams_wait_for_the_tick_and_a_backlog_is_drained_within_bounds() -> None:
    reader = TickedUdpReader(asyncio.get_running_loop(), NEVER)
    a, at_a = await endpoint(reader)
    b, at_b = await endpoint(reader)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(MAX_PASSES + 4):
            sender.sendto(b"a%d" % i, a.get_extra_info("sockname"))
        sender.sendto(b"b0", b.get_extra_info("sockname"))
        assert at_a.datagrams == [] and at_b.datagrams == []  # nothing before a tick
        reader._tick()
        assert at_a.datagrams == [b"a%d" % i for i in range(MAX_PASSES)]  # at most MAX_PASSES
        assert at_b.datagrams == [b"b0"]
        reader._tick()
        assert at_a.datagrams == [b"a%d" % i for i in range(MAX_PASSES + 4)]  # in order
        assert reader.datagrams == MAX_PASSES + 5 and reader.ticks == 2
        reader._tick()  # nothing ready: nothing read, nothing raised
        assert reader.datagrams == MAX_PASSES + 5
    finally:
        sender.close()
        a.close()
        b.close()
        reader.close()


async def test_sending_goes_out_at_once() -> None:
    reader = TickedUdpReader(asyncio.get_running_loop(), NEVER)
    a, _ = await endpoint(reader)
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind(("127.0.0.1", 0))
    plain.settimeout(5)
    try:
        a.sendto(b"hello", plain.getsockname())
        data, addr = plain.recvfrom(100)
        assert data == b"hello" and addr == a.get_extra_info("sockname")
    finally:
        plain.close()
        a.close()
        reader.close()


async def test_closing_unregisters_closes_the_socket_and_stops_the_timer() -> None:
    reader = TickedUdpReader(asyncio.get_running_loop(), NEVER)
    a, at_a = await endpoint(reader)
    b, _ = await endpoint(reader)
    sock = a.get_extra_info("socket")
    assert reader.endpoints == 2 and reader._timer is not None
    a.close()
    a.close()  # twice is harmless
    assert a.is_closing() and reader.endpoints == 1
    assert await at_a.lost is None
    assert sock.fileno() == -1
    a.sendto(b"after close", ("127.0.0.1", 9))  # ignored
    b.abort()
    assert reader.endpoints == 0 and reader._timer is None
    reader.close()


class FullSocket(socket.socket):
    def sendto(self, *args: Any) -> int:
        raise BlockingIOError

    def recvfrom(self, *args: Any) -> tuple[bytes, Any]:
        raise ConnectionRefusedError


async def test_a_full_send_buffer_drops_and_counts_and_receive_errors_reach_the_protocol() -> None:
    dropped: list[int] = []
    reader = TickedUdpReader(asyncio.get_running_loop(), NEVER, on_send_dropped=lambda: dropped.append(1))
    sock = FullSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    protocol = Collect()
    transport = TickedDatagramTransport(asyncio.get_running_loop(), sock, protocol, reader)
    try:
        transport.sendto(b"x", ("127.0.0.1", 9))
        transport.sendto(b"y", ("127.0.0.1", 9))
        assert reader.sends_dropped == 2 and len(dropped) == 2
        assert not transport.read_one()
        assert [type(e) for e in protocol.errors] == [ConnectionRefusedError]
    finally:
        sock.close()
        reader.close()


async def test_the_loop_gives_ticked_endpoints_to_bound_unconnected_sockets_only() -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, event_loop.TickedUdpLoop)  # the suite runs on the service's loop
    bound, protocol = await loop.create_datagram_endpoint(Collect, local_addr=("127.0.0.1", 0))
    connected, _ = await loop.create_datagram_endpoint(Collect, remote_addr=bound.get_extra_info("sockname"))
    try:
        assert isinstance(bound, TickedDatagramTransport)
        assert not isinstance(connected, TickedDatagramTransport)  # TURN's kind: the loop's own
        connected.sendto(b"through the tick")
        assert isinstance(protocol, Collect)
        await until(lambda: bool(protocol.datagrams))  # the loop's own timer ticks (10 ms)
        assert protocol.datagrams == [b"through the tick"]
    finally:
        bound.close()
        connected.close()


async def running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_tick_interval_and_event_loop_are_chosen_by_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LT_UDP_TICK_MS", raising=False)
    assert load_settings().udp_tick_ms == 10
    ticked = event_loop.run(running_loop(), "uvloop")
    assert isinstance(ticked, uvloop.Loop) and isinstance(ticked, event_loop.TickedUdpLoop)
    assert ticked.udp_reader.interval == 0.01
    plain = event_loop.run(running_loop(), "asyncio", udp_tick_ms=0)
    assert not isinstance(plain, event_loop.TickedUdpLoop | uvloop.Loop)
    with pytest.raises(ConfigError, match="LT_UDP_TICK_MS"):
        load_settings(LT_UDP_TICK_MS="-1")
    with pytest.raises(ValueError, match="positive"):
        TickedUdpReader(ticked, 0)
