"""The benchmark's fake-STT model (words from voiced frames) and load counts."""

from __future__ import annotations

import numpy as np
import pytest
from bench.stt_server import Load

from tests.fakes.energy import EnergyWords

VOICED = np.full(1920, 0.1, dtype=np.float32)
SILENT = np.zeros(1920, dtype=np.float32)


def _feed(model: EnergyWords, frames: list[np.ndarray]) -> list[tuple[int, str]]:
    out = []
    for index, frame in enumerate(frames):
        out += [(index, text) for text, _, _ in model.feed(frame)]
    return out


def test_a_word_on_every_nth_voiced_frame_at_zero_delay() -> None:
    words = _feed(EnergyWords(frames_per_word=4), [SILENT] + [VOICED] * 8)
    assert words == [(4, "w4"), (8, "w8")]


def test_silence_starts_the_count_again() -> None:
    frames = [VOICED] * 3 + [SILENT] + [VOICED] * 4
    assert _feed(EnergyWords(frames_per_word=4), frames) == [(7, "w7")]


def test_a_delay_holds_words_back_by_frames_received() -> None:
    model = EnergyWords(frames_per_word=2, delay_frames=3)
    words = _feed(model, [VOICED] * 2 + [SILENT] * 3)
    assert words == [(4, "w1")]
    assert model.pending == 0


def test_the_word_spans_its_frames() -> None:
    model = EnergyWords(frames_per_word=2)
    model.feed(VOICED)
    assert model.feed(VOICED) == [("w1", 0, 2)]


def test_nonsense_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="frames_per_word"):
        EnergyWords(frames_per_word=0)


def test_load_integrates_open_streams_and_resets_all_but_the_live_state() -> None:
    load = Load(_since=0.0)
    load.opened(0.0)
    load.opened(1.0)
    load.audio(0.08, voiced=True)
    load.audio(0.08, voiced=False)
    load.words_total = load.words = 5
    first = load.snapshot(3.0, reset=True)
    assert first["stream_seconds"] == pytest.approx(1 * 1.0 + 2 * 2.0)
    assert first["open_max"] == 2
    assert first["voiced_seconds"] == pytest.approx(0.08)
    assert first["audio_seconds"] == pytest.approx(0.16)
    load.closed(4.0)
    second = load.snapshot(5.0, reset=False)
    assert second["stream_seconds"] == pytest.approx(2 * 1.0 + 1 * 1.0)
    assert second["open_now"] == 1
    assert second["open_max"] == 2  # still open at the reset
    assert second["words"] == 0
    assert second["words_total"] == 5  # never reset
    assert second["connections_closed"] == 1
