"""Structured logs: one JSON object per line, repeats held back and counted.

Fields: ``ts``, ``level``, ``component`` (the logger name below the package),
``msg``, and any ``extra`` the caller adds (``room``, ``speaker``, ...).
Secrets never reach here: settings hold them as ``SecretStr`` and callers
log room tokens shortened. As a last line of defence, values of configured
secrets are masked if they appear in a message.

Repeats: ``RepeatLimiter`` (pure: no I/O, no timer) decides what is written;
``LimitedStreamHandler`` writes it. A count of held-back repeats is never
lost: it is written with the next line of its group that passes, or, at the
end of a burst, when a state change about the same room/speaker (or, for
process-wide lines, any process-wide state change) is logged, and when the
handler closes (``logging.shutdown`` at exit, ``flush_repeats()`` on the
service's exit path).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_NOT_LOGGED = frozenset({"color_message"})
"""Extras never written: uvicorn's copy of its message with terminal colours."""
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def _masked(message: str, secrets: list[str]) -> str:
    for secret in secrets:
        message = message.replace(secret, "***")
    return message


def _plain(text: str) -> str:
    """Without terminal escape codes (colours): a JSON log is read by machines."""
    return _ANSI.sub("", text) if "\x1b" in text else text


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 4]

    def format(self, record: logging.LogRecord) -> str:
        message = _plain(_masked(record.getMessage(), self._secrets))
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": record.name.removeprefix("live_transcription."),
            "msg": message,
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD or key in _NOT_LOGGED or key.startswith("_"):
                continue
            entry[key] = value if isinstance(value, int | float | bool | None) else _plain(str(value))
        if record.exc_info:
            entry["exc"] = _plain(self.formatException(record.exc_info))
        repeats = record.__dict__.get("repeats", 0)
        if repeats:
            entry["repeats"] = repeats
        else:
            entry.pop("repeats", None)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One line for humans; says how many repeats were held back before it."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._secrets = [s for s in secrets if len(s) >= 4]

    def format(self, record: logging.LogRecord) -> str:
        line = _masked(super().format(record), self._secrets)
        worker = record.__dict__.get("_written_by_worker")
        if worker is not None:
            line = f"[worker {worker}] {line}"
        repeats = record.__dict__.get("repeats", 0)
        return f"{line} (+{repeats} repeats held back)" if repeats else line


KEY_FIELDS = ("event", "state", "cause", "reason", "refusal", "room", "speaker", "worker")
"""``extra`` fields that tell one event from another: lines differing in any
of them are never grouped."""


@dataclass(slots=True)
class _Group:
    shown_at: float
    scope: tuple[object, object]
    """(room, speaker): what the lines are about."""
    held: int = 0
    """Repeats held back since a line of the group was last written."""
    last: logging.LogRecord | None = None
    """The newest of them, written with the count when it is flushed."""


class RepeatLimiter:
    """Lets the same event (logger, template and key fields) through at most
    once per ``window`` seconds and counts the repeats held back.

    A line with a ``state`` is a state change when the last state logged
    for the same thing (logger, ``event`` or template, room, speaker)
    differs: it is always written, and the counts held back about the same
    room and speaker are flushed before it. ``admit`` returns the records to
    write, in order; ``drain`` the held-back counts still pending (at close).
    A flushed count is the group's newest held-back line, written with
    ``repeats`` = the others held back before it. Lines below INFO pass.
    """

    def __init__(
        self,
        window: float = 10.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._groups: OrderedDict[tuple[object, ...], _Group] = OrderedDict()
        self._states: OrderedDict[tuple[object, ...], object] = OrderedDict()

    def admit(self, record: logging.LogRecord) -> list[logging.LogRecord]:
        if record.levelno < logging.INFO:
            return [record]
        extra = record.__dict__
        key = (record.name, record.msg, *(extra.get(name) for name in KEY_FIELDS))
        scope = (extra.get("room"), extra.get("speaker"))
        now = self._clock()
        changed = "state" in extra and self._state_changed(record, scope)
        group = self._groups.get(key)
        if group is not None and now - group.shown_at < self.window and not changed:
            group.held += 1
            group.last = _kept(record)
            return []
        out: list[logging.LogRecord] = []
        if changed:
            out += self._flush(lambda other: other is not group and other.scope == scope)
        record.repeats = group.held if group is not None else 0
        self._groups[key] = _Group(now, scope)
        self._groups.move_to_end(key)
        while len(self._groups) > self.max_keys:  # bounded like everything else; nothing lost
            _, evicted = self._groups.popitem(last=False)
            out += self._flush_group(evicted)
        out.append(record)
        return out

    def drain(self) -> list[logging.LogRecord]:
        """Every count still held back, as lines to write (oldest first)."""
        return self._flush(lambda group: True)

    def _state_changed(self, record: logging.LogRecord, scope: tuple[object, object]) -> bool:
        extra = record.__dict__
        subject = (record.name, extra.get("event") or record.msg, *scope)
        state = extra["state"]
        changed = subject not in self._states or self._states[subject] != state
        self._states[subject] = state
        self._states.move_to_end(subject)
        while len(self._states) > self.max_keys:
            self._states.popitem(last=False)
        return changed

    def _flush(self, chosen: Callable[[_Group], bool]) -> list[logging.LogRecord]:
        out: list[logging.LogRecord] = []
        for group in self._groups.values():
            if group.held and chosen(group):
                out += self._flush_group(group)
        out.sort(key=lambda record: record.created)
        return out

    @staticmethod
    def _flush_group(group: _Group) -> list[logging.LogRecord]:
        last, held = group.last, group.held
        group.held, group.last = 0, None
        if last is None or not held:
            return []
        last.repeats = held - 1  # the last one is written: the others are counted on it
        return [last]


def _kept(record: logging.LogRecord) -> logging.LogRecord:
    """A held-back record as it will be written later: its message rendered
    now, without arguments or a traceback to keep alive."""
    kept = logging.makeLogRecord(record.__dict__)
    kept.msg, kept.args = record.getMessage(), None
    kept.exc_info = kept.exc_text = kept.stack_info = None
    return kept


class LimitedStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes what its ``RepeatLimiter`` admits and the
    held-back counts when it is closed or ``flush_repeats`` is called."""

    def __init__(self, stream: TextIO, limiter: RepeatLimiter) -> None:
        super().__init__(stream)
        self.limiter = limiter

    def emit(self, record: logging.LogRecord) -> None:
        # logging calls this under the handler's own lock: one thread at a time
        for line in self.limiter.admit(record):
            super().emit(line)

    def flush_repeats(self) -> None:
        self.acquire()  # the lock logging holds around emit
        try:
            for line in self.limiter.drain():
                super().emit(line)
        finally:
            self.release()
        self.flush()

    def close(self) -> None:
        try:
            self.flush_repeats()
        finally:
            super().close()


def flush_repeats() -> None:
    """Write every held-back count now (the service's exit path)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LimitedStreamHandler):
            handler.flush_repeats()


def short_token(token: str) -> str:
    """Room tokens are semi-secret (they open the room): logs carry a prefix only."""
    return token[:4] + "…" if len(token) > 4 else token


def fields(room: str, speaker: str | None = None) -> dict[str, str]:
    """``extra`` for a log line about a room (and a speaker): ``room`` is shortened."""
    entry = {"room": short_token(room)}
    if speaker is not None:
        entry["speaker"] = speaker
    return entry


class _WorkerField(logging.Filter):
    """Every line of a worker process says which worker wrote it."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        record._written_by_worker = self.worker  # not a field of its own: the text format's prefix
        return True


def setup_logging(
    level: str = "INFO",
    fmt: str = "json",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    *,
    worker: int | None = None,
) -> None:
    """``worker``: this process is that worker of a supervisor; its lines carry
    ``worker`` (JSON) or ``[worker N]`` (text)."""
    handler = LimitedStreamHandler(stream or sys.stderr, RepeatLimiter())
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    secrets = list(secrets)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, LimitedStreamHandler):
            old.close()  # its held-back counts are written, not lost
    root.handlers[:] = [handler]
    root.setLevel(level)
    # third-party chatter stays at warning
    for noisy in ("aiortc", "aioice", "websockets", "uvicorn.access", "httpx", "faster_whisper"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
