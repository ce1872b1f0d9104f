"""CPU per voiced packet on the service's receive path, in one process,
without sockets or an event loop: what each RTP packet of a speaker costs
from the datagram to the 80 ms frame handed to the STT stream.

    python -m bench.packet_path
    python -m bench.packet_path --packets 20000 --rounds 7

The path is the service's own: ``SilenceSkipper.datagram`` (level read from
the encrypted header) -> ``AudioFastPath`` (libsrtp unprotect with a real
SRTP session) -> ``LeanTap.handle_decrypted`` -> ``ReceivePeer``'s hand-over
-> ``SpeakerAudio.feed`` (ordering, gate, libopus decode to 24 kHz, framing).
The packets are SRTP-protected RTP of a voiced signal (Opus, 48 kHz, 20 ms,
32 kbit/s, audio level extension), made before the clock starts.

Printed per packet, best of ``--rounds`` (CPU time, microseconds): the whole
path, libsrtp's unprotect alone and libopus' decode alone (each through its
Python binding, as the path calls it); the rest is the path's own Python.
The event loop's share (waking up, reading the socket) is not in it:
``bench.floor`` measures that.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from aiortc import RTCRtpReceiver
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from pylibsrtp import Policy, Session

from live_transcription.audio.opus import OpusDecoder, OpusEncoder
from live_transcription.audio.pipeline import SpeakerAudio
from live_transcription.media.lean_receiver import AUDIO_LEVEL_URI, AudioFastPath, LeanTap
from live_transcription.media.packet import OpusRtp
from live_transcription.media.rtp_level import payload_bounds
from live_transcription.media.silence_skip import SilenceSkipper

LEVEL_ID = 1
PAYLOAD_TYPE = 111
SSRC = 0x1234
KEY = bytes(range(30))  # AES_CM_128 key and salt


class _Receiver:
    """What ``LeanTap`` asks of aiortc's receiver."""

    _enabled = True


class _Dtls:
    """What ``AudioFastPath`` asks of aiortc's DTLS transport."""

    def __init__(self, session: Session) -> None:
        self._rx_srtp = session


def voiced_packets(count: int) -> list[bytes]:
    """``count`` SRTP packets of a voiced signal with the audio level set."""
    rate = 48_000
    t = np.arange(rate * 4) / rate
    rng = np.random.default_rng(1)
    signal = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    pcm = (signal + 0.03 * rng.standard_normal(t.size)).astype(np.float32)
    encoder = OpusEncoder(rate, 1, bitrate=32_000)
    payloads = [encoder.encode(pcm[i : i + 960]) for i in range(0, pcm.size - 959, 960)]
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(headerExtensions=[RTCRtpHeaderExtensionParameters(LEVEL_ID, AUDIO_LEVEL_URI)])
    )
    sender = Session(Policy(key=KEY, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    packets = []
    for seq in range(count):
        packet = RtpPacket(
            payload_type=PAYLOAD_TYPE, sequence_number=seq & 0xFFFF, timestamp=960 * seq, ssrc=SSRC
        )
        packet.extensions.audio_level = (True, 20)
        packet.payload = payloads[seq % len(payloads)]
        packets.append(sender.protect(bytes(packet.serialize(extensions))))
    return packets


def _receiver_session() -> Session:
    return Session(Policy(key=KEY, ssrc_type=Policy.SSRC_ANY_INBOUND))


def _cpu() -> float:
    return time.process_time()


def _timed(packets: list[bytes], run: Callable[[bytes], Any]) -> float:
    start = _cpu()
    for data in packets:
        run(data)
    return (_cpu() - start) / len(packets) * 1e6


def whole_path(packets: list[bytes]) -> tuple[float, int]:
    frames: list[int] = []
    audio = SpeakerAudio(on_frame=lambda frame: frames.append(frame.size), on_speech_end=lambda: None)
    skipper = SilenceSkipper(audio, now=time.monotonic)
    receiver = _Receiver()
    last_rtp = [0.0]

    def handle_rtp(packet: OpusRtp) -> None:  # ReceivePeer._handle_rtp
        last_rtp[0] = packet.arrival_time
        audio.feed(packet)

    tap = LeanTap(cast(RTCRtpReceiver, receiver), handle_rtp, time.monotonic, skipper)
    tap._opus_types = frozenset({PAYLOAD_TYPE})
    tap._level_id = LEVEL_ID
    tap.started = True
    dtls = _Dtls(_receiver_session())
    fallback = _refuse
    skipper.attach(fallback, audio=AudioFastPath(cast(RTCDtlsTransport, dtls), fallback, tap))
    skipper.configure(LEVEL_ID, frozenset({PAYLOAD_TYPE}))
    datagram = skipper.datagram
    us = _timed(packets, lambda data: datagram(data, 1))
    assert tap.fast_packets == len(packets), "every packet must take the fast path"
    audio.close()
    return us, len(frames)


def _refuse(data: bytes, component: int) -> None:
    raise AssertionError("a voiced packet left the fast path")


def unprotect_only(packets: list[bytes]) -> float:
    unprotect = _receiver_session().unprotect
    return _timed(packets, unprotect)


def decode_only(packets: list[bytes]) -> float:
    session = _receiver_session()
    payloads = []
    for data in packets:
        plain = session.unprotect(data)
        bounds = payload_bounds(plain)
        assert bounds is not None
        payloads.append(plain[bounds[0] : bounds[1]])
    decoder = OpusDecoder()
    decode = decoder.decode
    start = _cpu()
    for payload in payloads:
        decode(payload)
    us = (_cpu() - start) / len(payloads) * 1e6
    decoder.close()
    return us


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--packets", type=int, default=20_000, help="packets per round")
    parser.add_argument("--rounds", type=int, default=5, help="the best round is reported")
    args = parser.parse_args()
    packets = voiced_packets(args.packets)
    whole, unprotect, decode = [], [], []
    frames = 0
    for _ in range(args.rounds):
        us, frames = whole_path(packets)
        whole.append(us)
        unprotect.append(unprotect_only(packets))
        decode.append(decode_only(packets))
    best = {"whole_path_us": min(whole), "srtp_unprotect_us": min(unprotect), "opus_decode_us": min(decode)}
    best["python_path_us"] = best["whole_path_us"] - best["srtp_unprotect_us"] - best["opus_decode_us"]
    print(
        json.dumps(
            {"packets": args.packets, "frames_per_round": frames, "cpu": os.cpu_count()}
            | {k: round(v, 2) for k, v in best.items()}
        )
    )


if __name__ == "__main__":
    main()
