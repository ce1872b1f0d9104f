"""Helpers for tests that need a real NATS server (Debian package `nats-server`).

- `nats_server_fixture` (fixture name `nats_server`): a private
  `NatsServerProcess` with JetStream per test. Import it into a test module
  (`from tests.nats_support import nats_server_fixture  # noqa: F401`).
- When nats-server is not installed, the fixture skips LOUDLY (reason on
  stderr and in the skip reason), never passes silently.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import pytest

from live_transcription.sim.nats_process import NatsServerProcess, nats_server_available


def skip_unless_nats_server() -> None:
    """pytest.skip with a loud reason when nats-server cannot run here."""
    reason = nats_server_available()
    if reason is None:
        return
    banner = (
        f"NATS TESTS SKIPPED: {reason}. Install it with `apt-get install nats-server` "
        "(scripts/install-system-deps.sh does)."
    )
    print(f"\n{'!' * 78}\n{banner}\n{'!' * 78}", file=sys.stderr)
    pytest.skip(banner)


@pytest.fixture(name="nats_server")
async def nats_server_fixture() -> AsyncIterator[NatsServerProcess]:
    skip_unless_nats_server()
    async with NatsServerProcess() as server:
        yield server
