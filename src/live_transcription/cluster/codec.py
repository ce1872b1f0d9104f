"""Every message the replicas of a cluster exchange, as small versioned JSON.

Pure code: no NATS, no I/O. ``encode_*`` turn typed values into bytes;
``parse_*`` turn bytes from the network into typed values or a
``CodecError`` and never raise, whatever the input (tests feed them
arbitrary bytes). A message carries ``"v": 1``; a replica refuses versions
it does not know with a clear error instead of guessing.

Messages:

- a Talk command forwarded to the replica that owns the room
  (``transcribe`` / ``set-language`` / ``set-target-language`` / ``leave``) with its hop count;
- the owner's answer: the HTTP status and JSON body Talk gets;
- the value of a room's lease: owner replica and the room's record
  (targets = Talk session ids, language), so another replica can take the
  room over;
- a replica's load, for placement.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024
"""Far above a real message (a room with a thousand viewers is ~100 KB);
NATS' default payload limit is 1 MB."""
MAX_TARGETS = 2000

ROOM_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""Talk room tokens; the same characters are valid in NATS subjects and KV keys."""
REPLICA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_SESSION_CHARS = 512
MAX_LANGUAGE_CHARS = 16
MAX_HOPS = 8
MAX_COUNT = 10**9


class ErrorKind(enum.Enum):
    TOO_LARGE = "too-large"
    NOT_JSON = "not-json"
    NOT_OBJECT = "not-object"
    BAD_VERSION = "bad-version"
    UNKNOWN_OP = "unknown-op"
    BAD_FIELD = "bad-field"


@dataclass(frozen=True, slots=True)
class CodecError:
    """Why a message was refused; ``parse_*`` return it instead of raising."""

    kind: ErrorKind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"


# --- values -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transcribe:
    room: str
    session: str
    enable: bool = True
    language: str | None = None
    translate_to: str | None = None
    """The viewer reads captions translated into this language."""


@dataclass(frozen=True, slots=True)
class SetTargetLanguage:
    """One viewer reads captions translated into ``language`` (None: the originals)."""

    room: str
    session: str
    language: str | None = None


@dataclass(frozen=True, slots=True)
class SetLanguage:
    room: str
    language: str


@dataclass(frozen=True, slots=True)
class Leave:
    room: str


Command = Transcribe | SetLanguage | SetTargetLanguage | Leave


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A command on its way to the room's owner; ``hops`` counts the replicas
    it has passed, so ownership moving mid-flight cannot bounce it forever."""

    command: Command
    hops: int = 1


@dataclass(frozen=True, slots=True)
class Reply:
    """What Talk gets back: an HTTP status and a JSON object."""

    status: int
    body: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, message: str) -> Reply:
        return cls(status, {"error": message})


@dataclass(frozen=True, slots=True)
class RoomRecord:
    """What a replica needs to re-open a room it takes over."""

    room: str
    language: str | None = None
    """None: the service's default language."""
    targets: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class LeaseValue:
    owner: str
    record: RoomRecord


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    replica: str
    speakers: int
    rooms: int
    capacity: int
    """Speakers this replica takes at most."""
    accepting: bool = True

    @property
    def full(self) -> bool:
        return not self.accepting or self.speakers >= self.capacity


# --- encoding ------------------------------------------------------------------------------------------


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **obj}, separators=(",", ":"), ensure_ascii=False).encode()


def encode_command(forwarded: Forwarded) -> bytes:
    command = forwarded.command
    body: dict[str, Any]
    match command:
        case Transcribe():
            body = {
                "op": "transcribe",
                "room": command.room,
                "session": command.session,
                "enable": command.enable,
                "language": command.language,
                "translate_to": command.translate_to,
            }
        case SetTargetLanguage():
            body = {
                "op": "set-target-language",
                "room": command.room,
                "session": command.session,
                "language": command.language,
            }
        case SetLanguage():
            body = {"op": "set-language", "room": command.room, "language": command.language}
        case Leave():
            body = {"op": "leave", "room": command.room}
    body["hops"] = forwarded.hops
    return _dump(body)


def encode_reply(reply: Reply) -> bytes:
    return _dump({"status": reply.status, "body": dict(reply.body)})


def _record_fields(record: RoomRecord) -> dict[str, Any]:
    return {"room": record.room, "language": record.language, "targets": sorted(record.targets)}


def encode_lease(value: LeaseValue) -> bytes:
    return _dump({"owner": value.owner, **_record_fields(value.record)})


def encode_load(load: ReplicaLoad) -> bytes:
    return _dump(
        {
            "replica": load.replica,
            "speakers": load.speakers,
            "rooms": load.rooms,
            "capacity": load.capacity,
            "accepting": load.accepting,
        }
    )


# --- parsing -------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """Internal: carries a CodecError out of nested field checks."""

    def __init__(self, error: CodecError) -> None:
        self.error = error


def _bad(detail: str) -> _Invalid:
    return _Invalid(CodecError(ErrorKind.BAD_FIELD, detail))


def _load(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise _Invalid(CodecError(ErrorKind.TOO_LARGE, f"{len(data)} bytes > {MAX_MESSAGE_BYTES}"))
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _Invalid(CodecError(ErrorKind.NOT_JSON, str(exc)[:200])) from None
    if not isinstance(obj, dict):
        raise _Invalid(CodecError(ErrorKind.NOT_OBJECT, f"a JSON {type(obj).__name__}, not an object"))
    version = obj.get("v")
    if type(version) is not int or version != VERSION:
        detail = f"version {str(version)[:20]!r}, this replica speaks {VERSION}"
        raise _Invalid(CodecError(ErrorKind.BAD_VERSION, detail))
    return obj


def _text(obj: Mapping[str, Any], name: str, max_chars: int) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        raise _bad(f"{name} must be a string of 1 to {max_chars} characters")
    return value


def _optional_text(obj: Mapping[str, Any], name: str, max_chars: int) -> str | None:
    if obj.get(name) is None:
        return None
    return _text(obj, name, max_chars)


def _token(obj: Mapping[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise _bad(f"{name} must match {pattern.pattern}")
    return value


def _flag(obj: Mapping[str, Any], name: str) -> bool:
    value = obj.get(name)
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false")
    return value


def _count(obj: Mapping[str, Any], name: str, low: int = 0, high: int = MAX_COUNT) -> int:
    value = obj.get(name)
    # bool is an int in Python; JSON true is not a count
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{name} must be an integer from {low} to {high}")
    return value


def _targets(obj: Mapping[str, Any]) -> frozenset[str]:
    value = obj.get("targets")
    if not isinstance(value, list) or len(value) > MAX_TARGETS:
        raise _bad(f"targets must be a list of at most {MAX_TARGETS} session ids")
    for item in value:
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_SESSION_CHARS:
            raise _bad(f"each target must be a string of 1 to {MAX_SESSION_CHARS} characters")
    return frozenset(value)


def _command(obj: Mapping[str, Any]) -> Command:
    op = obj.get("op")
    room = _token(obj, "room", ROOM_TOKEN)
    match op:
        case "transcribe":
            return Transcribe(
                room=room,
                session=_text(obj, "session", MAX_SESSION_CHARS),
                enable=_flag(obj, "enable"),
                language=_optional_text(obj, "language", MAX_LANGUAGE_CHARS),
                translate_to=_optional_text(obj, "translate_to", MAX_LANGUAGE_CHARS),
            )
        case "set-target-language":
            return SetTargetLanguage(
                room=room,
                session=_text(obj, "session", MAX_SESSION_CHARS),
                language=_optional_text(obj, "language", MAX_LANGUAGE_CHARS),
            )
        case "set-language":
            return SetLanguage(room=room, language=_text(obj, "language", MAX_LANGUAGE_CHARS))
        case "leave":
            return Leave(room=room)
    raise _Invalid(CodecError(ErrorKind.UNKNOWN_OP, f"unknown command {str(op)[:40]!r}"))


OPS = ("transcribe", "set-language", "set-target-language", "leave")


def parse_command(data: bytes) -> Forwarded | CodecError:
    try:
        obj = _load(data)
        # the op is checked before the other fields: an unknown command is the clearer error
        if obj.get("op") not in OPS:
            raise _Invalid(CodecError(ErrorKind.UNKNOWN_OP, f"unknown command {str(obj.get('op'))[:40]!r}"))
        return Forwarded(_command(obj), hops=_count(obj, "hops", 0, MAX_HOPS))
    except _Invalid as invalid:
        return invalid.error


def parse_reply(data: bytes) -> Reply | CodecError:
    try:
        obj = _load(data)
        status = _count(obj, "status", 100, 599)
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _bad("body must be a JSON object")
        return Reply(status, body)
    except _Invalid as invalid:
        return invalid.error


def parse_lease(data: bytes) -> LeaseValue | CodecError:
    try:
        obj = _load(data)
        record = RoomRecord(
            room=_token(obj, "room", ROOM_TOKEN),
            language=_optional_text(obj, "language", MAX_LANGUAGE_CHARS),
            targets=_targets(obj),
        )
        return LeaseValue(owner=_token(obj, "owner", REPLICA_ID), record=record)
    except _Invalid as invalid:
        return invalid.error


def parse_load(data: bytes) -> ReplicaLoad | CodecError:
    try:
        obj = _load(data)
        return ReplicaLoad(
            replica=_token(obj, "replica", REPLICA_ID),
            speakers=_count(obj, "speakers"),
            rooms=_count(obj, "rooms"),
            capacity=_count(obj, "capacity"),
            accepting=_flag(obj, "accepting"),
        )
    except _Invalid as invalid:
        return invalid.error
