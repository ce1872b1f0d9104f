import hashlib
import hmac
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from live_transcription.hpb import protocol as p


def test_hello_internal_auth_is_exact() -> None:
    msg = p.hello("1", secret="s3cret", backend="https://cloud.example", random="r" * 64)
    token = hmac.new(b"s3cret", b"r" * 64, hashlib.sha256).hexdigest()
    assert msg == {
        "type": "hello",
        "id": "1",
        "hello": {
            "version": "2.0",
            "features": ["internal-incall"],
            "auth": {
                "type": "internal",
                "params": {"random": "r" * 64, "token": token, "backend": "https://cloud.example"},
            },
        },
    }
    fresh = p.hello("2", secret="x", backend="b", version="1.0")
    params = fresh["hello"]["auth"]["params"]
    assert len(params["random"]) == 64 and int(params["random"], 16) >= 0
    assert params["token"] == p.internal_token("x", params["random"])
    assert params["token"] == params["token"].lower()
    assert "features" not in fresh["hello"]


def test_client_messages() -> None:
    assert p.resume("3", "RID") == {
        "type": "hello",
        "id": "3",
        "hello": {"version": "2.0", "resumeid": "RID"},
    }
    assert p.incall("4") == {
        "type": "internal",
        "id": "4",
        "internal": {"type": "incall", "incall": {"incall": 1}},
    }
    assert p.join_room("5", "tok", "sid") == {
        "type": "room",
        "id": "5",
        "room": {"roomid": "tok", "sessionid": "sid"},
    }
    assert p.request_offer("6", "spk")["message"] == {
        "recipient": {"type": "session", "sessionid": "spk"},
        "data": {"type": "requestoffer", "roomType": "video"},
    }
    assert p.answer("7", "spk", "S", "v=0", "bot")["message"]["data"] == {
        "to": "spk",
        "type": "answer",
        "roomType": "video",
        "sid": "S",
        "payload": {"type": "answer", "sdp": "v=0", "nick": "bot"},
    }
    cand = p.candidate(
        "8",
        "spk",
        "S",
        candidate_line="a=candidate:1 1 udp 1 1.2.3.4 5 typ host",
        sdp_mid="0",
        sdp_mline_index=0,
    )
    assert cand["message"]["data"]["payload"] == {
        "candidate": {
            "candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host",
            "sdpMLineIndex": 0,
            "sdpMid": "0",
        }
    }
    assert p.transcript("9", "tgt", speaker="spk", text="Hi", final=True, language="en") == {
        "type": "message",
        "id": "9",
        "message": {
            "recipient": {"type": "session", "sessionid": "tgt"},
            "data": {
                "type": "transcript",
                "message": "Hi",
                "final": True,
                "langId": "en",
                "speakerSessionId": "spk",
            },
        },
    }
    assert json.loads(p.encode(p.bye("10"))) == {"type": "bye", "id": "10", "bye": {}}


def test_parse_server_messages() -> None:
    hello = {
        "type": "hello",
        "id": "1",
        "hello": {
            "sessionid": "S",
            "resumeid": "R",
            "userid": "",
            "server": {"features": ["internal-incall", 3]},
        },
    }
    assert p.parse(json.dumps(hello)) == p.HelloOk("1", "S", "R", "", ("internal-incall",))
    assert p.parse(b'{"type":"welcome","welcome":{"features":["a"]}}') == p.Welcome(("a",))
    assert p.parse('{"type":"room","id":"2","room":{"roomid":"t"}}') == p.RoomJoined("2", "t")
    update = {
        "type": "event",
        "event": {
            "target": "participants",
            "type": "update",
            "update": {
                "roomid": "t",
                "users": [
                    {"sessionId": "a", "nextcloudSessionId": "na", "inCall": 3, "userId": "u"},
                    {"sessionId": "b", "inCall": 1, "internal": True},
                    {"nope": 1},
                ],
                "changed": [{"sessionId": "a", "inCall": 3}],
            },
        },
    }
    parsed = p.parse(json.dumps(update))
    assert isinstance(parsed, p.ParticipantsUpdate)
    assert parsed.users == (
        p.Participant("a", "na", 3, "u", False, False),
        p.Participant("b", None, 1, None, True, False),
    )
    assert parsed.changed == (p.Participant("a", None, 3, None, False, False),)
    assert not parsed.all
    ended = p.parse(
        '{"type":"event","event":{"target":"participants","type":"update",'
        '"update":{"roomid":"t","incall":0,"all":true}}}'
    )
    assert ended == p.ParticipantsUpdate("t", None, None, 0, True)
    assert p.parse(
        '{"type":"event","event":{"target":"room","type":"leave","leave":["a","b"]}}'
    ) == p.RoomEvent("leave", ("a", "b"))
    assert p.parse(
        '{"type":"event","event":{"target":"room","type":"join","join":[{"sessionid":"a"}]}}'
    ) == p.RoomEvent("join", ("a",))
    offer = {
        "type": "message",
        "message": {
            "sender": {"type": "session", "sessionid": "spk"},
            "data": {
                "from": "spk",
                "to": "me",
                "type": "offer",
                "sid": "1",
                "roomType": "video",
                "payload": {"type": "offer", "sdp": "v=0"},
            },
        },
    }
    assert p.parse(json.dumps(offer)) == p.Offer("spk", "1", "v=0", "video")
    cand = {
        "type": "message",
        "message": {
            "sender": {"type": "session", "sessionid": "spk"},
            "data": {
                "type": "candidate",
                "sid": "1",
                "payload": {"candidate": {"candidate": "candidate:x", "sdpMid": "0", "sdpMLineIndex": 0}},
            },
        },
    }
    assert p.parse(json.dumps(cand)) == p.Candidate("spk", "1", "candidate:x", "0", 0)
    err = '{"type":"error","id":"4","error":{"code":"no_such_session","message":"gone"}}'
    assert p.parse(err) == p.Error("4", "no_such_session", "gone")
    assert p.parse('{"type":"bye","id":"9","bye":{}}') == p.Bye("9")
    assert p.parse('{"type":"ping"}') == p.ServerPing()
    assert p.parse('{"type":"transient","transient":{}}') == p.Unknown("transient")


def test_malformed_inputs_are_typed() -> None:
    for frame in [
        b"\xff\xfe",
        "not json",
        "[]",
        '{"type":1}',
        '{"type":"hello"}',
        '{"type":"hello","hello":{"sessionid":""}}',
        '{"type":"message","message":{"data":{"type":"offer"}}}',
        "[" * 100_000,
        42,
    ]:
        assert isinstance(p.parse(frame), p.Malformed), frame
    huge = '{"type":"x","pad":"' + "a" * p.MAX_FRAME_BYTES + '"}'
    assert p.parse(huge) == p.Malformed(f"frame larger than {p.MAX_FRAME_BYTES} bytes")
    assert isinstance(p.parse(huge.encode()), p.Malformed)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
keys = st.sampled_from(
    [
        "type",
        "id",
        "hello",
        "event",
        "message",
        "error",
        "room",
        "data",
        "sender",
        "payload",
        "update",
        "users",
        "changed",
        "sessionId",
        "sessionid",
        "inCall",
        "target",
        "candidate",
        "sdp",
        "sid",
        "leave",
    ]
)
shaped = st.recursive(
    json_values,
    lambda children: st.dictionaries(keys, children, max_size=6),
    max_leaves=40,
)
types = st.sampled_from(["hello", "welcome", "room", "event", "message", "error", "bye", "ping"])


@settings(max_examples=400)
@given(st.one_of(json_values, shaped, st.builds(lambda t, body: {"type": t, t: body}, types, shaped)))
def test_parse_never_raises_on_json(value: Any) -> None:
    result = p.parse(json.dumps(value))
    assert type(result) in p.ServerEvent.__args__


@settings(max_examples=300)
@given(st.one_of(st.text(), st.binary()))
def test_parse_never_raises_on_text_or_bytes(frame: str | bytes) -> None:
    assert type(p.parse(frame)) in p.ServerEvent.__args__
