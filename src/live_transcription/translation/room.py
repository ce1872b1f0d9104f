"""One room's translations: finals in, translated finals out, in order.

The room hands each final caption to ``on_final`` with the target languages
its listeners chose; this worker (a task of the room's TaskGroup) asks the
process's Translator for one translation per (final, language), however
many people read that language, and hands results back to the room in the
order each speaker spoke, per language. At most ``max_jobs`` translations
of the room are in flight; beyond that a final's translation is dropped and
counted (``room-busy``), as is everything that fails or comes too late.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from live_transcription import metrics
from live_transcription.clock import Clock
from live_transcription.logs import fields, short_token
from live_transcription.translation.ordering import InOrder
from live_transcription.translation.translator import Dropped, Job, Outcome, Translated, Translator

log = logging.getLogger(__name__)

FINALS_WAITING = 64
"""Finals handed over and not yet turned into jobs (the worker is behind)."""

Deliver = Callable[[str, str, str], int]
"""``deliver(speaker, language, text)``: send a translated final to the room's
readers of ``language``; returns how many it went to."""


@dataclass(frozen=True, slots=True)
class TranslationSetup:
    """What a room needs to translate: the process's Translator and its bounds."""

    translator: Translator
    timeout: float = 15.0
    """A translation not back this long after its final is dropped (``late``)."""
    max_jobs: int = 8
    """Translations of one room in flight at once."""


@dataclass(frozen=True, slots=True)
class _Final:
    speaker: str
    text: str
    room_language: str
    targets: frozenset[str]
    at: float


@dataclass(frozen=True, slots=True)
class _Done:
    speaker: str
    target: str
    ticket: int
    started: float
    outcome: Outcome


@dataclass(slots=True)
class TranslationStats:
    requested: int = 0
    delivered: int = 0
    dropped: int = 0


class RoomTranslations:
    def __init__(
        self,
        token: str,
        translator: Translator,
        deliver: Deliver,
        *,
        clock: Clock,
        timeout: float,
        max_jobs: int,
    ) -> None:
        self._token = token
        self._translator = translator
        self._deliver = deliver
        self._clock = clock
        self._timeout = timeout
        self._max_jobs = max_jobs
        # room-busy finals are refused before they are queued and every job
        # yields one _Done, so this queue can never be full: nothing blocks
        self._inbox: asyncio.Queue[_Final | _Done] = asyncio.Queue(maxsize=FINALS_WAITING + max_jobs)
        self._finals_waiting = 0
        self._in_flight = 0
        self._order: InOrder[tuple[str, str], tuple[float, Outcome]] = InOrder()
        self.stats = TranslationStats()
        self._closed = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def held_back(self) -> int:
        """Translations done but waiting for an earlier final of their speaker."""
        return self._order.held_back()

    # --- the room's side (synchronous, never blocks) --------------------------------------
    def on_final(self, speaker: str, text: str, room_language: str, targets: Collection[str]) -> None:
        wanted = frozenset(targets) - {room_language}
        if not wanted:
            return
        self.stats.requested += len(wanted)
        metrics.translations_requested.inc(len(wanted))
        if self._closed:  # the room's last words, flushed as it ends
            self._drop("shutdown", len(wanted))
            return
        if self._finals_waiting >= FINALS_WAITING:
            self._drop("room-busy", len(wanted))
            return
        self._finals_waiting += 1
        self._inbox.put_nowait(_Final(speaker, text, room_language, wanted, self._clock.now()))

    # --- the worker -----------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            item = await self._inbox.get()
            if isinstance(item, _Final):
                self._finals_waiting -= 1
                self._start(item)
            else:
                self._in_flight -= 1
                for started, outcome in self._order.resolve(
                    (item.speaker, item.target), item.ticket, (item.started, item.outcome)
                ):
                    self._release(item.speaker, item.target, started, outcome)

    def close(self) -> None:
        """The room ends: what was not delivered yet is counted as dropped."""
        self._closed = True
        unfinished = self._order.pending()
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, _Final):
                unfinished += len(item.targets)
        self._finals_waiting = 0
        self._order = InOrder()
        if unfinished:
            self._drop("shutdown", unfinished)

    def _start(self, final: _Final) -> None:
        languages = self._translator.current()
        if languages is None:
            self._drop("no-provider", len(final.targets))
            return
        origin = languages.origin_for(final.room_language)
        for target in sorted(final.targets):
            if origin is None or target not in languages.target:
                self._drop("unsupported", 1)
                continue
            if self._in_flight >= self._max_jobs:
                self._drop("room-busy", 1)
                continue
            ticket = self._order.add((final.speaker, target))
            self._in_flight += 1
            self._translator.submit(
                Job(
                    text=final.text,
                    origin=origin,
                    target=target,
                    deadline=final.at + self._timeout,
                    done=self._done_callback(final.speaker, target, ticket, final.at),
                    custom_id=f"lt-{self._token}-{final.room_language}-{target}",
                )
            )

    def _done_callback(
        self, speaker: str, target: str, ticket: int, started: float
    ) -> Callable[[Outcome], None]:
        def done(outcome: Outcome) -> None:
            try:
                self._inbox.put_nowait(_Done(speaker, target, ticket, started, outcome))
            except asyncio.QueueFull:  # cannot happen (see __init__); never lose the count
                log.error(
                    "room %s: translation inbox full", short_token(self._token), extra=fields(self._token)
                )
                self._drop("error", 1)

        return done

    def _release(self, speaker: str, target: str, started: float, outcome: Outcome) -> None:
        match outcome:
            case Translated(text):
                if self._deliver(speaker, target, text) == 0:
                    self._drop("no-listener", 1)
                    return
                self.stats.delivered += 1
                metrics.translations_delivered.inc()
                metrics.translation_latency.observe(max(0.0, self._clock.now() - started))
            case Dropped(reason):
                self._drop(reason, 1)

    def _drop(self, reason: str, count: int) -> None:
        self.stats.dropped += count
        metrics.translations_dropped.labels(reason).inc(count)
