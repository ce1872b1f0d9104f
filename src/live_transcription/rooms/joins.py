"""What happened to recent room joins: health is told from this, not only
from the rooms that exist now (a room whose join failed is gone at once).

Owned by the Manager (one event loop, no awaits inside). Time comes from the
injected clock. An HPB outage (joins failing since the last success, or
rooms' links reconnecting) is logged once as a WARNING with its cause when
it starts and once as an INFO when it is over (a join succeeded and no link
is reconnecting); what happens in between is counted, not logged here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from live_transcription import metrics
from live_transcription.clock import Clock
from live_transcription.hpb.failures import FailureCause, describe_failure

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
        self._reconnecting: set[object] = set()
        self._outage_since: float | None = None
        self._reconnected = 0

    def started(self, join: object) -> None:
        self._pending[join] = self._clock.now()

    def abandoned(self, join: object) -> None:
        """We gave up on it ourselves (leave, disable, shutdown): no outcome."""
        self._pending.pop(join, None)

    def succeeded(self, join: object) -> bool:
        """Record a join; False when it was no longer pending (abandoned)."""
        if self._pending.pop(join, None) is None:
            return False
        failures = self._streak_failures
        self._streak_failures = 0
        self._streak_started = self._last_failure = None
        self._last_cause = None
        self._outage_maybe_over(failures)
        return True

    def link_state(self, room: object, state: str) -> None:
        """A joined room's HPB link changed state (``reconnecting``,
        ``connected``, ``closed``)."""
        if state == "reconnecting":
            self._reconnecting.add(room)
            self._outage_begins(FailureCause("connection-lost", "connection lost"))
        elif room in self._reconnecting:
            self._reconnecting.discard(room)
            if state == "connected":  # a room closed while reconnecting proves nothing
                self._reconnected += 1
                self._outage_maybe_over(0)

    def _outage_begins(self, cause: FailureCause) -> None:
        if self._outage_since is not None:
            return
        self._outage_since = self._clock.now()
        self._reconnected = 0
        log.warning(
            "cannot reach the signaling server (%s): rooms cannot be joined or kept",
            cause.words,
            extra={"event": "hpb-outage", "cause": cause.kind},
        )

    def _outage_maybe_over(self, failures: int) -> None:
        if self._outage_since is None or self._reconnecting or self._streak_started is not None:
            return
        log.info(
            "signaling server reachable again after %.0f s (%d failed join(s), %d room(s) reconnected)",
            self._clock.now() - self._outage_since,
            failures,
            self._reconnected,
            extra={"event": "hpb-outage-end"},
        )
        self._outage_since = None

    def failed(self, join: object, error: BaseException) -> FailureCause | None:
        """Record a failed join; None when it was no longer pending."""
        if self._pending.pop(join, None) is None:
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
        self._outage_begins(cause)
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
