"""The supervisor <-> worker channel: frames cut anywhere come out whole,
every message survives a round trip, and the parser never raises."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from live_transcription.cluster.codec import Reply, RoomRecord
from live_transcription.rooms.joins import JoinReport
from live_transcription.rooms.manager import RoomSummary
from live_transcription.stt.base import Language
from live_transcription.workers import protocol
from live_transcription.workers.protocol import (
    Done,
    Drain,
    ErrorKind,
    Failed,
    FrameDecoder,
    Hello,
    LeaveAll,
    Load,
    Message,
    MetricsRequest,
    MetricsText,
    ProtocolError,
    Resume,
    Resumed,
    RoomChanged,
    RoomEnded,
    Run,
    RunDone,
    StatusReport,
    StatusRequest,
    StopRoom,
    WorkerStatus,
)
from tests.unit.test_cluster_codec import commands, json_values, records, tokens

ids = st.integers(0, 2**40)
texts = st.text(max_size=200)
packable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
counts = st.integers(0, 10**6)
summaries = st.builds(
    RoomSummary,
    token=tokens,
    language=st.text(max_size=16),
    targets=counts,
    pending_targets=counts,
    speakers=counts,
    waiting_speakers=counts,
    link_state=st.sampled_from(["joining", "connected", "reconnecting", "closed"]),
    speakers_reconnecting=counts,
    speakers_connected=counts,
    delivery_stalled=st.booleans(),
)
seconds = st.floats(0, 1e6, allow_nan=False)
joins = st.builds(
    JoinReport,
    pending=counts,
    stalled=counts,
    stalled_after=seconds,
    failures=counts,
    cause=st.none() | texts,
    failing_for=st.none() | seconds,
    window=seconds,
)
statuses = st.builds(
    WorkerStatus,
    engine_error=st.none() | texts,
    engine_ready=st.booleans(),
    accepting=st.booleans(),
    speakers_active=counts,
    speakers_cap=counts,
    speakers_refused=counts,
    rooms_cap=counts,
    rss_bytes=st.integers(0, 2**50),
    rooms=st.lists(summaries, max_size=5).map(tuple),
    joins=st.none() | joins,
)
replies = st.builds(
    Reply, st.integers(100, 599), st.dictionaries(st.text(max_size=10), json_values, max_size=4)
)
language_entries = st.builds(
    Language, st.text(max_size=10), st.text(max_size=20), st.sampled_from([" ", ""]), st.booleans()
)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Run, ids, commands),
    st.builds(Resume, ids, records),
    st.builds(StopRoom, ids, tokens, texts),
    st.builds(LeaveAll, ids, texts),
    st.builds(StatusRequest, ids),
    st.builds(MetricsRequest, ids),
    st.just(Drain()),
    st.builds(Hello, counts, texts, st.lists(language_entries, max_size=5).map(tuple)),
    st.builds(RunDone, ids, replies, st.booleans()),
    st.builds(Resumed, ids, st.booleans(), st.booleans()),
    st.builds(Done, ids),
    st.builds(Failed, ids, texts),
    st.builds(StatusReport, ids, statuses),
    st.builds(MetricsText, ids, st.binary(max_size=300)),
    st.builds(Load, counts, counts, st.booleans()),
    st.builds(RoomChanged, records),
    st.builds(RoomEnded, tokens, st.booleans()),
)


def payload(frame: bytes) -> bytes:
    [inner] = FrameDecoder().feed(frame)
    return inner


@settings(max_examples=500, deadline=None)
@given(messages)
def test_every_message_survives_a_round_trip(message: Message) -> None:
    assert protocol.parse(payload(protocol.encode(message))) == message


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=8), st.data())
def test_frames_cut_anywhere_come_out_whole_and_in_order(batch: list[Message], data: st.DataObject) -> None:
    stream = b"".join(protocol.encode(message) for message in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += decoder.feed(stream[start:end])
    assert [protocol.parse(frame) for frame in out] == batch
    assert decoder.buffered == 0 and decoder.error is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_decoder_or_the_parser(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=4096)
    for frame in decoder.feed(data):
        result = protocol.parse(frame)
        assert isinstance(result, ProtocolError | Message)
    assert protocol.parse(data) is not None


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=10), packable, max_size=6),
    st.sampled_from(
        ["run", "resume", "stop-room", "leave-all", "hello", "run-done", "status", "load", "room-changed"]
    ),
)
def test_maps_with_wrong_fields_get_a_typed_error(fields: dict[str, object], kind: str) -> None:
    data = msgpack.packb({**fields, "t": kind})
    result = protocol.parse(data)
    if isinstance(result, ProtocolError):
        assert result.kind in (ErrorKind.BAD_FIELD, ErrorKind.UNKNOWN_TYPE)


def test_an_oversized_frame_stops_the_decoder_with_a_typed_error() -> None:
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(protocol.frame(b"12345")) == [b"12345"]
    assert decoder.feed(protocol.frame(b"x" * 11) + protocol.frame(b"ok")) == []
    assert decoder.error is not None and decoder.error.kind is ErrorKind.TOO_LARGE
    assert decoder.feed(protocol.frame(b"ok")) == []  # a broken stream is not resynchronised


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\xc1", ErrorKind.NOT_MSGPACK),
        (msgpack.packb([1, 2]), ErrorKind.NOT_MAP),
        (msgpack.packb({"t": "nope"}), ErrorKind.UNKNOWN_TYPE),
        (msgpack.packb({"t": "run", "id": 1, "command": b"{}"}), ErrorKind.BAD_FIELD),
        (msgpack.packb({"t": "room-ended", "room": "bad token!", "release": True}), ErrorKind.BAD_FIELD),
        (msgpack.packb({"t": "load", "speakers": True, "rooms": 0, "accepting": True}), ErrorKind.BAD_FIELD),
    ],
)
def test_typed_errors(data: bytes, kind: ErrorKind) -> None:
    result = protocol.parse(data)
    assert isinstance(result, ProtocolError) and result.kind is kind, result


def test_a_record_keeps_its_targets_and_language() -> None:
    record = RoomRecord("room1", "fr", frozenset({"talk-a", "talk-b"}))
    assert protocol.parse(payload(protocol.encode(RoomChanged(record)))) == RoomChanged(record)
