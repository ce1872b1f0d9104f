"""The fakes' model for real (Opus-decoded) audio, where the exact code
frames of ``tests.fakes`` do not survive: a word completes on every
``frames_per_word``-th voiced 80 ms frame since the last silent frame, and
is due ``delay_frames`` frames after that. Pure; shared by the Modal fake
(``FakeModalKyutai(model="energy")``) and the benchmark's STT server.

Words are named after the connection's frame index (``w7``): the same audio
on another connection gives other names, so a test that needs exact words
uses the code-frame model instead.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

SILENCE_POWER = 1e-6
"""Mean square below this is a silent frame (-60 dBFS), as the instant engine decides."""

Samples = npt.NDArray[np.float32]


class EnergyWords:
    """``feed`` returns the words due after the frame just received, as
    (text, start frame, end frame)."""

    def __init__(self, frames_per_word: int = 4, delay_frames: int = 0) -> None:
        if frames_per_word < 1 or delay_frames < 0:
            raise ValueError("frames_per_word >= 1 and delay_frames >= 0")
        self.frames_per_word = frames_per_word
        self.delay_frames = delay_frames
        self.received = 0
        self.voiced_run = 0
        self.silence_run = 0
        self._pending: list[tuple[int, str, int, int]] = []

    @staticmethod
    def voiced(samples: Samples) -> bool:
        return samples.size > 0 and float(np.dot(samples, samples)) >= SILENCE_POWER * samples.size

    def feed(self, samples: Samples) -> list[tuple[str, int, int]]:
        index = self.received
        self.received += 1
        if self.voiced(samples):
            self.silence_run = 0
            self.voiced_run += 1
            if self.voiced_run % self.frames_per_word == 0:
                start = index + 1 - self.frames_per_word
                self._pending.append((index + self.delay_frames, f"w{index}", start, index + 1))
        else:
            self.silence_run += 1
            self.voiced_run = 0
        due = []
        while self._pending and self._pending[0][0] <= index:
            _, text, start, end = self._pending.pop(0)
            due.append((text, start, end))
        return due

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def mid_word(self) -> bool:
        """Inside a word: voiced frames received that have not completed one."""
        return self.voiced_run % self.frames_per_word != 0
