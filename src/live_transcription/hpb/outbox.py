"""What the link still has to send, bounded, with partial throttling. Pure.

Two lanes, control first:
- control (requestoffer, answer, candidate, bye): bounded; when full the
  message is refused (``add_control`` returns False, the caller logs it).
- transcripts: bounded, oldest dropped first and counted in
  ``transcripts_dropped`` (only happens while the HPB is gone for long).
Partials are throttled per speaker: at most one per ``partial_interval``;
a newer partial replaces the pending one; a final is queued at once and
cancels the speaker's pending partial. A pending partial that never goes
out is counted (per target) in ``partials_superseded``. Time is passed in
by the owner.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal

Message = dict[str, Any]
TranscriptBuilder = Callable[[str, str, str, bool, str], Message]
"""(target, speaker, text, final, language) -> message (the owner assigns ids)."""
Lane = Literal["control", "partial", "final"]


@dataclass(frozen=True, slots=True)
class _Partial:
    targets: tuple[str, ...]
    text: str
    language: str


class Outbox:
    def __init__(
        self,
        build_transcript: TranscriptBuilder,
        *,
        control_limit: int = 1024,
        transcript_limit: int = 512,
        partial_interval: float = 0.3,
    ) -> None:
        self._build = build_transcript
        self._control: deque[Message] = deque()
        self._control_limit = control_limit
        self._transcripts: deque[tuple[Message, bool]] = deque(maxlen=transcript_limit)
        self.partial_interval = partial_interval
        self._pending: dict[str, _Partial] = {}
        self._last_partial: dict[str, float] = {}
        self.transcripts_dropped = 0
        self.partials_superseded = 0
        self.control_refused = 0

    def __len__(self) -> int:
        return len(self._control) + len(self._transcripts)

    # --- control -------------------------------------------------------------
    def add_control(self, message: Message) -> bool:
        if len(self._control) >= self._control_limit:
            self.control_refused += 1
            return False
        self._control.append(message)
        return True

    def clear_control(self) -> int:
        """Forget queued control messages (they belonged to an old session)."""
        count = len(self._control)
        self._control.clear()
        return count

    # --- transcripts -----------------------------------------------------------
    def _queue_all(
        self, targets: Collection[str], speaker: str, text: str, final: bool, language: str
    ) -> None:
        for target in targets:
            if len(self._transcripts) == self._transcripts.maxlen:
                self.transcripts_dropped += 1
            self._transcripts.append((self._build(target, speaker, text, final, language), final))

    def _supersede(self, speaker: str) -> None:
        replaced = self._pending.pop(speaker, None)
        if replaced is not None:
            self.partials_superseded += len(replaced.targets)

    def add_transcript(
        self,
        targets: Collection[str],
        speaker: str,
        text: str,
        final: bool,
        language: str,
        *,
        now: float,
    ) -> None:
        if final:
            self._supersede(speaker)
            self._queue_all(targets, speaker, text, True, language)
            return
        partial = _Partial(tuple(targets), text, language)
        last = self._last_partial.get(speaker)
        if speaker not in self._pending and (last is None or now - last >= self.partial_interval):
            self._last_partial[speaker] = now
            self._queue_all(partial.targets, speaker, text, False, language)
        else:
            self._supersede(speaker)
            self._pending[speaker] = partial  # the newest wins

    def clear_transcripts(self) -> int:
        """Forget queued and pending transcripts (the link is closing); returns
        how many messages were queued."""
        count = len(self._transcripts)
        self._transcripts.clear()
        self._pending.clear()
        self._last_partial.clear()
        return count

    def forget_speaker(self, speaker: str) -> None:
        self._supersede(speaker)
        self._last_partial.pop(speaker, None)

    def release_due(self, now: float) -> None:
        """Queue the pending partials whose interval has ended."""
        for speaker in [s for s in self._pending if self._due(s) <= now]:
            partial = self._pending.pop(speaker)
            self._last_partial[speaker] = now
            self._queue_all(partial.targets, speaker, partial.text, False, partial.language)
        # a speaker whose interval ended and has nothing pending needs no entry
        for speaker in [
            s
            for s, at in self._last_partial.items()
            if s not in self._pending and now - at >= self.partial_interval
        ]:
            del self._last_partial[speaker]

    def _due(self, speaker: str) -> float:
        return self._last_partial.get(speaker, float("-inf")) + self.partial_interval

    def next_due(self) -> float | None:
        """When the earliest pending partial may go, None if none is pending."""
        return min((self._due(s) for s in self._pending), default=None)

    # --- sending ---------------------------------------------------------------
    def peek(self) -> Message | None:
        if self._control:
            return self._control[0]
        if self._transcripts:
            return self._transcripts[0][0]
        return None

    def sent(self, message: Message) -> Lane | None:
        """Remove ``message`` (from ``peek``) once it was sent and say which
        lane it left; the lanes may have changed meanwhile, so it is matched
        by identity (None: it was dropped or cleared while being sent)."""
        if self._control and self._control[0] is message:
            self._control.popleft()
            return "control"
        if self._transcripts and self._transcripts[0][0] is message:
            _, final = self._transcripts.popleft()
            return "final" if final else "partial"
        return None


def backoff_delay(
    attempt: int,
    rng: random.Random,
    *,
    base: float = 0.5,
    cap: float = 30.0,
    jitter: float = 0.5,
) -> float:
    """Exponential backoff: ``min(cap, base * 2**attempt)`` reduced by up to
    ``jitter`` (a fraction) at random, so reconnecting links spread out."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return ceiling * (1.0 - jitter * rng.random())
