"""The Modal and moshi-server protocol cores: typed events, never a crash."""

from __future__ import annotations

import json

import msgpack
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from live_transcription.stt.modal import ModalProtocol
from live_transcription.stt.moshi import MoshiProtocol
from live_transcription.stt.wire import (
    Ignored,
    Padding,
    SendMarker,
    ServerError,
    ServerEvent,
    ServerMarker,
    ServerPause,
    ServerProgress,
    ServerReady,
    ServerWord,
)

EVENT_TYPES = (
    ServerWord,
    ServerPause,
    ServerReady,
    ServerMarker,
    ServerProgress,
    ServerError,
    Ignored,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def typed(events: list[ServerEvent]) -> bool:
    return all(isinstance(event, EVENT_TYPES) for event in events)


def test_current_modal_tokens_are_whole_words() -> None:
    protocol = ModalProtocol()
    out = [protocol.parse(json.dumps({"type": "token", "text": t})) for t in ("Hello", "world.")]
    assert out == [[ServerWord("Hello")], [ServerWord("world.")]]


def test_legacy_modal_pieces_join_and_vad_end_pauses() -> None:
    protocol = ModalProtocol()
    pieces = [" Hel", "lo", " world", "."]
    out = [protocol.parse(json.dumps({"type": "token", "text": p}))[0] for p in pieces]
    assert out == [
        ServerWord("Hel"),
        ServerWord("lo", joins_previous=True),
        ServerWord("world"),
        ServerWord(".", joins_previous=True),
    ]
    assert protocol.parse('{"type":"vad_end"}') == [ServerPause()]
    assert protocol.parse('{"type":"ping"}') == []
    assert protocol.parse('{"type":"error","message":"boom"}') == [ServerError("boom")]
    protocol.reset()
    assert protocol.parse('{"type":"token","text":"new"}') == [ServerWord("new")]


def test_modal_audio_is_raw_float32_le() -> None:
    frame = np.linspace(-1, 1, 1920, dtype=np.float32)
    data = ModalProtocol().encode_audio(frame)
    assert len(data) == 7680
    assert np.array_equal(np.frombuffer(data, dtype="<f4"), frame)
    assert ModalProtocol().flush_plan(1) == [Padding(13)]
    # quiet frames the speech already ended with count toward the >= 1 s
    assert ModalProtocol().flush_plan(1, quiet_frames=8) == [Padding(5)]
    assert ModalProtocol().flush_plan(1, quiet_frames=20) == [Padding(0)]


def test_modal_unknown_and_broken_messages_are_ignored() -> None:
    protocol = ModalProtocol()
    for message in (b"\xff\xfe", "{", "[1]", '{"type":"weird"}', '{"type":"token","text":3}'):
        events = protocol.parse(message)
        assert len(events) == 1 and isinstance(events[0], Ignored)


@given(st.binary(max_size=200))
def test_modal_parser_survives_any_bytes(message: bytes) -> None:
    assert typed(ModalProtocol().parse(message))


@given(json_values)
def test_modal_parser_survives_any_json(value: object) -> None:
    assert typed(ModalProtocol().parse(json.dumps(value)))


@given(st.dictionaries(st.sampled_from(["type", "text", "message"]), json_values, max_size=3))
def test_modal_parser_survives_near_miss_messages(value: dict[str, object]) -> None:
    assert typed(ModalProtocol().parse(json.dumps(value)))


def pack(message: dict[str, object]) -> bytes:
    packed: bytes = msgpack.packb(message)
    return packed


def test_moshi_messages() -> None:
    protocol = MoshiProtocol()
    assert protocol.parse(pack({"type": "Ready"})) == [ServerReady()]
    assert protocol.parse(pack({"type": "Word", "text": "hi", "start_time": 1.2})) == [
        ServerWord("hi", start_seconds=1.2)
    ]
    assert protocol.parse(pack({"type": "EndWord", "stop_time": 1.5})) == []
    assert protocol.parse(pack({"type": "Marker", "id": 7})) == [ServerMarker(7)]
    error = protocol.parse(pack({"type": "Error", "message": "no free channels"}))
    assert error == [ServerError("no free channels", capacity=True)]


def test_moshi_pause_is_reported_once_per_pause() -> None:
    protocol = MoshiProtocol()

    def step(index: int, pause: float) -> list[ServerEvent]:
        return protocol.parse(
            pack({"type": "Step", "step_idx": index, "prs": [0, 0, pause, 0], "buffered_pcm": 0})
        )

    assert step(0, 0.1) == [ServerProgress(1)]
    assert step(1, 0.9) == [ServerProgress(2), ServerPause()]
    assert step(2, 0.95) == [ServerProgress(3)]
    assert step(3, 0.2) == [ServerProgress(4)]
    assert step(4, 0.7) == [ServerProgress(5), ServerPause()]


def test_moshi_encoding_and_flush_plan() -> None:
    protocol = MoshiProtocol()
    frame = np.full(1920, 0.25, dtype=np.float32)
    audio = msgpack.unpackb(protocol.encode_audio(frame))
    assert audio["type"] == "Audio" and len(audio["pcm"]) == 1920 and audio["pcm"][0] == 0.25
    assert msgpack.unpackb(protocol.encode_marker(3)) == {"type": "Marker", "id": 3}
    assert protocol.flush_plan(3) == [Padding(7), SendMarker(3), Padding(7)]
    # the padding after the Marker is what makes the server echo it: always sent
    assert protocol.flush_plan(4, quiet_frames=8) == [Padding(0), SendMarker(4), Padding(7)]


@given(st.binary(max_size=200))
def test_moshi_parser_survives_any_bytes(message: bytes) -> None:
    assert typed(MoshiProtocol().parse(message))


@given(
    st.dictionaries(
        st.sampled_from(["type", "text", "start_time", "id", "prs", "step_idx", "message"]),
        st.sampled_from(["Word", "Step", "Marker", "Error", "Ready", "EndWord"]) | json_values,
        max_size=5,
    )
)
def test_moshi_parser_survives_near_miss_messages(value: dict[str, object]) -> None:
    try:
        message = pack(value)
    except (OverflowError, ValueError, TypeError):
        return
    assert typed(MoshiProtocol().parse(message))


def test_moshi_text_frames_are_ignored() -> None:
    events = MoshiProtocol().parse('{"type":"Ready"}')
    assert len(events) == 1 and isinstance(events[0], Ignored)
