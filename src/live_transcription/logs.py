"""Structured logs: one JSON object per line, repeats rate-limited.

Fields: ``ts``, ``level``, ``component`` (the logger name below the package),
``msg``, and any ``extra`` the caller adds (``room``, ``speaker``, ...).
Secrets never reach here: settings hold them as ``SecretStr`` and callers
log room tokens shortened. As a last line of defence, values of configured
secrets are masked if they appear in a message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _masked(message: str, secrets: list[str]) -> str:
    for secret in secrets:
        message = message.replace(secret, "***")
    return message


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 4]

    def format(self, record: logging.LogRecord) -> str:
        message = _masked(record.getMessage(), self._secrets)
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": record.name.removeprefix("live_transcription."),
            "msg": message,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
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
        repeats = record.__dict__.get("repeats", 0)
        return f"{line} (+{repeats} repeats held back)" if repeats else line


KEY_FIELDS = ("event", "state", "cause", "reason", "refusal", "room", "speaker")
"""``extra`` fields that tell one event from another: lines differing in any
of them are never grouped (a state change always shows)."""


class RepeatLimiter(logging.Filter):
    """Lets the same event (logger, template and key fields) through at most
    once per ``window`` seconds; the next one that passes says how many were
    held back."""

    def __init__(
        self,
        window: float = 10.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._seen: OrderedDict[tuple[object, ...], tuple[float, int]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        key = (record.name, record.msg, *(record.__dict__.get(name) for name in KEY_FIELDS))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.window:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        record.repeats = last[1] if last is not None else 0
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:  # bounded like everything else
            self._seen.popitem(last=False)
        return True


def short_token(token: str) -> str:
    """Room tokens are semi-secret (they open the room): logs carry a prefix only."""
    return token[:4] + "…" if len(token) > 4 else token


def fields(room: str, speaker: str | None = None) -> dict[str, str]:
    """``extra`` for a log line about a room (and a speaker): ``room`` is shortened."""
    entry = {"room": short_token(room)}
    if speaker is not None:
        entry["speaker"] = speaker
    return entry


def setup_logging(level: str = "INFO", fmt: str = "json", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    secrets = list(secrets)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    handler.addFilter(RepeatLimiter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # third-party chatter stays at warning
    for noisy in ("aiortc", "aioice", "websockets", "uvicorn.access", "httpx", "faster_whisper"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
