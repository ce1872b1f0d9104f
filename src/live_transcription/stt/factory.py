"""The engine the settings ask for."""

from __future__ import annotations

from live_transcription.config import Engine, Settings
from live_transcription.stt.base import SttEngine


def create_engine(settings: Settings) -> SttEngine:
    """Build (not yet start) the engine named by ``LT_STT_ENGINE``. Imports are
    local so that a deployment only loads what it uses (the embedded model is
    heavy)."""
    match settings.engine:
        case Engine.MODAL:
            from live_transcription.stt.modal import ModalEngine  # noqa: PLC0415

            return ModalEngine.from_settings(settings)
        case Engine.MOSHI:
            from live_transcription.stt.moshi import MoshiEngine  # noqa: PLC0415

            return MoshiEngine.from_settings(settings)
        case Engine.EMBEDDED:
            from live_transcription.stt.embedded import EmbeddedEngine  # noqa: PLC0415

            return EmbeddedEngine.from_settings(settings)
        case Engine.INSTANT:
            from live_transcription.stt.instant import InstantEngine  # noqa: PLC0415

            return InstantEngine()
