from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from live_transcription.logs import (
    JsonFormatter,
    LimitedStreamHandler,
    RepeatLimiter,
    TextFormatter,
    flush_repeats,
    setup_logging,
)


def record(msg: str, *args: object, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("live_transcription.hpb.connection", level, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def shown(limiter: RepeatLimiter, rec: logging.LogRecord) -> list[tuple[str, int]]:
    """What the limiter writes for ``rec``: (message, repeats counted on it)."""
    return [(r.getMessage(), r.__dict__.get("repeats", 0)) for r in limiter.admit(rec)]


def test_json_lines_with_component_extras_and_masked_secrets() -> None:
    formatter = JsonFormatter(secrets=["topsecret"])
    line = formatter.format(record("auth failed with %s", "topsecret", room="ab12…"))
    entry = json.loads(line)
    assert entry["component"] == "hpb.connection"
    assert entry["level"] == "warning"
    assert entry["msg"] == "auth failed with ***"
    assert entry["room"] == "ab12…"


def test_json_has_no_terminal_colours() -> None:
    # uvicorn adds ``color_message``, its message with ANSI colour codes
    rec = record(
        "Started server process [%d]",
        42,
        color_message="Started server process [\x1b[36m%d\x1b[0m]",
        detail="\x1b[1mbold\x1b[0m",
    )
    rec.msg = "\x1b[32mStarted\x1b[0m server process [%d]"
    line = JsonFormatter().format(rec)
    assert "\x1b" not in line and "\\u001b" not in line
    entry = json.loads(line)
    assert "color_message" not in entry
    assert entry["msg"] == "Started server process [42]"
    assert entry["detail"] == "bold"


def test_repeats_are_held_back_and_counted_on_the_next_that_passes() -> None:
    now = [0.0]
    limiter = RepeatLimiter(window=10, clock=lambda: now[0])
    assert shown(limiter, record("reconnecting to %s", "a")) == [("reconnecting to a", 0)]
    assert shown(limiter, record("reconnecting to %s", "b")) == []
    assert shown(limiter, record("reconnecting to %s", "c")) == []
    assert shown(limiter, record("another message")) == [("another message", 0)]
    now[0] = 11.0
    assert shown(limiter, record("reconnecting to %s", "d")) == [("reconnecting to d", 2)]
    assert shown(limiter, record("debug lines pass", level=logging.DEBUG)) == [("debug lines pass", 0)]
    assert shown(limiter, record("debug lines pass", level=logging.DEBUG)) == [("debug lines pass", 0)]


def test_limiter_memory_is_bounded_and_an_evicted_count_is_written() -> None:
    limiter = RepeatLimiter(window=3600, max_keys=10)
    limiter.admit(record("first"))
    limiter.admit(record("first"))  # held back
    written: list[tuple[str, int]] = []
    for i in range(100):
        written += shown(limiter, record(f"distinct {i}"))
    assert len(limiter._groups) == 10
    assert ("first", 0) in written  # its one held-back repeat was written when it was evicted
    assert limiter.drain() == []


def test_a_state_change_always_shows_and_the_final_state_is_the_last_line() -> None:
    limiter = RepeatLimiter(window=3600)
    lines = []
    for state in ("disabled", "enabled", "disabled", "enabled", "disabled"):
        lines += shown(limiter, record("app %s", state, state=state))
    assert lines == [
        ("app disabled", 0),
        ("app enabled", 0),
        ("app disabled", 0),
        ("app enabled", 0),
        ("app disabled", 0),
    ]
    # the same state again is a repeat, not a change
    assert shown(limiter, record("app %s", "disabled", state="disabled")) == []


def test_other_events_and_rooms_are_not_grouped() -> None:
    now = [0.0]
    limiter = RepeatLimiter(window=10, clock=lambda: now[0])
    assert shown(limiter, record("link failed", room="ab12…"))
    assert shown(limiter, record("link failed", room="cd34…"))  # another room: another event
    assert shown(limiter, record("link failed", room="ab12…", cause="timed-out"))  # another cause
    assert not shown(limiter, record("link failed", room="ab12…"))
    now[0] = 11.0
    assert shown(limiter, record("link failed", room="ab12…")) == [("link failed", 1)]


def test_a_state_change_flushes_the_counts_held_back_about_the_same_thing() -> None:
    limiter = RepeatLimiter(window=3600)
    for n in range(4):
        limiter.admit(record("enable refused in room %s (%d)", "ab12…", n, room="ab12…"))
    limiter.admit(record("speaker refused", room="cd34…"))
    limiter.admit(record("speaker refused", room="cd34…"))
    # a state change about room ab12…: its burst's count is written first, cd34…'s waits
    assert shown(limiter, record("room %s closed", "ab12…", room="ab12…", state="closed")) == [
        ("enable refused in room ab12… (3)", 2),
        ("room ab12… closed", 0),
    ]
    assert [(r.getMessage(), r.__dict__["repeats"]) for r in limiter.drain()] == [("speaker refused", 0)]
    assert limiter.drain() == []


def test_the_burst_before_a_process_wide_state_change_is_counted() -> None:
    limiter = RepeatLimiter(window=3600)
    limiter.admit(record("app %s", "disabled", state="disabled"))
    for _ in range(3):
        limiter.admit(record("app %s", "disabled", state="disabled"))
    assert shown(limiter, record("app %s", "enabled", state="enabled")) == [
        ("app disabled", 2),  # the last repeat, with the two held back before it
        ("app enabled", 0),
    ]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_held_back_counts_are_written_at_close_in_both_formats(fmt: str) -> None:
    stream = io.StringIO()
    handler = LimitedStreamHandler(stream, RepeatLimiter(window=3600))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for n in range(5):
        handler.handle(record("HPB reconnect %d failed", n))
    handler.handle(record("another line"))
    assert len(stream.getvalue().splitlines()) == 2
    handler.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    if fmt == "json":
        entry = json.loads(lines[2])
        assert (entry["msg"], entry["repeats"]) == ("HPB reconnect 4 failed", 3)
    else:
        assert lines[2].endswith("HPB reconnect 4 failed (+3 repeats held back)")
    handler.close()  # closed twice (``logging.shutdown`` after the service's exit path): nothing twice
    assert len(stream.getvalue().splitlines()) == 3


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_held_back_counts_pass_on_the_next_line_in_both_formats(fmt: str) -> None:
    now = [0.0]
    stream = io.StringIO()
    handler = LimitedStreamHandler(stream, RepeatLimiter(window=10, clock=lambda: now[0]))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(secrets=["topsecret"]))
    for _ in range(4):
        handler.handle(record("HPB lost"))
    now[0] = 10.0
    handler.handle(record("HPB lost"))
    last = stream.getvalue().splitlines()[-1]
    if fmt == "json":
        assert json.loads(last)["repeats"] == 3
    else:
        assert last.endswith("HPB lost (+3 repeats held back)")
        handler.handle(record("auth %s", "topsecret"))
        assert "topsecret" not in stream.getvalue()


def test_flush_repeats_writes_the_counts_of_the_installed_handler() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        setup_logging("INFO", "json", stream=stream)
        log = logging.getLogger("live_transcription.test")
        for _ in range(3):
            log.warning("STT stream failed", extra={"speaker": "s1"})
        flush_repeats()
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["msg"], e.get("repeats", 0)) for e in entries] == [
        ("STT stream failed", 0),
        ("STT stream failed", 1),
    ]


def test_held_back_counts_are_written_when_the_process_exits() -> None:
    program = (
        "import logging\n"
        "from live_transcription.logs import setup_logging\n"
        "setup_logging('INFO', 'text')\n"
        "for n in range(6):\n"
        "    logging.getLogger('live_transcription.x').warning('attempt %d failed', n)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("attempt 0 failed")
    assert lines[1].endswith("attempt 5 failed (+4 repeats held back)")
