from __future__ import annotations

import asyncio

import pytest
import uvloop

from live_transcription import loop
from live_transcription.config import ConfigError, load_settings


async def running_loop() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_is_the_default_and_asyncio_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LT_EVENT_LOOP", raising=False)
    assert load_settings().event_loop == "uvloop"
    assert issubclass(loop.run(running_loop(), "uvloop"), uvloop.Loop)
    assert not issubclass(loop.run(running_loop(), "asyncio"), uvloop.Loop)
    assert loop.run(running_loop(), "uvloop", udp_tick_ms=0) is uvloop.Loop


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event loop"):
        loop.loop_factory("trio")
    with pytest.raises(ConfigError, match="LT_EVENT_LOOP"):
        load_settings(LT_EVENT_LOOP="trio")
