"""Kyutai STT served on Modal (``/v1/stream``): the production engine.

Wire format (PROTOCOLS.md section 3): the client sends binary frames of raw
float32 little-endian mono PCM at 24 kHz, 1920 samples each; the server sends
text JSON ``{"type": "token", "text": ...}``.

* The current server sends whole words with their punctuation and no leading
  space; the service inserts the spaces (``Word.joins_previous`` is False).
* The legacy server sends pieces, a leading space starting a new word, plus
  ``vad_end``, ``ping`` and ``error`` messages. The first token with a
  leading space (or a ``vad_end``) switches the parser to legacy mode for
  the connection.

The server never says it paused and does not flush on close: the stream's
flush makes sure >= 1 s of silence follows the speech (the quiet frames the
utterance ended with count) and waits until no token has come for
``flush_quiet_seconds`` (on the injected clock), then emits ``Pause``.
"""

from __future__ import annotations

import json
import ssl

from live_transcription.clock import Clock
from live_transcription.config import Settings
from live_transcription.stt.base import FRAME_SECONDS, Frame
from live_transcription.stt.pool import PoolOptions
from live_transcription.stt.remote import RemoteEngine, RemoteOptions
from live_transcription.stt.wire import (
    FlushStep,
    Ignored,
    Padding,
    ServerError,
    ServerEvent,
    ServerPause,
    ServerWord,
    WireProtocol,
)

MODEL_DELAY_SECONDS = 0.48
FLUSH_SILENCE_SECONDS = 1.04
"""Silence sent to push the last words out of the model: >= 1 s, whole frames."""
KEEPALIVE_SECONDS = 20.0
"""The server closes after 30 s without a binary frame: an idle pooled
connection gets one silent frame this often."""


class ModalProtocol(WireProtocol):
    """The Modal Kyutai server's messages, pure."""

    delay_frames = round(MODEL_DELAY_SECONDS / FRAME_SECONDS)
    needs_ready = False
    flush_by_marker = False

    def __init__(self) -> None:
        self.legacy = False

    def reset(self) -> None:
        self.legacy = False

    def encode_audio(self, frame: Frame) -> bytes:
        return frame.astype("<f4", copy=False).tobytes()

    def flush_plan(self, marker_id: int, quiet_frames: int = 0) -> list[FlushStep]:
        needed = round(FLUSH_SILENCE_SECONDS / FRAME_SECONDS)
        return [Padding(max(0, needed - quiet_frames))]

    def parse(self, message: str | bytes) -> list[ServerEvent]:
        return parse_modal_message(message, self)


def parse_modal_message(message: str | bytes, state: ModalProtocol) -> list[ServerEvent]:
    """One server message -> events. Never raises."""
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError:
            return [Ignored("non-UTF-8 message")]
    try:
        data = json.loads(message)
    except (ValueError, RecursionError):
        return [Ignored("malformed JSON")]
    if not isinstance(data, dict):
        return [Ignored("message is not a JSON object")]
    kind = data.get("type")
    if kind == "token":
        text = data.get("text")
        if not isinstance(text, str):
            return [Ignored("token without text")]
        if text[:1].isspace():
            state.legacy = True
            word = text.strip()
            return [ServerWord(word)] if word else []
        word = text.strip()
        if not word:
            return []
        # legacy pieces without a leading space continue the previous word
        return [ServerWord(word, joins_previous=state.legacy)]
    if kind == "vad_end":
        state.legacy = True
        return [ServerPause()]
    if kind == "ping":
        return []
    if kind == "error":
        detail = data.get("message")
        return [ServerError(detail if isinstance(detail, str) else "unspecified error")]
    return [Ignored(f"unknown message type {str(kind)[:40]!r}")]


def modal_headers(settings: Settings) -> dict[str, str]:
    """``Modal-Key``/``Modal-Secret``, only when set (a full ``LT_MODAL_URL``
    may point at a server without auth)."""
    headers = {}
    key = settings.modal_key.get_secret_value()
    secret = settings.modal_secret.get_secret_value()
    if key:
        headers["Modal-Key"] = key
    if secret:
        headers["Modal-Secret"] = secret
    return headers


class ModalEngine(RemoteEngine):
    """Kyutai STT on Modal. ``url`` and ``headers`` as ``from_settings`` builds them."""

    name = "modal"

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        *,
        options: RemoteOptions | None = None,
        pool: PoolOptions | None = None,
        clock: Clock | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            url,
            headers,
            ModalProtocol,
            options=options,
            pool=pool or PoolOptions(keepalive_seconds=KEEPALIVE_SECONDS),
            clock=clock,
            ssl_context=ssl_context,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: object) -> ModalEngine:
        pool = PoolOptions(
            headroom=settings.stt_pool_headroom,
            max_connections=settings.stt_pool_max,
            keepalive_seconds=KEEPALIVE_SECONDS,
        )
        options = RemoteOptions(stall_seconds=settings.stt_stall_seconds)
        return cls(settings.modal_stream_url, modal_headers(settings), options=options, pool=pool, **kwargs)  # type: ignore[arg-type]
