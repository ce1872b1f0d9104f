"""The cluster's wire formats: round trips, and parsers that never raise."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from live_transcription.cluster import codec
from live_transcription.cluster.codec import (
    CodecError,
    ErrorKind,
    Forwarded,
    LeaseValue,
    Leave,
    ReplicaLoad,
    Reply,
    RoomRecord,
    SetLanguage,
    SetTargetLanguage,
    Transcribe,
)

TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
tokens = st.text(TOKEN_ALPHABET, min_size=1, max_size=128)
replica_ids = st.text(TOKEN_ALPHABET, min_size=1, max_size=64)
sessions = st.text(min_size=1, max_size=512)
languages = st.text(min_size=1, max_size=16)
commands = st.one_of(
    st.builds(
        Transcribe,
        room=tokens,
        session=sessions,
        enable=st.booleans(),
        language=st.none() | languages,
        translate_to=st.none() | languages,
    ),
    st.builds(SetLanguage, room=tokens, language=languages),
    st.builds(SetTargetLanguage, room=tokens, session=sessions, language=st.none() | languages),
    st.builds(Leave, room=tokens),
)
records = st.builds(
    RoomRecord,
    room=tokens,
    language=st.none() | languages,
    targets=st.frozensets(sessions, max_size=20),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
PARSERS = (codec.parse_command, codec.parse_reply, codec.parse_lease, codec.parse_load)


@settings(max_examples=300, deadline=None)
@given(commands, st.integers(0, codec.MAX_HOPS))
def test_command_round_trip(command: codec.Command, hops: int) -> None:
    forwarded = Forwarded(command, hops)
    assert codec.parse_command(codec.encode_command(forwarded)) == forwarded


@settings(max_examples=200, deadline=None)
@given(st.integers(100, 599), st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_reply_round_trip(status: int, body: dict[str, Any]) -> None:
    parsed = codec.parse_reply(codec.encode_reply(Reply(status, body)))
    assert parsed == Reply(status, body)


@settings(max_examples=200, deadline=None)
@given(replica_ids, records)
def test_lease_round_trip(owner: str, record: RoomRecord) -> None:
    value = LeaseValue(owner, record)
    assert codec.parse_lease(codec.encode_lease(value)) == value


@settings(max_examples=200, deadline=None)
@given(replica_ids, st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.booleans())
def test_load_round_trip(replica: str, speakers: int, rooms: int, capacity: int, accepting: bool) -> None:
    load = ReplicaLoad(replica, speakers, rooms, capacity, accepting)
    assert codec.parse_load(codec.encode_load(load)) == load


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_parsers_never_raise_on_bytes(data: bytes) -> None:
    for parse in PARSERS:
        result = parse(data)
        assert isinstance(result, CodecError | Forwarded | Reply | LeaseValue | ReplicaLoad)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "v",
                "op",
                "room",
                "session",
                "enable",
                "language",
                "translate_to",
                "hops",
                "status",
                "body",
                "owner",
                "targets",
                "replica",
                "speakers",
                "rooms",
                "capacity",
                "accepting",
            ]
        ),
        json_values,
    )
)
def test_parsers_never_raise_on_json_objects(obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    for parse in PARSERS:
        parse(data)  # must not raise


def test_errors_say_what_is_wrong() -> None:
    def kind(result: object) -> ErrorKind:
        assert isinstance(result, CodecError)
        return result.kind

    assert kind(codec.parse_command(b"\xff\xfe")) is ErrorKind.NOT_JSON
    assert kind(codec.parse_command(b"[1, 2]")) is ErrorKind.NOT_OBJECT
    assert (
        kind(codec.parse_command(b'{"v": 2, "op": "leave", "room": "r", "hops": 1}')) is ErrorKind.BAD_VERSION
    )
    assert (
        kind(codec.parse_command(b'{"v": true, "op": "leave", "room": "r", "hops": 1}'))
        is ErrorKind.BAD_VERSION
    )
    assert (
        kind(codec.parse_command(b'{"v": 1, "op": "dance", "room": "r", "hops": 1}')) is ErrorKind.UNKNOWN_OP
    )
    assert (
        kind(codec.parse_command(b'{"v": 1, "op": "leave", "room": "a.b", "hops": 1}')) is ErrorKind.BAD_FIELD
    )
    assert (
        kind(codec.parse_command(b'{"v": 1, "op": "leave", "room": "r", "hops": 99}')) is ErrorKind.BAD_FIELD
    )
    assert (
        kind(codec.parse_command(b'{"v": 1, "op": "leave", "room": "r", "hops": true}'))
        is ErrorKind.BAD_FIELD
    )
    assert kind(codec.parse_command(b" " * (codec.MAX_MESSAGE_BYTES + 1))) is ErrorKind.TOO_LARGE
    assert kind(codec.parse_command(b"[" * 100_000 + b"]" * 100_000)) in (
        ErrorKind.NOT_JSON,
        ErrorKind.TOO_LARGE,
    )
    deep = b"[" * 50_000 + b"]" * 50_000
    assert kind(codec.parse_reply(deep)) is ErrorKind.NOT_JSON
    assert kind(codec.parse_reply(b'{"v": 1, "status": 200, "body": []}')) is ErrorKind.BAD_FIELD
    assert (
        kind(
            codec.parse_load(
                b'{"v": 1, "replica": "a", "speakers": -1, "rooms": 0, "capacity": 1, "accepting": true}'
            )
        )
        is ErrorKind.BAD_FIELD
    )
    too_many = json.dumps(
        {
            "v": 1,
            "owner": "a",
            "room": "r",
            "language": None,
            "targets": [str(i) for i in range(codec.MAX_TARGETS + 1)],
        }
    ).encode()
    assert kind(codec.parse_lease(too_many)) is ErrorKind.BAD_FIELD
    assert "hops" in str(codec.parse_command(b'{"v": 1, "op": "leave", "room": "r"}'))


def test_messages_are_versioned_json() -> None:
    data = codec.encode_command(Forwarded(Transcribe("room1", "sess", True, "de"), hops=1))
    assert json.loads(data) == {
        "v": 1,
        "op": "transcribe",
        "room": "room1",
        "session": "sess",
        "enable": True,
        "language": "de",
        "translate_to": None,
        "hops": 1,
    }
    lease = json.loads(codec.encode_lease(LeaseValue("r1", RoomRecord("room1", "en", frozenset({"b", "a"})))))
    assert lease == {"v": 1, "owner": "r1", "room": "room1", "language": "en", "targets": ["a", "b"]}


def test_full_replica() -> None:
    assert ReplicaLoad("a", speakers=10, rooms=1, capacity=10).full
    assert ReplicaLoad("a", speakers=0, rooms=0, capacity=10, accepting=False).full
    assert not ReplicaLoad("a", speakers=9, rooms=1, capacity=10).full
