"""The HTTP connection bound fits the process's file-descriptor limit."""

from __future__ import annotations

import resource

from live_transcription.api.http_front import OPERATIONS_SLOTS, FrontLimits
from live_transcription.config import load_settings


def limits(max_connections: int) -> FrontLimits:
    return FrontLimits(max_connections, 10.0, 10.0, frozenset({"/heartbeat"}))


def test_half_the_descriptors_at_most_go_to_http() -> None:
    lowered = limits(1000).within_descriptors(256)
    assert lowered.max_connections + lowered.operations_slots <= 128
    assert lowered.max_connections >= 64
    tiny = limits(1000).within_descriptors(16)
    assert tiny.max_connections >= 1 and tiny.max_connections + tiny.operations_slots <= 8


def test_enough_descriptors_change_nothing() -> None:
    assert limits(1000).within_descriptors(1 << 20) == limits(1000)
    assert limits(1000).within_descriptors(resource.RLIM_INFINITY) == limits(1000)
    assert limits(1000).operations_slots == OPERATIONS_SLOTS


def test_from_settings() -> None:
    settings = load_settings(
        LT_HTTP_MAX_CONNECTIONS="7", LT_HTTP_HEADER_TIMEOUT_SECONDS="2.5", LT_HTTP_BODY_TIMEOUT_SECONDS="3"
    )
    built = FrontLimits.from_settings(settings, ["/heartbeat", "/healthz"])
    assert (built.max_connections, built.header_timeout, built.body_timeout) == (7, 2.5, 3.0)
    assert built.open_paths == frozenset({"/heartbeat", "/healthz"})
