"""The HPB (nextcloud-spreed-signaling) wire format, without I/O.

Builders return the JSON object of each message we send (``encode`` turns it
into the text frame). ``parse`` turns every received frame into one typed
event and never raises: bad input becomes ``Malformed`` with the reason.
Field names follow ``docs/standalone-signaling-api-v1.md`` and PROTOCOLS.md
section 2.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

MAX_FRAME_BYTES = 1 << 20
"""Frames larger than this are not decoded (``Malformed``)."""

HELLO_VERSIONS = ("1.0", "2.0")
INTERNAL_FEATURES = ("internal-incall",)
IN_CALL = 1
WITH_AUDIO = 2
WITH_VIDEO = 4
ROOM_TYPE = "video"

Json = dict[str, Any]

# --- building ---------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def internal_token(secret: str, random: str) -> str:
    """Lowercase hex HMAC-SHA256 of ``random`` keyed with the internal secret."""
    return hmac.new(secret.encode(), random.encode(), hashlib.sha256).hexdigest()


def new_random() -> str:
    return secrets.token_hex(32)


def hello(msg_id: str, *, secret: str, backend: str, version: str = "2.0", random: str | None = None) -> Json:
    if version not in HELLO_VERSIONS:
        raise ValueError(f"unsupported hello version {version!r}")
    rnd = random if random is not None else new_random()
    body: Json = {
        "version": version,
        "auth": {
            "type": "internal",
            "params": {"random": rnd, "token": internal_token(secret, rnd), "backend": backend},
        },
    }
    if version == "2.0":
        body["features"] = list(INTERNAL_FEATURES)
    return {"type": "hello", "id": msg_id, "hello": body}


def resume(msg_id: str, resume_id: str, *, version: str = "2.0") -> Json:
    return {"type": "hello", "id": msg_id, "hello": {"version": version, "resumeid": resume_id}}


def incall(msg_id: str, flags: int = IN_CALL) -> Json:
    return {
        "type": "internal",
        "id": msg_id,
        "internal": {"type": "incall", "incall": {"incall": flags}},
    }


def join_room(msg_id: str, room_id: str, session_id: str) -> Json:
    return {"type": "room", "id": msg_id, "room": {"roomid": room_id, "sessionid": session_id}}


def _to_session(msg_id: str, session_id: str, data: Json) -> Json:
    return {
        "type": "message",
        "id": msg_id,
        "message": {"recipient": {"type": "session", "sessionid": session_id}, "data": data},
    }


def request_offer(msg_id: str, speaker: str) -> Json:
    return _to_session(msg_id, speaker, {"type": "requestoffer", "roomType": ROOM_TYPE})


def answer(msg_id: str, speaker: str, sid: str, sdp: str, nick: str = "") -> Json:
    return _to_session(
        msg_id,
        speaker,
        {
            "to": speaker,
            "type": "answer",
            "roomType": ROOM_TYPE,
            "sid": sid,
            "payload": {"type": "answer", "sdp": sdp, "nick": nick},
        },
    )


def candidate(
    msg_id: str,
    speaker: str,
    sid: str,
    *,
    candidate_line: str,
    sdp_mid: str | None,
    sdp_mline_index: int | None,
) -> Json:
    line = candidate_line.removeprefix("a=")
    return _to_session(
        msg_id,
        speaker,
        {
            "to": speaker,
            "type": "candidate",
            "sid": sid,
            "roomType": ROOM_TYPE,
            "payload": {
                "candidate": {
                    "candidate": line,
                    "sdpMLineIndex": sdp_mline_index,
                    "sdpMid": sdp_mid,
                }
            },
        },
    )


def transcript(msg_id: str, target: str, *, speaker: str, text: str, final: bool, language: str) -> Json:
    return _to_session(
        msg_id,
        target,
        {
            "type": "transcript",
            "message": text,
            "final": final,
            "langId": language,
            "speakerSessionId": speaker,
        },
    )


def bye(msg_id: str) -> Json:
    return {"type": "bye", "id": msg_id, "bye": {}}


# --- parsing ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloOk:
    id: str | None
    session_id: str
    resume_id: str | None
    user_id: str | None
    features: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Welcome:
    features: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RoomJoined:
    """Reply to ``room`` (or the server moving us; empty ``room_id`` = out)."""

    id: str | None
    room_id: str


@dataclass(frozen=True, slots=True)
class Participant:
    session_id: str
    nextcloud_session_id: str | None
    in_call: int
    user_id: str | None
    internal: bool
    virtual: bool


@dataclass(frozen=True, slots=True)
class ParticipantsUpdate:
    """``users`` is the room's full list, ``changed`` the entries that changed;
    either may be absent (None). ``all`` with ``in_call`` sets everybody."""

    room_id: str | None
    users: tuple[Participant, ...] | None
    changed: tuple[Participant, ...] | None
    in_call: int | None
    all: bool


@dataclass(frozen=True, slots=True)
class RoomEvent:
    """Sessions that joined, left or changed in the room."""

    kind: Literal["join", "leave", "change"]
    session_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Offer:
    sender: str
    sid: str
    sdp: str
    room_type: str | None


@dataclass(frozen=True, slots=True)
class Candidate:
    sender: str
    sid: str | None
    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None


@dataclass(frozen=True, slots=True)
class Relayed:
    """Any other message relayed from a session (e.g. a transcript to a client)."""

    sender: str | None
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Error:
    id: str | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Bye:
    id: str | None


@dataclass(frozen=True, slots=True)
class ServerPing:
    """An application-level ping from the server (nothing to answer)."""


@dataclass(frozen=True, slots=True)
class Unknown:
    type: str


@dataclass(frozen=True, slots=True)
class Malformed:
    reason: str


ServerEvent = (
    HelloOk
    | Welcome
    | RoomJoined
    | ParticipantsUpdate
    | RoomEvent
    | Offer
    | Candidate
    | Relayed
    | Error
    | Bye
    | ServerPing
    | Unknown
    | Malformed
)


class _Bad(Exception):
    """A field is missing or of the wrong type (internal to parsing)."""


def _obj(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{what} is not an object")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} is not a string")
    return value


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _str_tuple(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(item for item in value if isinstance(item, str))


def parse(frame: str | bytes | bytearray | memoryview | object) -> ServerEvent:
    """One received frame -> one event. Never raises."""
    try:
        return _parse(frame)
    except _Bad as exc:
        return Malformed(str(exc))
    except RecursionError:
        return Malformed("nested too deeply")


def _parse(frame: object) -> ServerEvent:
    if isinstance(frame, bytes | bytearray | memoryview):
        if len(frame) > MAX_FRAME_BYTES:
            return Malformed(f"frame larger than {MAX_FRAME_BYTES} bytes")
        try:
            frame = bytes(frame).decode("utf-8")
        except UnicodeDecodeError:
            return Malformed("not UTF-8")
    if not isinstance(frame, str):
        return Malformed(f"unsupported frame type {type(frame).__name__}")
    # a str of N chars is at least N bytes: cheap check before encoding
    if len(frame) > MAX_FRAME_BYTES or len(frame.encode("utf-8", "replace")) > MAX_FRAME_BYTES:
        return Malformed(f"frame larger than {MAX_FRAME_BYTES} bytes")
    try:
        raw = json.loads(frame)
    except ValueError:
        return Malformed("not JSON")
    msg = _obj(raw, "message")
    kind = msg.get("type")
    if not isinstance(kind, str):
        return Malformed("message without a string type")
    msg_id = _opt_str(msg.get("id"))
    match kind:
        case "hello":
            return _hello(msg_id, _obj(msg.get("hello"), "hello"))
        case "welcome":
            welcome = _obj(msg.get("welcome", {}), "welcome")
            return Welcome(_str_tuple(welcome.get("features")))
        case "room":
            room = _obj(msg.get("room"), "room")
            return RoomJoined(msg_id, _str(room.get("roomid", ""), "room.roomid"))
        case "event":
            return _event(_obj(msg.get("event"), "event"))
        case "message":
            return _message(_obj(msg.get("message"), "message"))
        case "error":
            error = _obj(msg.get("error"), "error")
            return Error(
                msg_id,
                _str(error.get("code"), "error.code"),
                _opt_str(error.get("message")) or "",
            )
        case "bye":
            return Bye(msg_id)
        case "ping":
            return ServerPing()
        case _:
            return Unknown(kind[:64])


def _hello(msg_id: str | None, body: Mapping[str, Any]) -> HelloOk:
    session_id = _str(body.get("sessionid"), "hello.sessionid")
    if not session_id:
        raise _Bad("hello.sessionid is empty")
    server = body.get("server")
    features = _str_tuple(server.get("features")) if isinstance(server, dict) else ()
    return HelloOk(
        msg_id,
        session_id,
        _opt_str(body.get("resumeid")),
        _opt_str(body.get("userid")),
        features,
    )


def _participant(entry: object) -> Participant | None:
    if not isinstance(entry, dict):
        return None
    session_id = entry.get("sessionId")
    if not isinstance(session_id, str) or not session_id:
        return None
    in_call = _opt_int(entry.get("inCall"))
    return Participant(
        session_id=session_id,
        nextcloud_session_id=_opt_str(entry.get("nextcloudSessionId")) or None,
        in_call=in_call if in_call is not None else 0,
        user_id=_opt_str(entry.get("userId")),
        internal=entry.get("internal") is True,
        virtual=entry.get("virtual") is True,
    )


def _participants(value: object) -> tuple[Participant, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Bad("participants list is not a list")
    return tuple(p for p in map(_participant, value) if p is not None)


def _event(event: Mapping[str, Any]) -> ServerEvent:
    target = event.get("target")
    kind = event.get("type")
    if target == "participants" and kind == "update":
        update = _obj(event.get("update"), "event.update")
        return ParticipantsUpdate(
            room_id=_opt_str(update.get("roomid")),
            users=_participants(update.get("users")),
            changed=_participants(update.get("changed")),
            in_call=_opt_int(update.get("incall")),
            all=update.get("all") is True,
        )
    if target == "room" and kind in ("join", "leave", "change"):
        entries = event.get(kind)
        if not isinstance(entries, list):
            raise _Bad(f"room {kind} event without a list")
        ids: list[str] = []
        for entry in entries:
            # leave lists session ids, join/change list session objects
            if isinstance(entry, str):
                ids.append(entry)
            elif isinstance(entry, dict) and isinstance(entry.get("sessionid"), str):
                ids.append(entry["sessionid"])
        return RoomEvent(kind, tuple(ids))
    return Unknown(f"event:{str(target)[:32]}:{str(kind)[:32]}")


def _message(message: Mapping[str, Any]) -> ServerEvent:
    sender_obj = message.get("sender")
    sender = _opt_str(sender_obj.get("sessionid")) if isinstance(sender_obj, dict) else None
    data = _obj(message.get("data"), "message.data")
    kind = data.get("type")
    if kind == "offer":
        if sender is None:
            raise _Bad("offer without a sender session")
        payload = _obj(data.get("payload"), "offer.payload")
        return Offer(
            sender=sender,
            sid=_str(data.get("sid"), "offer.sid"),
            sdp=_str(payload.get("sdp"), "offer.payload.sdp"),
            room_type=_opt_str(data.get("roomType")),
        )
    if kind == "candidate":
        if sender is None:
            raise _Bad("candidate without a sender session")
        payload = _obj(data.get("payload"), "candidate.payload")
        cand = _obj(payload.get("candidate"), "candidate.payload.candidate")
        return Candidate(
            sender=sender,
            sid=_opt_str(data.get("sid")),
            candidate=_str(cand.get("candidate", ""), "candidate.candidate").removeprefix("a="),
            sdp_mid=_opt_str(cand.get("sdpMid")),
            sdp_mline_index=_opt_int(cand.get("sdpMLineIndex")),
        )
    return Relayed(sender, data)
