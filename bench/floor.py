"""The floor under the per-packet cost: what one Python process pays to
receive N streams of 50 UDP datagrams a second with an event loop, doing
nothing with them (``--work none``), or reading the audio level and holding
the packet back as the service does for silence (``--work skip``).

    python -m bench.floor --streams 200 --seconds 20 --loop asyncio
    python -m bench.floor --streams 200 --seconds 20 --loop uvloop --work skip
    python -m bench.floor --streams 200 --loop uvloop --work skip --sender spread --tick-ms 0
    python -m bench.floor --streams 200 --loop uvloop --work skip --sender spread --tick-ms 10

``--sender burst`` sends every stream's datagram at once each 20 ms (the
receiver wakes up once for all); ``spread`` spaces the streams evenly over
the 20 ms, as independent senders do. ``--tick-ms`` is ``LT_UDP_TICK_MS``:
0 wakes up per datagram, otherwise the sockets are read on that tick.

A child process sends (one paced loop, plain sockets: cheaper than the
receiver); the parent receives and reads its own CPU time from /proc. The
result is CPU per stream in percent of one core: no receive path in that
process can cost less than this.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import socket
import time
from collections.abc import Callable

from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from live_transcription import loop as event_loop
from live_transcription.media.lean_receiver import AUDIO_LEVEL_URI
from live_transcription.media.silence_skip import SilenceSkipper

PACKETS_PER_SECOND = 50
LEVEL_ID = 1


def silent_packet(seq: int) -> bytes:
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(headerExtensions=[RTCRtpHeaderExtensionParameters(LEVEL_ID, AUDIO_LEVEL_URI)])
    )
    packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=960 * seq, ssrc=7)
    packet.extensions.audio_level = (False, 127)
    packet.payload = bytes(60)  # an encrypted Opus frame of quiet audio is this size
    return bytes(packet.serialize(extensions)) + bytes(10)  # + SRTP auth tag


def send(ports: list[int], seconds: float, spread: bool) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data = silent_packet(1)
    period = 1 / PACKETS_PER_SECOND
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < seconds:
        for index, port in enumerate(ports):
            if spread:
                time.sleep(max(0.0, start + (tick + index / len(ports)) * period - time.monotonic()))
            sock.sendto(data, ("127.0.0.1", port))
        tick += 1
        time.sleep(max(0.0, start + tick * period - time.monotonic()))


class Gate:
    speaking = False
    silence_level_dbov = 50
    preroll_packets = 12
    kernel_drop_level = None


class Receiver(asyncio.DatagramProtocol):
    def __init__(self, handle: Callable[[bytes, int], None]) -> None:
        self.handle = handle
        self.count = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.count += 1
        self.handle(data, 1)


def cpu_seconds() -> float:
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def receive(streams: int, seconds: float, work: str, spread: bool) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    receivers: list[Receiver] = []
    transports = []
    for _ in range(streams):
        if work == "skip":
            skipper = SilenceSkipper(Gate(), now=time.monotonic)
            skipper.attach(lambda data, component: None)
            skipper.configure(LEVEL_ID, frozenset({111}))
            handle = skipper.datagram
        else:
            handle = _nothing
        receiver = Receiver(handle)
        transport, _ = await loop.create_datagram_endpoint(
            functools.partial(_same, receiver), local_addr=("127.0.0.1", 0)
        )
        transports.append(transport)
        receivers.append(receiver)
    ports = [t.get_extra_info("sockname")[1] for t in transports]
    sender = multiprocessing.get_context("spawn").Process(target=send, args=(ports, seconds + 4, spread))
    sender.start()
    await asyncio.sleep(2)  # the sender is up and paced
    before_cpu, before_wall = cpu_seconds(), time.monotonic()
    before_count = sum(r.count for r in receivers)
    await asyncio.sleep(seconds)
    cpu = cpu_seconds() - before_cpu
    wall = time.monotonic() - before_wall
    received = sum(r.count for r in receivers) - before_count
    sender.join()
    for transport in transports:
        transport.close()
    return {
        "streams": streams,
        "packets_per_second": received / wall,
        "cpu_percent": 100 * cpu / wall,
        "cpu_percent_per_stream": 100 * cpu / wall / streams,
        "cpu_us_per_packet": 1e6 * cpu / max(received, 1),
    }


def _nothing(data: bytes, component: int) -> None:
    pass


def _same(receiver: Receiver) -> Receiver:
    return receiver


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--work", choices=("none", "skip"), default="none")
    parser.add_argument("--sender", choices=("burst", "spread"), default="burst")
    parser.add_argument("--tick-ms", type=int, default=0, help="LT_UDP_TICK_MS (0: a wake-up per datagram)")
    args = parser.parse_args()
    work = receive(args.streams, args.seconds, args.work, args.sender == "spread")
    result = event_loop.run(work, args.loop, udp_tick_ms=args.tick_ms)
    head = {"loop": args.loop, "work": args.work, "sender": args.sender, "tick_ms": args.tick_ms}
    print(json.dumps(head | {k: round(v, 3) for k, v in result.items()}))


if __name__ == "__main__":
    main()
