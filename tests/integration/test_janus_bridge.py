"""JanusBridge against a real Janus: publishers' audio reaches aiortc subscribers."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from live_transcription.sim.bridge import JanusBridge
from live_transcription.sim.janus import JanusError
from live_transcription.sim.publisher import SAMPLE_RATE, load_wav
from tests.janus_support import (  # noqa: F401 (fixtures)
    bridge_fixture,
    chirp,
    chirp_wav,
    janus_fixture,
    ncc_peak,
    receive_audio,
)
from tests.waiting import until

pytestmark = pytest.mark.janus

UP = (400.0, 2400.0)
DOWN = (2400.0, 400.0)
MATCH = 0.6  # Opus keeps a clean chirp well above this
MISMATCH = 0.3


async def test_subscriber_receives_the_publishers_audio(janus_bridge: JanusBridge, tmp_path: Path) -> None:
    sweep = chirp_wav(tmp_path / "up.wav", *UP)
    await janus_bridge.add_publisher("speaker-a", tmp_path / "up.wav", loop=True)

    audio = await receive_audio(janus_bridge, "bot", "speaker-a", seconds=2.0)

    assert ncc_peak(audio, sweep) > MATCH
    assert ncc_peak(audio, chirp(*DOWN)) < MISMATCH
    (sub,) = janus_bridge.subscriptions.values()
    assert sub.handle.webrtcup.is_set(), "Janus never reported the subscriber PeerConnection up"


async def test_two_publishers_each_reach_their_own_subscription(
    janus_bridge: JanusBridge, tmp_path: Path
) -> None:
    up = chirp_wav(tmp_path / "up.wav", *UP)
    down = chirp_wav(tmp_path / "down.wav", *DOWN)
    await janus_bridge.add_publisher("speaker-a", tmp_path / "up.wav", loop=True)
    await janus_bridge.add_publisher("speaker-b", tmp_path / "down.wav", loop=True)

    from_a = await receive_audio(janus_bridge, "bot", "speaker-a", seconds=2.0)
    from_b = await receive_audio(janus_bridge, "bot", "speaker-b", seconds=2.0)

    assert ncc_peak(from_a, up) > MATCH
    assert ncc_peak(from_a, down) < MISMATCH
    assert ncc_peak(from_b, down) > MATCH
    assert ncc_peak(from_b, up) < MISMATCH
    assert {s.publisher for s in janus_bridge.subscriptions.values()} == {"speaker-a", "speaker-b"}
    participants = await janus_bridge.list_participants()
    assert sorted(str(p["display"]) for p in participants) == ["speaker-a", "speaker-b"]


async def test_trickled_candidates_connect(janus_bridge: JanusBridge, tmp_path: Path) -> None:
    sweep = chirp_wav(tmp_path / "up.wav", *UP)
    await janus_bridge.add_publisher("speaker-a", tmp_path / "up.wav", loop=True)

    # The answer carries no candidate: media can only flow through `candidate`.
    audio = await receive_audio(janus_bridge, "bot", "speaker-a", seconds=2.0, trickle=True)

    assert ncc_peak(audio, sweep) > MATCH


async def test_publisher_speaks_only_when_told_to(janus_bridge: JanusBridge, tmp_path: Path) -> None:
    sweep = chirp_wav(tmp_path / "up.wav", *UP)
    publisher = await janus_bridge.add_publisher(
        "speaker-a", tmp_path / "up.wav", loop=False, autoplay=False, start_delay_s=0.2
    )

    audio = await receive_audio(
        janus_bridge,
        "bot",
        "speaker-a",
        seconds=2.0,
        skip_seconds=0.0,
        on_first_frame=publisher.track.play,
    )

    first_frame = audio[:960]  # sent before play(): silence
    assert float(abs(first_frame).max()) < 0.01
    assert ncc_peak(audio, sweep) > MATCH
    await until(publisher.track.finished.is_set, 30.0, "the play-once track never finished")


async def test_close_subscriber_leaves_no_janus_handle(janus_bridge: JanusBridge, tmp_path: Path) -> None:
    chirp_wav(tmp_path / "up.wav", *UP)
    chirp_wav(tmp_path / "down.wav", *DOWN)
    await janus_bridge.add_publisher("speaker-a", tmp_path / "up.wav", loop=True)
    await janus_bridge.add_publisher("speaker-b", tmp_path / "down.wav", loop=True)
    await janus_bridge.request_offer("bot", "speaker-a")
    await janus_bridge.request_offer("bot", "speaker-b")
    await janus_bridge.request_offer("other-bot", "speaker-a")
    bot_handles = [s.handle.handle_id for s in janus_bridge.subscriptions.values() if s.subscriber == "bot"]
    assert len(bot_handles) == 2
    probe = {"request": "listparticipants", "room": janus_bridge.room}
    for handle_id in bot_handles:  # the probe works while the handle exists
        reply = await janus_bridge.client.request("message", handle_id=handle_id, body=probe)
        assert reply.kind == "success"

    await janus_bridge.close_subscriber("bot")

    for handle_id in bot_handles:
        reply = await janus_bridge.client.request("message", handle_id=handle_id, body=probe)
        assert reply.kind == "error"
        assert reply.raw["error"]["code"] == 459  # JANUS_ERROR_HANDLE_NOT_FOUND
        assert handle_id not in janus_bridge.client.handles
    assert [s.subscriber for s in janus_bridge.subscriptions.values()] == ["other-bot"]


async def test_request_offer_for_a_session_without_media_is_a_lookup_error(
    janus_bridge: JanusBridge,
) -> None:
    with pytest.raises(LookupError):
        await janus_bridge.request_offer("bot", "nobody")
    assert janus_bridge.subscriptions == {}


async def test_answer_and_candidate_for_an_unknown_sid_are_lookup_errors(
    janus_bridge: JanusBridge,
) -> None:
    with pytest.raises(LookupError):
        await janus_bridge.answer("bot", "speaker-a", "no-such-sid", "v=0\r\n")
    with pytest.raises(LookupError):
        await janus_bridge.candidate("bot", "speaker-a", "no-such-sid", {"completed": True})


async def test_removed_publisher_leaves_the_room(janus_bridge: JanusBridge, tmp_path: Path) -> None:
    chirp_wav(tmp_path / "up.wav", *UP)
    await janus_bridge.add_publisher("speaker-a", tmp_path / "up.wav", loop=True)
    assert [p["display"] for p in await janus_bridge.list_participants()] == ["speaker-a"]

    await janus_bridge.remove_publisher("speaker-a")

    assert await janus_bridge.list_participants() == []
    with pytest.raises(LookupError):
        await janus_bridge.request_offer("bot", "speaker-a")


async def test_a_second_request_for_the_same_pair_replaces_the_first(
    janus_bridge: JanusBridge, tmp_path: Path
) -> None:
    chirp_wav(tmp_path / "up.wav", *UP)
    await janus_bridge.add_publisher("speaker-a", tmp_path / "up.wav", loop=True)
    first_sid, _ = await janus_bridge.request_offer("bot", "speaker-a")
    first_handle = janus_bridge.subscriptions[first_sid].handle

    second_sid, offer = await janus_bridge.request_offer("bot", "speaker-a")

    assert second_sid != first_sid
    assert "m=audio" in offer
    assert list(janus_bridge.subscriptions) == [second_sid]
    with pytest.raises(JanusError):
        await first_handle.message({"request": "listparticipants", "room": janus_bridge.room})


async def test_espeak_speech_passes_through_janus(janus_bridge: JanusBridge, tmp_path: Path) -> None:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        reason = "SPEECH TEST SKIPPED: espeak-ng is not installed (`apt-get install espeak-ng`)"
        print(f"\n{reason}", file=sys.stderr)
        pytest.skip(reason)
    wav = tmp_path / "speech.wav"  # 22.05 kHz: the publisher resamples to 48 kHz
    proc = await asyncio.create_subprocess_exec(espeak, "-w", str(wav), "Captions for everyone in the call")
    assert await proc.wait() == 0
    source = load_wav(wav).astype(np.float64) / 32768.0
    assert len(source) < 2.5 * SAMPLE_RATE  # one loop must fit in what is received
    # The loudest half second of the utterance is the pattern to find.
    half = SAMPLE_RATE // 2
    energy = np.convolve(source * source, np.ones(half), mode="valid")
    start = int(np.argmax(energy))
    template = source[start : start + half]
    await janus_bridge.add_publisher("speaker-a", wav, loop=True)

    audio = await receive_audio(janus_bridge, "bot", "speaker-a", seconds=3.0)

    assert ncc_peak(audio, template) > MATCH
    assert ncc_peak(audio, chirp(*UP)) < MISMATCH
