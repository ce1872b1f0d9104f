"""Protocol-faithful fakes of the remote STT servers, over real WebSockets.

Both fakes "recognise" synthetic audio: a frame whose samples all equal
``code_of(word_id)`` carries that word, a frame of zeros is silence. A word is
a run of identical frames; ``speech([0, 1, 2])`` builds the frames of an
utterance (each word ``FRAMES_PER_WORD`` frames, one silent frame between
words). Words come back after the model delay, counted in frames received,
like the real servers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FRAME_SAMPLES = 1_920
FRAME_SECONDS = 0.08
FRAMES_PER_WORD = 3
GAP_FRAMES = 1

VOCABULARY: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliett", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu",
)  # fmt: skip

Frame = npt.NDArray[np.float32]
_SCALE = 64.0


def code_of(word_id: int) -> float:
    return (word_id + 1) / _SCALE


def word_frame(word_id: int) -> Frame:
    return np.full(FRAME_SAMPLES, code_of(word_id), dtype=np.float32)


def silence_frame() -> Frame:
    return np.zeros(FRAME_SAMPLES, dtype=np.float32)


def speech(
    word_ids: Sequence[int], frames_per_word: int = FRAMES_PER_WORD, gap: int = GAP_FRAMES
) -> list[Frame]:
    frames: list[Frame] = []
    for word_id in word_ids:
        frames.extend(word_frame(word_id) for _ in range(frames_per_word))
        frames.extend(silence_frame() for _ in range(gap))
    return frames


def decode_frame(samples: Frame) -> int:
    """0 for silence, word_id + 1 for a word frame, -1 for anything else."""
    if samples.size == 0:
        return -1
    first = float(samples[0])
    if not np.all(samples == samples[0]):
        return -1
    if first == 0.0:
        return 0
    code = round(first * _SCALE)
    if code < 1 or abs(code / _SCALE - first) > 1e-6:
        return -1
    return code


class Recogniser:
    """The fakes' shared 'model': word runs in, (end_index, word_id) out."""

    def __init__(self) -> None:
        self.received = 0
        self.current = 0
        self.run_start = 0
        self.silence_run = 0

    def feed(self, code: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """Returns (word started: (start, id)) and (word ended: (end, id))."""
        started = ended = None
        if code != self.current:
            if self.current > 0:
                ended = (self.received, self.current - 1)
            if code > 0:
                started = (self.received, code - 1)
            self.current = code
            self.run_start = self.received
        self.silence_run = self.silence_run + 1 if code == 0 else 0
        self.received += 1
        return started, ended
