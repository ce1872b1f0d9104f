"""What the supervisor and its worker processes say to each other (pure).

The channel is a Unix stream socket; each message is one frame: a 4-byte
big-endian length, then a msgpack map with a ``t`` (type) key. Talk's
commands and their answers inside it are the cluster's own encoding
(``cluster/codec.py``), so a command reads the same whether it crossed a
socket to another process or NATS to another machine.

``FrameDecoder`` cuts frames out of whatever chunks the socket delivers;
``encode`` turns a message into a frame; ``parse`` turns a frame into a
message or a ``ProtocolError`` and never raises, whatever the bytes.

Supervisor -> worker: ``Run`` (a Talk command), ``Resume`` (re-open a room
from its record), ``StopRoom``, ``LeaveAll``, ``StatusRequest``,
``MetricsRequest``, each with an ``id`` the answer carries; ``Drain`` (leave
every call and exit).

Worker -> supervisor: ``Hello`` once it is ready; the answers (``RunDone``,
``Resumed``, ``Done``, ``StatusReport``, ``MetricsText``, ``Failed``);
``Load`` now and then; ``RoomChanged`` / ``RoomEnded`` as its rooms change.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from live_transcription.cluster import codec
from live_transcription.cluster.codec import Command, Forwarded, Reply, RoomRecord
from live_transcription.rooms.joins import JoinReport
from live_transcription.rooms.manager import RoomSummary
from live_transcription.stt.base import Language

VERSION = 1
"""In ``Hello``: a worker started from a newer install on disk than its
supervisor's is refused instead of misread."""
HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
"""Far above a real message (a worker's metrics are ~50 KB, the status of
200 rooms ~40 KB)."""
MAX_ITEMS = 100_000
MAX_TEXT = 16 * 1024
"""Longest free text (an error, an engine's failure); senders cut theirs shorter."""


class ErrorKind(enum.Enum):
    TOO_LARGE = "too-large"
    NOT_MSGPACK = "not-msgpack"
    NOT_MAP = "not-map"
    UNKNOWN_TYPE = "unknown-type"
    BAD_FIELD = "bad-field"


@dataclass(frozen=True, slots=True)
class ProtocolError:
    kind: ErrorKind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"


# --- framing ------------------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"a frame of {len(payload)} bytes is over {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Frames out of a byte stream cut anywhere. A length over ``max_frame``
    cannot be skipped safely: ``error`` is set and nothing more is decoded."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._max_frame = max_frame
        self._buffer = bytearray()
        self.error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            return []
        self._buffer += data
        frames: list[bytes] = []
        start = 0
        buffer = self._buffer
        while len(buffer) - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            if length > self._max_frame:
                detail = f"frame of {length} bytes > {self._max_frame}"
                self.error = ProtocolError(ErrorKind.TOO_LARGE, detail)
                self._buffer = bytearray()
                return frames
            end = start + HEADER.size + length
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[start + HEADER.size : end]))
            start = end
        if start:
            del buffer[:start]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)


# --- messages -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    id: int
    command: Command


@dataclass(frozen=True, slots=True)
class Resume:
    id: int
    record: RoomRecord


@dataclass(frozen=True, slots=True)
class StopRoom:
    id: int
    room: str
    reason: str


@dataclass(frozen=True, slots=True)
class LeaveAll:
    id: int
    reason: str


@dataclass(frozen=True, slots=True)
class StatusRequest:
    id: int


@dataclass(frozen=True, slots=True)
class MetricsRequest:
    id: int


@dataclass(frozen=True, slots=True)
class Drain:
    """Leave every call (finals flushed, ``bye`` sent) and exit."""


Request = Run | Resume | StopRoom | LeaveAll | StatusRequest | MetricsRequest


@dataclass(frozen=True, slots=True)
class Hello:
    pid: int
    engine: str
    languages: tuple[Language, ...]
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class RunDone:
    id: int
    reply: Reply
    running: bool
    """The room runs in the worker after the command."""


@dataclass(frozen=True, slots=True)
class Resumed:
    id: int
    ok: bool
    running: bool


@dataclass(frozen=True, slots=True)
class Done:
    id: int


@dataclass(frozen=True, slots=True)
class Failed:
    """A request the worker could not serve (too many at once, or an error)."""

    id: int
    error: str


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """What ``/healthz`` needs from one worker."""

    engine_error: str | None
    engine_ready: bool
    accepting: bool
    speakers_active: int
    speakers_cap: int
    speakers_refused: int
    rooms_cap: int
    rss_bytes: int
    rooms: tuple[RoomSummary, ...]
    joins: JoinReport | None


@dataclass(frozen=True, slots=True)
class StatusReport:
    id: int
    status: WorkerStatus


@dataclass(frozen=True, slots=True)
class MetricsText:
    id: int
    text: bytes


@dataclass(frozen=True, slots=True)
class Load:
    speakers: int
    rooms: int
    accepting: bool


@dataclass(frozen=True, slots=True)
class RoomChanged:
    record: RoomRecord


@dataclass(frozen=True, slots=True)
class RoomEnded:
    room: str
    release: bool = True
    """False: ended by the worker's own shutdown, not over for its viewers."""


Answer = RunDone | Resumed | Done | Failed | StatusReport | MetricsText
Message = Request | Drain | Hello | Answer | Load | RoomChanged | RoomEnded


# --- encoding -----------------------------------------------------------------------------------------


def _record(record: RoomRecord) -> dict[str, Any]:
    return {"room": record.room, "language": record.language, "targets": sorted(record.targets)}


def _summary(room: RoomSummary) -> dict[str, Any]:
    return {name: getattr(room, name) for name, _ in _SUMMARY_FIELDS}


def _joins(joins: JoinReport | None) -> dict[str, Any] | None:
    if joins is None:
        return None
    return {name: getattr(joins, name) for name, _ in _JOIN_FIELDS}


def _body(message: Message) -> dict[str, Any]:
    match message:
        case Run():
            command = codec.encode_command(Forwarded(message.command, 0))
            return {"t": "run", "id": message.id, "command": command}
        case Resume():
            return {"t": "resume", "id": message.id, "record": _record(message.record)}
        case StopRoom():
            return {"t": "stop-room", "id": message.id, "room": message.room, "reason": message.reason}
        case LeaveAll():
            return {"t": "leave-all", "id": message.id, "reason": message.reason}
        case StatusRequest():
            return {"t": "status?", "id": message.id}
        case MetricsRequest():
            return {"t": "metrics?", "id": message.id}
        case Drain():
            return {"t": "drain"}
        case Hello():
            languages = [[lang.code, lang.name, lang.separator, lang.rtl] for lang in message.languages]
            return {
                "t": "hello",
                "v": message.version,
                "pid": message.pid,
                "engine": message.engine,
                "languages": languages,
            }
        case RunDone():
            return {
                "t": "run-done",
                "id": message.id,
                "reply": codec.encode_reply(message.reply),
                "running": message.running,
            }
        case Resumed():
            return {"t": "resumed", "id": message.id, "ok": message.ok, "running": message.running}
        case Done():
            return {"t": "done", "id": message.id}
        case Failed():
            return {"t": "failed", "id": message.id, "error": message.error}
        case StatusReport():
            status = message.status
            return {
                "t": "status",
                "id": message.id,
                "engine_error": status.engine_error,
                "engine_ready": status.engine_ready,
                "accepting": status.accepting,
                "speakers_active": status.speakers_active,
                "speakers_cap": status.speakers_cap,
                "speakers_refused": status.speakers_refused,
                "rooms_cap": status.rooms_cap,
                "rss_bytes": status.rss_bytes,
                "rooms": [_summary(room) for room in status.rooms],
                "joins": _joins(status.joins),
            }
        case MetricsText():
            return {"t": "metrics", "id": message.id, "text": message.text}
        case Load():
            return {
                "t": "load",
                "speakers": message.speakers,
                "rooms": message.rooms,
                "accepting": message.accepting,
            }
        case RoomChanged():
            return {"t": "room-changed", "record": _record(message.record)}
        case RoomEnded():
            return {"t": "room-ended", "room": message.room, "release": message.release}
    raise AssertionError(f"unknown message {message!r}")  # pragma: no cover - the match is exhaustive


def encode(message: Message) -> bytes:
    """The message as one frame, ready for the socket."""
    return frame(msgpack.packb(_body(message), use_bin_type=True))


# --- parsing ------------------------------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, error: ProtocolError) -> None:
        self.error = error


def _bad(detail: str) -> _Invalid:
    return _Invalid(ProtocolError(ErrorKind.BAD_FIELD, detail))


def _int(obj: Mapping[str, Any], name: str, low: int = 0, high: int = 2**62) -> int:
    value = obj.get(name)
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{name} must be an integer from {low} to {high}")
    return value


def _float(obj: Mapping[str, Any], name: str) -> float:
    value = obj.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(f"{name} must be a number")
    return float(value)


def _bool(obj: Mapping[str, Any], name: str) -> bool:
    value = obj.get(name)
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false")
    return value


def _str(obj: Mapping[str, Any], name: str, max_chars: int = MAX_TEXT) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or len(value) > max_chars:
        raise _bad(f"{name} must be a string of at most {max_chars} characters")
    return value


def _optional(obj: Mapping[str, Any], name: str, read: Any) -> Any:
    return None if obj.get(name) is None else read(obj, name)


def _bytes(obj: Mapping[str, Any], name: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, bytes):
        raise _bad(f"{name} must be bytes")
    return value


def _map(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a map")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise _bad(f"{what} must be a list of at most {MAX_ITEMS} items")
    return value


def _room(obj: Mapping[str, Any], name: str = "room") -> str:
    value = obj.get(name)
    if not isinstance(value, str) or codec.ROOM_TOKEN.fullmatch(value) is None:
        raise _bad(f"{name} must match {codec.ROOM_TOKEN.pattern}")
    return value


def _parse_record(value: Any) -> RoomRecord:
    obj = _map(value, "record")
    targets = _list(obj.get("targets"), "targets")
    for target in targets:
        if not isinstance(target, str) or not 1 <= len(target) <= codec.MAX_SESSION_CHARS:
            raise _bad(f"each target must be a string of 1 to {codec.MAX_SESSION_CHARS} characters")
    language = _optional(obj, "language", lambda o, n: _str(o, n, codec.MAX_LANGUAGE_CHARS))
    return RoomRecord(_room(obj), language, frozenset(targets))


_SUMMARY_FIELDS: tuple[tuple[str, Any], ...] = (
    ("token", _room),
    ("language", _str),
    ("targets", _int),
    ("pending_targets", _int),
    ("speakers", _int),
    ("waiting_speakers", _int),
    ("link_state", _str),
    ("speakers_reconnecting", _int),
    ("speakers_connected", _int),
    ("delivery_stalled", _bool),
)

_JOIN_FIELDS: tuple[tuple[str, Any], ...] = (
    ("pending", _int),
    ("stalled", _int),
    ("stalled_after", _float),
    ("failures", _int),
    ("cause", lambda o, n: _optional(o, n, _str)),
    ("failing_for", lambda o, n: _optional(o, n, _float)),
    ("window", _float),
)


def _parse_summary(value: Any) -> RoomSummary:
    obj = _map(value, "room")
    return RoomSummary(**{name: read(obj, name) for name, read in _SUMMARY_FIELDS})


def _parse_joins(value: Any) -> JoinReport | None:
    if value is None:
        return None
    obj = _map(value, "joins")
    return JoinReport(**{name: read(obj, name) for name, read in _JOIN_FIELDS})


def _parse_language(value: Any) -> Language:
    if not isinstance(value, list) or len(value) != 4:
        raise _bad("a language must be [code, name, separator, rtl]")
    code, name, separator, rtl = value
    if not all(isinstance(v, str) and len(v) <= 128 for v in (code, name, separator)) or not isinstance(
        rtl, bool
    ):
        raise _bad("a language must be [code, name, separator, rtl]")
    return Language(code, name, separator, rtl)


def _parse_command(obj: Mapping[str, Any]) -> Command:
    parsed = codec.parse_command(_bytes(obj, "command"))
    if isinstance(parsed, codec.CodecError):
        raise _bad(f"command: {parsed}")
    return parsed.command


def _parse_reply(obj: Mapping[str, Any]) -> Reply:
    parsed = codec.parse_reply(_bytes(obj, "reply"))
    if isinstance(parsed, codec.CodecError):
        raise _bad(f"reply: {parsed}")
    return parsed


def _parse_status(obj: Mapping[str, Any]) -> WorkerStatus:
    return WorkerStatus(
        engine_error=_optional(obj, "engine_error", _str),
        engine_ready=_bool(obj, "engine_ready"),
        accepting=_bool(obj, "accepting"),
        speakers_active=_int(obj, "speakers_active"),
        speakers_cap=_int(obj, "speakers_cap"),
        speakers_refused=_int(obj, "speakers_refused"),
        rooms_cap=_int(obj, "rooms_cap"),
        rss_bytes=_int(obj, "rss_bytes"),
        rooms=tuple(_parse_summary(room) for room in _list(obj.get("rooms"), "rooms")),
        joins=_parse_joins(obj.get("joins")),
    )


def _message(obj: Mapping[str, Any]) -> Message:
    kind = obj.get("t")
    match kind:
        case "run":
            return Run(_int(obj, "id"), _parse_command(obj))
        case "resume":
            return Resume(_int(obj, "id"), _parse_record(obj.get("record")))
        case "stop-room":
            return StopRoom(_int(obj, "id"), _room(obj), _str(obj, "reason"))
        case "leave-all":
            return LeaveAll(_int(obj, "id"), _str(obj, "reason"))
        case "status?":
            return StatusRequest(_int(obj, "id"))
        case "metrics?":
            return MetricsRequest(_int(obj, "id"))
        case "drain":
            return Drain()
        case "hello":
            languages = tuple(_parse_language(v) for v in _list(obj.get("languages"), "languages"))
            return Hello(_int(obj, "pid"), _str(obj, "engine"), languages, _int(obj, "v"))
        case "run-done":
            return RunDone(_int(obj, "id"), _parse_reply(obj), _bool(obj, "running"))
        case "resumed":
            return Resumed(_int(obj, "id"), _bool(obj, "ok"), _bool(obj, "running"))
        case "done":
            return Done(_int(obj, "id"))
        case "failed":
            return Failed(_int(obj, "id"), _str(obj, "error"))
        case "status":
            return StatusReport(_int(obj, "id"), _parse_status(obj))
        case "metrics":
            return MetricsText(_int(obj, "id"), _bytes(obj, "text"))
        case "load":
            return Load(_int(obj, "speakers"), _int(obj, "rooms"), _bool(obj, "accepting"))
        case "room-changed":
            return RoomChanged(_parse_record(obj.get("record")))
        case "room-ended":
            return RoomEnded(_room(obj), _bool(obj, "release"))
    raise _Invalid(ProtocolError(ErrorKind.UNKNOWN_TYPE, f"unknown message type {str(kind)[:40]!r}"))


def parse(payload: bytes) -> Message | ProtocolError:
    """One frame's payload as a message; never raises."""
    if len(payload) > MAX_FRAME:
        return ProtocolError(ErrorKind.TOO_LARGE, f"{len(payload)} bytes > {MAX_FRAME}")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME)
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        return ProtocolError(ErrorKind.NOT_MSGPACK, f"{type(exc).__name__}: {str(exc)[:200]}")
    if not isinstance(obj, dict):
        return ProtocolError(ErrorKind.NOT_MAP, f"a {type(obj).__name__}, not a map")
    try:
        return _message(obj)
    except _Invalid as invalid:
        return invalid.error
    except (TypeError, ValueError) as exc:  # a value of the wrong type deep inside (e.g. unhashable)
        return ProtocolError(ErrorKind.BAD_FIELD, f"{type(exc).__name__}: {str(exc)[:200]}")
