from __future__ import annotations

import json
import logging

from live_transcription.logs import JsonFormatter, RepeatLimiter


def record(msg: str, *args: object, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("live_transcription.hpb.connection", level, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_with_component_extras_and_masked_secrets() -> None:
    formatter = JsonFormatter(secrets=["topsecret"])
    line = formatter.format(record("auth failed with %s", "topsecret", room="ab12…"))
    entry = json.loads(line)
    assert entry["component"] == "hpb.connection"
    assert entry["level"] == "warning"
    assert entry["msg"] == "auth failed with ***"
    assert entry["room"] == "ab12…"


def test_repeats_are_held_back_and_counted() -> None:
    limiter = RepeatLimiter(window=3600)
    assert limiter.filter(record("reconnecting to %s", "a"))
    assert not limiter.filter(record("reconnecting to %s", "b"))
    assert not limiter.filter(record("reconnecting to %s", "c"))
    assert limiter.filter(record("another message"))
    limiter.window = 0
    passed = record("reconnecting to %s", "d")
    assert limiter.filter(passed)
    assert getattr(passed, "repeats", None) == 2


def test_limiter_memory_is_bounded() -> None:
    limiter = RepeatLimiter(window=3600, max_keys=10)
    for i in range(100):
        limiter.filter(record(f"distinct {i}"))
    assert len(limiter._seen) == 10
