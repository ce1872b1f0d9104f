"""Whether the signaling server (HPB) can be reached, told from what every
room's joins and reconnection attempts did: one process-wide view, so an
outage is logged once, not per room and attempt.

An outage starts with a failed attempt while none is ongoing, and ends with
the first attempt that succeeds. A failed attempt that began before the last
success (it raced the recovery) starts none. ``OutageTracker`` is pure: it
returns the transition, and ``log_transition`` writes the two lines, a
WARNING with the cause at the start and an INFO at the end with how long it
lasted and how many attempts failed. What happens in between is counted,
not logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from live_transcription.clock import Clock
from live_transcription.hpb.failures import FailureCause

log = logging.getLogger(__name__)

Attempt = Literal["join", "reconnect"]


@dataclass(frozen=True, slots=True)
class OutageStarted:
    cause: FailureCause


@dataclass(frozen=True, slots=True)
class OutageEnded:
    cause: FailureCause
    """What it started with."""
    seconds: float
    failed_joins: int
    failed_reconnects: int


class OutageTracker:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._since: float | None = None
        self._cause: FailureCause | None = None
        self._failed: dict[Attempt, int] = {"join": 0, "reconnect": 0}
        self._last_success: float | None = None

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    @property
    def failed_attempts(self) -> int:
        """Attempts failed in the ongoing outage (0 when there is none)."""
        return sum(self._failed.values()) if self._since is not None else 0

    def failed(self, attempt: Attempt, cause: FailureCause, *, began: float) -> OutageStarted | None:
        """An attempt that began at ``began`` (clock time) failed."""
        if self._since is not None:
            self._failed[attempt] += 1
            return None
        if self._last_success is not None and began < self._last_success:
            return None  # it raced the recovery: nothing new
        self._since = self._clock.now()
        self._cause = cause
        self._failed = {"join": 0, "reconnect": 0}
        self._failed[attempt] += 1
        return OutageStarted(cause)

    def succeeded(self) -> OutageEnded | None:
        """A join or a reconnection succeeded: the HPB can be reached."""
        now = self._clock.now()
        self._last_success = now
        if self._since is None or self._cause is None:
            return None
        ended = OutageEnded(
            cause=self._cause,
            seconds=now - self._since,
            failed_joins=self._failed["join"],
            failed_reconnects=self._failed["reconnect"],
        )
        self._since = self._cause = None
        return ended


def log_transition(transition: OutageStarted | OutageEnded | None) -> None:
    match transition:
        case OutageStarted(cause):
            log.warning(
                "cannot reach the signaling server (%s): rooms cannot be joined or kept",
                cause.words,
                extra={"event": "hpb-outage", "state": "started", "cause": cause.kind},
            )
        case OutageEnded() as ended:
            log.info(
                "signaling server reachable again after %.0f s (%d join(s) and %d reconnection "
                "attempt(s) failed meanwhile)",
                ended.seconds,
                ended.failed_joins,
                ended.failed_reconnects,
                extra={"event": "hpb-outage", "state": "ended", "cause": ended.cause.kind},
            )
