"""What happened to recent room joins: health is told from this, not only
from the rooms that exist now (a room whose join failed is gone at once).

Owned by the Manager (one event loop, no awaits inside). Time comes from the
injected clock. Joins and the rooms' reconnection attempts also feed the
process's ``OutageTracker``: an HPB outage is logged once when it starts
(with its cause) and once when it ends, whatever the number of rooms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from live_transcription import metrics
from live_transcription.clock import Clock
from live_transcription.hpb.failures import FailureCause, describe_failure
from live_transcription.rooms import ports
from live_transcription.rooms.outage import OutageTracker, log_transition

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
"""Failures older than this no longer count; failures throughout this long
(none succeeding) make health ``failing``."""
STALLED_AFTER_SECONDS = 10.0
"""A join pending longer than this is reported (a silent HPB)."""


@dataclass(frozen=True, slots=True)
class JoinReport:
    pending: int
    """Rooms waiting for the HPB to accept their join."""
    stalled: int
    """Of those, waiting longer than ``stalled_after``."""
    stalled_after: float
    failures: int
    """Joins failed since the last success (0 once the newest is older than the window)."""
    cause: str | None
    """The newest failure's cause, in plain words."""
    failing_for: float | None
    """Seconds every join has been failing, when that is at least the window."""
    window: float


class JoinHistory:
    def __init__(
        self,
        clock: Clock,
        *,
        window: float = WINDOW_SECONDS,
        stalled_after: float = STALLED_AFTER_SECONDS,
    ) -> None:
        self._clock = clock
        self.window = window
        self.stalled_after = stalled_after
        self._pending: dict[object, float] = {}
        self._streak_failures = 0
        self._streak_started: float | None = None
        self._last_failure: float | None = None
        self._last_cause: FailureCause | None = None
        self.outage = OutageTracker(clock)

    def started(self, join: object) -> None:
        self._pending[join] = self._clock.now()

    def abandoned(self, join: object) -> None:
        """We gave up on it ourselves (leave, disable, shutdown): no outcome."""
        self._pending.pop(join, None)

    def succeeded(self, join: object) -> bool:
        """Record a join; False when it was no longer pending (abandoned)."""
        if self._pending.pop(join, None) is None:
            return False
        self._streak_failures = 0
        self._streak_started = self._last_failure = None
        self._last_cause = None
        log_transition(self.outage.succeeded())
        return True

    def link_event(self, room: object, event: ports.LinkState | ports.ReconnectFailed) -> None:
        """A joined room's HPB link changed state or failed an attempt to reconnect."""
        match event:
            case ports.ReconnectFailed(cause=cause, began=began):
                log_transition(self.outage.failed("reconnect", cause, began=began))
            case ports.LinkState(state="connected"):
                log_transition(self.outage.succeeded())

    def failed(self, join: object, error: BaseException) -> FailureCause | None:
        """Record a failed join; None when it was no longer pending."""
        began = self._pending.pop(join, None)
        if began is None:
            return None
        now = self._clock.now()
        cause = describe_failure(error)
        metrics.room_joins_failed.labels(cause.kind).inc()
        if self._last_failure is not None and now - self._last_failure > self.window:
            # quiet for longer than the window: what we knew of the outage is stale
            self._streak_started = None
            self._streak_failures = 0
        if self._streak_started is None:
            self._streak_started = now
        log_transition(self.outage.failed("join", cause, began=began))
        self._streak_failures += 1
        self._last_failure = now
        self._last_cause = cause
        return cause

    def report(self) -> JoinReport:
        now = self._clock.now()
        stalled = sum(1 for since in self._pending.values() if now - since >= self.stalled_after)
        recent = self._last_failure is not None and now - self._last_failure <= self.window
        failing_for = None
        if recent and self._streak_started is not None and now - self._streak_started >= self.window:
            failing_for = now - self._streak_started
        return JoinReport(
            pending=len(self._pending),
            stalled=stalled,
            stalled_after=self.stalled_after,
            failures=self._streak_failures if recent else 0,
            cause=self._last_cause.words if recent and self._last_cause else None,
            failing_for=failing_for,
            window=self.window,
        )
