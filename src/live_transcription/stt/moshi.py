"""Self-hosted Kyutai moshi-server, ``/api/asr-streaming``.

Wire format (PROTOCOLS.md section 4): every frame is a binary msgpack map
with a ``type``. The server greets with ``Ready`` (or ``Error`` "no free
channels", then closes: the stream backs off and retries). The client sends
``Audio`` (1920 float samples) and ``Marker``; the server answers ``Word``
(with ``start_time``), ``EndWord``, ``Step`` (one per frame, ``prs[2] > 0.5``
means the speaker paused) and echoes ``Marker`` once the audio before it has
gone through the model.

Flush (exact): ``delay + 1`` frames of silence (the quiet frames the speech
ended with count), a ``Marker``, ``delay + 1`` more frames of silence, then
read until the marker comes back.
"""

from __future__ import annotations

import math
import ssl
from typing import Any

import msgpack

from live_transcription.clock import Clock
from live_transcription.config import Settings
from live_transcription.stt.base import Frame
from live_transcription.stt.pool import PoolOptions
from live_transcription.stt.remote import RemoteEngine, RemoteOptions
from live_transcription.stt.wire import (
    FlushStep,
    Ignored,
    Padding,
    SendMarker,
    ServerError,
    ServerEvent,
    ServerMarker,
    ServerPause,
    ServerProgress,
    ServerReady,
    ServerWord,
    WireProtocol,
)

STT_1B_DELAY_FRAMES = 6
"""``kyutai/stt-1b-en_fr``: 0.48 s. (``stt-2.6b-en`` has 32.)"""
PAUSE_THRESHOLD = 0.5

KEEPALIVE_SECONDS = 10.0
"""moshi-server closes after 20 s with nothing received: an idle pooled
connection gets one silent frame this often."""


class MoshiProtocol(WireProtocol):
    """moshi-server's asr-streaming messages, pure."""

    needs_ready = True
    flush_by_marker = True

    def __init__(self, delay_frames: int = STT_1B_DELAY_FRAMES) -> None:
        self.delay_frames = delay_frames
        self.paused = False

    def reset(self) -> None:
        self.paused = False

    def encode_audio(self, frame: Frame) -> bytes:
        packed: bytes = msgpack.packb({"type": "Audio", "pcm": frame.tolist()})
        return packed

    def encode_marker(self, marker_id: int) -> bytes:
        packed: bytes = msgpack.packb({"type": "Marker", "id": marker_id})
        return packed

    def flush_plan(self, marker_id: int, quiet_frames: int = 0) -> list[FlushStep]:
        padding = self.delay_frames + 1
        return [Padding(max(0, padding - quiet_frames)), SendMarker(marker_id), Padding(padding)]

    def parse(self, message: str | bytes) -> list[ServerEvent]:
        return parse_moshi_message(message, self)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and abs(number) < 1e12 else None


def parse_moshi_message(message: str | bytes, state: MoshiProtocol) -> list[ServerEvent]:
    """One server message -> events. Never raises."""
    if isinstance(message, str):
        return [Ignored("text frame (msgpack expected)")]
    try:
        data = msgpack.unpackb(message, raw=False, strict_map_key=False)
    except Exception:
        return [Ignored("malformed msgpack")]
    if not isinstance(data, dict):
        return [Ignored("message is not a map")]
    kind = data.get("type")
    if kind == "Word":
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            return [Ignored("Word without text")]
        state.paused = False
        return [ServerWord(text.strip(), start_seconds=_number(data.get("start_time")))]
    if kind == "Step":
        events: list[ServerEvent] = []
        step = _number(data.get("step_idx"))
        if step is not None and step >= 0:
            events.append(ServerProgress(int(step) + 1))
        prs = data.get("prs")
        if isinstance(prs, list | tuple) and len(prs) > 2:
            pause = _number(prs[2])
            if pause is not None:
                paused = pause > PAUSE_THRESHOLD
                if paused and not state.paused:
                    events.append(ServerPause())
                state.paused = paused
        return events
    if kind == "EndWord":
        return []
    if kind == "Marker":
        marker = data.get("id")
        if isinstance(marker, int) and not isinstance(marker, bool):
            return [ServerMarker(marker)]
        return [Ignored("Marker without id")]
    if kind == "Ready":
        return [ServerReady()]
    if kind == "Error":
        detail = data.get("message")
        text = detail if isinstance(detail, str) else "unspecified error"
        return [ServerError(text, capacity="no free channels" in text.lower())]
    return [Ignored(f"unknown message type {str(kind)[:40]!r}")]


class MoshiEngine(RemoteEngine):
    """Kyutai STT on a self-hosted moshi-server."""

    name = "moshi"

    def __init__(
        self,
        url: str,
        api_key: str = "",
        *,
        delay_frames: int = STT_1B_DELAY_FRAMES,
        options: RemoteOptions | None = None,
        pool: PoolOptions | None = None,
        clock: Clock | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not url.rstrip("/").endswith("/api/asr-streaming"):
            url = url.rstrip("/") + "/api/asr-streaming"
        headers = {"kyutai-api-key": api_key} if api_key else {}
        super().__init__(
            url,
            headers,
            lambda: MoshiProtocol(delay_frames),
            options=options,
            pool=pool or PoolOptions(keepalive_seconds=KEEPALIVE_SECONDS),
            clock=clock,
            ssl_context=ssl_context,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> MoshiEngine:
        pool = PoolOptions(
            headroom=settings.stt_pool_headroom,
            max_connections=settings.stt_pool_max,
            keepalive_seconds=KEEPALIVE_SECONDS,
        )
        options = RemoteOptions(stall_seconds=settings.stt_stall_seconds)
        return cls(settings.moshi_url, settings.moshi_api_key.get_secret_value(), options=options, pool=pool)
