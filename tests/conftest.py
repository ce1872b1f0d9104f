"""The whole suite runs on the event loop production uses (uvloop, see
``live_transcription.loop``); ``LT_TEST_EVENT_LOOP=asyncio`` runs it on the
standard loop instead."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

import pytest

from live_transcription.loop import loop_factory


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    name = os.environ.get("LT_TEST_EVENT_LOOP", "uvloop")
    return {name: loop_factory(name)}
