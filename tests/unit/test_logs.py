from __future__ import annotations

import json
import logging

from live_transcription.logs import JsonFormatter, RepeatLimiter, TextFormatter


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


def test_repeats_are_grouped_by_event_and_key_fields() -> None:
    now = [0.0]
    limiter = RepeatLimiter(window=10, clock=lambda: now[0])
    assert limiter.filter(record("app %s", "disabled", state="disabled"))
    assert limiter.filter(record("app %s", "enabled", state="enabled"))  # a state change always shows
    assert not limiter.filter(record("app %s", "disabled", state="disabled"))
    assert limiter.filter(record("link failed", room="ab12…"))
    assert limiter.filter(record("link failed", room="cd34…"))  # another room: another event
    assert not limiter.filter(record("link failed", room="ab12…"))
    now[0] = 11.0
    again = record("link failed", room="ab12…")
    assert limiter.filter(again)
    assert getattr(again, "repeats", None) == 1


def test_held_back_repeats_are_counted_in_both_formats() -> None:
    limiter = RepeatLimiter(window=3600)
    assert limiter.filter(record("HPB lost"))
    for _ in range(3):
        assert not limiter.filter(record("HPB lost"))
    limiter.window = 0
    passed = record("HPB lost")
    assert limiter.filter(passed)
    assert json.loads(JsonFormatter().format(passed))["repeats"] == 3
    assert TextFormatter().format(passed).endswith("HPB lost (+3 repeats held back)")
    masked = TextFormatter(secrets=["topsecret"]).format(record("auth %s", "topsecret"))
    assert "topsecret" not in masked
