"""What one packet costs the sender, step by step (``python -m bench.lean_cost``).

The lean generator's choices rest on these figures (``bench/notes.md``, "The
lean generator"): CPU per packet of

* ``aiortc``: what aiortc's sender does per packet besides its coroutine
  step (an ``RtpPacket`` with MID and level extensions, ``serialize``,
  ``Session.protect``);
* ``build``: the lean header on a per-shape body (``Packetizer.packets``);
* ``protect``: pylibsrtp's ``Session.protect``; ``protect_fast``: the same C
  call with one preallocated buffer (``lean_bridge.FastProtect``);
* ``sendto``: one pre-protected datagram to a loopback socket (what every
  packet pays whatever was precomputed; the kernel's loopback delivery is
  part of it);

and the memory a whole protected period per stream would take (``--period-s``).
One JSON line on stdout. Single process, no event loop: run it on an idle
machine, a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable

from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from pylibsrtp import Policy, Session

from bench.lean_bridge import FastProtect
from bench.lean_packets import Packetizer, first_byte, make_bodies, pattern_plan
from bench.patterns import build_pattern

MID_ID, LEVEL_ID = 1, 2


def _session() -> Session:
    policy = Policy(key=os.urandom(30), ssrc_type=Policy.SSRC_ANY_OUTBOUND)
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return Session(policy)


def _cpu_per_item(run: Callable[[], int], rounds: int) -> float:
    """Best of ``rounds``: CPU microseconds per item ``run`` handled."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        items = run()
        best = min(best, (time.process_time() - started) / items * 1e6)
    return best


def measure(packets: int, rounds: int, period_s: float) -> dict[str, float]:
    pattern = build_pattern(3000, 1500, seed=1)
    plan = pattern_plan(pattern)
    bodies = make_bodies(pattern, mid="0", mid_id=MID_ID, level_id=LEVEL_ID)
    packetizer = Packetizer(0x1234, 111, 0, 0, first=first_byte(bodies, pattern))
    chosen = [bodies[plan.position(0, i)] for i in range(packets)]
    plain = packetizer.packets(chosen, 0)

    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=MID_ID, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
                RTCRtpHeaderExtensionParameters(
                    id=LEVEL_ID, uri="urn:ietf:params:rtp-hdrext:ssrc-audio-level"
                ),
            ]
        )
    )

    def aiortc_like() -> int:
        protect = _session().protect
        for i in range(packets):
            position = plan.position(0, i)
            packet = RtpPacket(payload_type=111, sequence_number=i & 0xFFFF, timestamp=i * 960)
            packet.ssrc = 0x1234
            packet.payload = pattern.payloads[position]
            packet.marker = 1
            packet.extensions.mid = "0"
            packet.extensions.audio_level = (False, pattern.levels[position])
            protect(packet.serialize(extensions))
        return packets

    def build() -> int:
        for first in range(0, packets, 10):
            packetizer.packets(chosen[first : first + 10], first)
        return packets

    def protect() -> int:
        session = _session()
        for packet in plain:
            session.protect(packet)
        return packets

    def protect_fast() -> int:
        fast = FastProtect(_session())
        for packet in plain:
            fast(packet)
        return packets

    fast = FastProtect(_session())
    protected = [fast(p) for p in plain]
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        receiver.setblocking(False)
        sender.setblocking(False)
        address = receiver.getsockname()

        def drain() -> None:
            try:
                while True:
                    receiver.recv(2048)
            except BlockingIOError:
                return

        def send() -> int:
            sendto = sender.sendto
            sent = 0
            for start in range(0, packets, 500):
                for packet in protected[start : start + 500]:
                    sendto(packet, address)
                    sent += 1
                drain()  # not counted apart: a few percent of the figure
            return sent

        figures = {
            "aiortc_us": _cpu_per_item(aiortc_like, rounds),
            "build_us": _cpu_per_item(build, rounds),
            "protect_us": _cpu_per_item(protect, rounds),
            "protect_fast_us": _cpu_per_item(protect_fast, rounds),
            "sendto_us": _cpu_per_item(send, rounds),
        }
    finally:
        receiver.close()
        sender.close()
    period_packets = round(period_s / 0.02)
    mean_size = sum(len(p) for p in protected) / len(protected)
    figures["period_mb_per_stream"] = period_packets * (mean_size + 33) / 2**20  # + a bytes object's header
    figures["mean_packet_bytes"] = mean_size
    return {k: round(v, 3) for k, v in figures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lean_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--period-s", type=float, default=120.0, help="the meeting mix' loop")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.packets, args.rounds, args.period_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
