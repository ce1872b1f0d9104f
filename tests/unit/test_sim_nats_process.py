"""Finding nats-server: a missing binary is a clear reason to skip, not a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from live_transcription.sim.nats_process import NatsServerNotInstalled, find_nats_server


def test_a_missing_binary_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(NatsServerNotInstalled, match="Debian package `nats-server`"):
        find_nats_server(tmp_path / "nats-server")


def test_an_existing_binary_is_found(tmp_path: Path) -> None:
    binary = tmp_path / "nats-server"
    binary.write_text("#!/bin/sh\n")
    assert find_nats_server(binary) == binary
