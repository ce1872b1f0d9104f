"""Caps on speakers: per room, per process, and a memory guard.

One ``Admission`` per process, shared by the rooms on the event loop; only
``acquire``/``release`` change it, and neither awaits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: str
    """Metric label: room-cap | process-cap | memory."""
    reason: str
    """For the log line."""


class Admission:
    def __init__(
        self,
        *,
        max_speakers: int,
        max_speakers_per_room: int,
        memory_limit_bytes: int = 0,
        rss_bytes: Callable[[], int] | None = None,
    ) -> None:
        self.max_speakers = max_speakers
        self.max_speakers_per_room = max_speakers_per_room
        self.memory_limit_bytes = memory_limit_bytes
        self._rss_bytes = rss_bytes
        self.active = 0
        self.refused = 0

    def refusal(self, speakers_in_room: int) -> Refusal | None:
        """Why one more speaker cannot be admitted, None if it can (no count)."""
        if speakers_in_room >= self.max_speakers_per_room:
            return Refusal("room-cap", f"room cap of {self.max_speakers_per_room} speakers reached")
        if self.active >= self.max_speakers:
            return Refusal("process-cap", f"process cap of {self.max_speakers} speakers reached")
        if self.memory_limit_bytes and self._rss_bytes is not None:
            rss = self._rss_bytes()
            if rss >= self.memory_limit_bytes:
                return Refusal(
                    "memory", f"memory guard: RSS {rss >> 20} MB >= {self.memory_limit_bytes >> 20} MB"
                )
        return None

    def refusal_reason(self, speakers_in_room: int) -> str | None:
        refusal = self.refusal(speakers_in_room)
        return None if refusal is None else refusal.reason

    def try_admit(self, speakers_in_room: int) -> Refusal | None:
        """Like ``refusal`` but counts a refusal in ``refused``."""
        refusal = self.refusal(speakers_in_room)
        if refusal is not None:
            self.refused += 1
        return refusal

    def can_admit(self, speakers_in_room: int) -> bool:
        return self.try_admit(speakers_in_room) is None

    @property
    def saturated(self) -> bool:
        return self.active >= self.max_speakers

    def acquire(self) -> None:
        self.active += 1

    def release(self) -> None:
        self.active = max(0, self.active - 1)
