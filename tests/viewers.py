"""What a viewer (a simulated Talk client) has received: the captions
relayed to it through the HPB."""

from __future__ import annotations

from typing import Any

from live_transcription.hpb.protocol import Relayed
from live_transcription.sim.client import SimClient


def captions(viewer: SimClient) -> list[tuple[str | None, dict[str, Any]]]:
    """(sender HPB session, transcript) of every caption the viewer received."""
    return [
        (event.sender, dict(event.data))
        for event in viewer.events
        if isinstance(event, Relayed) and event.data.get("type") == "transcript"
    ]


def finals_since(viewer: SimClient, mark: int, speaker: str) -> list[tuple[str | None, dict[str, Any]]]:
    """The final captions of ``speaker`` among those received after the first ``mark``."""
    return [
        (sender, data)
        for sender, data in captions(viewer)[mark:]
        if data["final"] and data["speakerSessionId"] == speaker
    ]
