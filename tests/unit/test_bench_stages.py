"""CPU by stage: which stage a profiled stack belongs to, and the split."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bench.analysis import parse_collapsed
from bench.stages import (
    CAPTION,
    DECODE,
    EVENT_LOOP,
    OTHER,
    RECEIVE,
    ROOMS,
    STAGES,
    STT,
    WEBSOCKETS,
    cpu_by_stage,
    split,
    stage_of,
)

LOOP = "run_forever (asyncio/base_events.py)"
TICK = "TickedUdp._tick (live_transcription/media/ticked_udp.py)"
RECEIVER = "LeanReceiver.datagram (live_transcription/media/lean_receiver.py)"
FEED = "SpeakerAudio.feed (live_transcription/audio/pipeline.py)"
DECODE_CALL = "OpusDecoder.decode (live_transcription/audio/opus.py)"
SPEAKER = "Speaker._on_frame (live_transcription/rooms/speaker.py)"
PUSH = "RemoteStream.push (live_transcription/stt/remote.py)"


@pytest.mark.parametrize(
    ("frames", "stage"),
    [
        ((LOOP, TICK, RECEIVER, "unprotect (pylibsrtp/__init__.py)"), RECEIVE),
        ((LOOP, TICK, RECEIVER, FEED, DECODE_CALL), DECODE),
        # the innermost stage wins: framing calls on into the STT client
        ((LOOP, TICK, RECEIVER, FEED, SPEAKER, PUSH, "astype (numpy/core.py)"), STT),
        (
            (
                LOOP,
                "RemoteStream._sender (live_transcription/stt/remote.py)",
                "send (websockets/protocol.py)",
            ),
            STT,
        ),
        ((LOOP, "Outbox.send (live_transcription/hpb/outbox.py)", "write (ssl.py)"), CAPTION),
        ((LOOP, "CaptionBuilder.add (live_transcription/captions/builder.py)"), CAPTION),
        ((LOOP, "Room._run (live_transcription/rooms/room.py)"), ROOMS),
        ((LOOP, "data_received (websockets/asyncio/connection.py)"), WEBSOCKETS),
        ((LOOP, "select (selectors.py)"), EVENT_LOOP),
        (("Runner.run (asyncio/runners.py)",), EVENT_LOOP),
        ((LOOP, "randbytes (random.py)"), OTHER),
        # native frames with no path of ours inherit from the Python caller
        ((LOOP, TICK, RECEIVER, FEED, DECODE_CALL, "opus_decode (libopus.so.0)"), DECODE),
        ((LOOP, RECEIVER, "recvfrom (libc.so.6)"), RECEIVE),
    ],
)
def test_a_stack_belongs_to_the_stage_of_its_innermost_named_frame(
    frames: tuple[str, ...], stage: str
) -> None:
    assert stage_of(frames) == stage


def test_split_shares_every_stage_and_adds_up_to_one() -> None:
    stacks = parse_collapsed(
        [
            f"{LOOP};{TICK};{RECEIVER} 30",
            f"{LOOP};{TICK};{RECEIVER};{FEED};{DECODE_CALL} 50",
            f"{LOOP};{PUSH} 20",
        ]
    )
    shares = split(stacks)
    assert set(shares) == set(STAGES)
    assert shares[RECEIVE] == pytest.approx(0.3)
    assert shares[DECODE] == pytest.approx(0.5)
    assert shares[STT] == pytest.approx(0.2)
    assert math.fsum(shares.values()) == pytest.approx(1.0)


def test_split_of_nothing_is_all_zero() -> None:
    assert set(split({}).values()) == {0.0}


def test_cpu_by_stage_divides_the_measured_cpu_by_the_count() -> None:
    per = cpu_by_stage({RECEIVE: 0.25, DECODE: 0.75}, cpu_percent=40.0, per=100)
    assert per == {RECEIVE: pytest.approx(0.1), DECODE: pytest.approx(0.3)}
    assert cpu_by_stage({RECEIVE: 1.0}, cpu_percent=40.0, per=0) == {RECEIVE: 0.0}


def test_the_profile_command_renders_a_recording_by_stage() -> None:
    from bench.profile import record_command, render

    text = render(
        [f"{LOOP};{TICK};{RECEIVER} 3", "Runner.run (asyncio/runners.py) 1"], cpu_percent=40.0, per=10
    )
    assert "4 samples" in text
    assert "| receive | 75.0 % | 3.0000 |" in text
    assert "| event loop itself | 25.0 % | 1.0000 |" in text
    command = record_command(42, 0.4, "raw", Path("/tmp/x"), native=True)
    assert command[1:4] == ["record", "--pid", "42"]
    assert "--native" in command
    assert command[command.index("--duration") + 1] == "1"
