"""Shared fixtures for integration tests over real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from live_transcription.sim.emulator import HpbEmulator

HPB_SECRET = "integration-internal-secret"
HPB_BACKEND = "https://cloud.example.test"


@pytest.fixture
async def hpb() -> AsyncIterator[HpbEmulator]:
    """An HPB emulator on 127.0.0.1 (ephemeral port), stopped afterwards."""
    async with HpbEmulator(HPB_SECRET, HPB_BACKEND) as emulator:
        yield emulator
