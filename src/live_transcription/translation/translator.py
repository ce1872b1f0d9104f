"""The process's translation engine: Nextcloud Task Processing behind one queue.

The Translator owns the provider's state (its languages, cached for a TTL;
whether a provider exists; the rate-limit backoff) and a fixed number of
worker tasks that run translation tasks: schedule, then poll with a bounded
interval until done or past the job's deadline. Jobs wait in one bounded
queue; a full queue drops the new job (counted by the caller through its
outcome). Every submitted job gets exactly one outcome, on every path.

A missing provider (no translate task type, or 412 on schedule) turns
translation off with one log line; it is checked again when the TTL runs
out, never in a loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from live_transcription import metrics
from live_transcription.clock import Clock, MonotonicClock
from live_transcription.translation.languages import (
    NoTranslateTaskType,
    TranslationLanguages,
    parse_task_types,
)
from live_transcription.translation.ocs import (
    SUCCESSFUL,
    ProviderMissing,
    RateLimited,
    TaskProcessingError,
    TaskRejected,
    TaskState,
)

log = logging.getLogger(__name__)

POLL_FIRST = 0.25
POLL_MAX = 2.0
POLL_GROWTH = 1.5
ERROR_RETRY_SECONDS = 30.0
"""After a transient failure to read the languages, ask again this soon."""
BACKOFF_FIRST = 2.0
BACKOFF_MAX = 60.0


class TranslationUnavailable(Exception):
    """No usable provider (none installed, or the service is not set up to
    reach Nextcloud). Talk gets 550."""


class TranslationTemporarilyUnavailable(Exception):
    """Nextcloud could not be asked right now. Talk gets 500."""


class TaskBackend(Protocol):
    """What the Translator needs from Nextcloud (``ocs.TaskProcessingClient``)."""

    async def task_types(self) -> object: ...

    async def schedule(self, text: str, origin: str, target: str, custom_id: str) -> TaskState: ...

    async def task(self, task_id: int) -> TaskState: ...


@dataclass(frozen=True, slots=True)
class Translated:
    text: str


@dataclass(frozen=True, slots=True)
class Dropped:
    reason: str
    """``late`` | ``failed`` | ``error`` | ``no-provider`` | ``rate-limited`` |
    ``process-busy`` | ``shutdown``"""


Outcome = Translated | Dropped


@dataclass(frozen=True, slots=True)
class Job:
    text: str
    origin: str
    target: str
    deadline: float
    """On the Translator's clock: past it the result is dropped as ``late``."""
    done: Callable[[Outcome], None]
    custom_id: str = ""


class Translator:
    def __init__(
        self,
        backend: TaskBackend | None,
        *,
        off_reason: str = "",
        clock: Clock | None = None,
        languages_ttl: float = 300.0,
        max_tasks: int = 16,
        queue_size: int = 256,
    ) -> None:
        """``backend`` None: translation is off for ``off_reason`` (e.g. the
        service has no NEXTCLOUD_URL)."""
        self._backend = backend
        self._off_reason = off_reason or "translation is not configured"
        self._clock = clock or MonotonicClock()
        self._ttl = languages_ttl
        self._max_tasks = max_tasks
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self._tasks: asyncio.TaskGroup | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._languages: TranslationLanguages | None = None
        self._missing: str | None = None
        self._error: str | None = None
        self._checked_at: float | None = None
        self._inflight: asyncio.Future[None] | None = None
        """The running check of the provider's languages, shared by every asker."""
        self._not_before = 0.0
        self._backoff = 0.0
        self.checks = 0
        self.busy = 0
        """Workers running a job right now."""

    # --- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        if self._backend is not None:
            for index in range(self._max_tasks):
                self._workers.append(self._tasks.create_task(self._work(), name=f"translator-{index}"))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for worker in self._workers:
            worker.cancel()
        if self._inflight is not None:
            self._inflight.cancel()
        assert self._tasks is not None
        try:
            await self._tasks.__aexit__(exc_type, exc, tb)
        finally:
            self._tasks = None
            self._workers.clear()
            while not self._queue.empty():
                _resolve(self._queue.get_nowait(), Dropped("shutdown"))

    # --- languages and availability --------------------------------------------------------------
    @property
    def configured(self) -> bool:
        return self._backend is not None

    @property
    def available(self) -> bool:
        """A provider was seen and has not been reported missing since."""
        return self._backend is not None and self._languages is not None and self._missing is None

    def cached(self) -> TranslationLanguages | None:
        """The last languages known to be served (no I/O)."""
        return self._languages if self.available else None

    def current(self) -> TranslationLanguages | None:
        """``cached()``, and a check in the background when the TTL ran out:
        rooms translating keep the provider's state fresh without waiting."""
        if self._backend is not None and self._stale():
            self._start_check()
        return self.cached()

    def _start_check(self) -> asyncio.Future[None]:
        if self._inflight is None:
            if self._tasks is not None:
                self._inflight = self._tasks.create_task(self._check(), name="translator-check")
            else:  # not entered (a bare Translator in a test): nothing to own it
                self._inflight = asyncio.ensure_future(self._check())
        return self._inflight

    @property
    def checking(self) -> bool:
        """A check of the provider's languages is running."""
        return self._inflight is not None

    def _stale(self) -> bool:
        return self._checked_at is None or self._clock.now() - self._checked_at >= self._ttl

    async def languages(self) -> TranslationLanguages:
        """The provider's languages, from the cache while fresh. Raises
        ``TranslationUnavailable`` or ``TranslationTemporarilyUnavailable``."""
        if self._backend is None:
            raise TranslationUnavailable(self._off_reason)
        if self._stale():
            await asyncio.shield(self._start_check())
        if self._missing is not None:
            raise TranslationUnavailable(self._missing)
        if self._languages is None:
            raise TranslationTemporarilyUnavailable(self._error or "translation languages not known yet")
        return self._languages

    async def _check(self) -> None:
        assert self._backend is not None
        self.checks += 1
        try:
            data = await self._backend.task_types()
            languages = parse_task_types(data)
        except NoTranslateTaskType as exc:
            self._set_missing(f"no translation provider in Nextcloud ({exc})")
            self._checked_at = self._clock.now()
        except Exception as exc:  # bad answer, network, 5xx, 429
            # keep what was known; ask again soon
            self._error = f"cannot read the translation languages: {exc}"
            log.warning("%s", self._error)
            self._checked_at = self._clock.now() - self._ttl + min(self._ttl, ERROR_RETRY_SECONDS)
        else:
            if self._missing is not None or self._languages is None:
                log.info(
                    "translation provider available: %d origin, %d target languages",
                    len(languages.origin),
                    len(languages.target),
                )
            self._languages = languages
            self._missing = None
            self._error = None
            self._checked_at = self._clock.now()
        finally:
            self._inflight = None
            metrics.translation_available.set(1 if self.available else 0)

    def _set_missing(self, reason: str) -> None:
        if self._missing is None:
            log.warning("live translation off: %s; checked again in %.0f s", reason, self._ttl)
        self._missing = reason
        self._languages = None
        metrics.translation_available.set(0)

    def provider_missing(self, reason: str) -> None:
        """A schedule answered 412: off until the TTL runs out."""
        self._set_missing(reason)
        self._checked_at = self._clock.now()

    # --- jobs ---------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job; its ``done`` is called exactly once, maybe right away."""
        if self._backend is None or self._tasks is None:
            _resolve(job, Dropped("no-provider"))
            return
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            _resolve(job, Dropped("process-busy"))

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            outcome: Outcome = Dropped("shutdown")
            self.busy += 1
            try:
                outcome = await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("translation job failed")
                outcome = Dropped("error")
            finally:
                self.busy -= 1
                _resolve(job, outcome)

    async def _wait_backoff(self, deadline: float) -> bool:
        """Sleep out a rate-limit backoff; False when it outlasts ``deadline``."""
        wait = self._not_before - self._clock.now()
        if wait <= 0:
            return True
        if self._clock.now() + wait >= deadline:
            return False
        await self._clock.sleep(wait)
        return True

    def _rate_limited(self, exc: RateLimited) -> None:
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff * 2))
        pause = exc.retry_after if exc.retry_after is not None else self._backoff
        until = self._clock.now() + min(pause, BACKOFF_MAX)
        if until > self._not_before:
            log.warning("Nextcloud rate-limits translation tasks: pausing %.1f s", until - self._clock.now())
            self._not_before = until

    async def _run(self, job: Job) -> Outcome:
        assert self._backend is not None
        if self._missing is not None:
            return Dropped("no-provider")
        state: TaskState | None = None
        while state is None:
            if self._clock.now() >= job.deadline:
                return Dropped("late")
            if not await self._wait_backoff(job.deadline):
                return Dropped("rate-limited")
            try:
                state = await self._backend.schedule(job.text, job.origin, job.target, job.custom_id)
            except ProviderMissing as exc:
                self.provider_missing(f"Nextcloud has no provider for translation tasks ({exc})")
                return Dropped("no-provider")
            except RateLimited as exc:
                self._rate_limited(exc)
            except TaskRejected as exc:
                log.warning("translation task refused: %s", exc)
                return Dropped("failed")
            except TaskProcessingError as exc:
                log.warning("could not schedule a translation task: %s", exc)
                return Dropped("error")
        self._backoff = 0.0
        interval = POLL_FIRST
        while not state.finished:
            remaining = job.deadline - self._clock.now()
            if remaining <= 0:
                return Dropped("late")
            await self._clock.sleep(min(interval, remaining))
            interval = min(POLL_MAX, interval * POLL_GROWTH)
            if not await self._wait_backoff(job.deadline):
                return Dropped("late")
            try:
                state = await self._backend.task(state.id)
            except RateLimited as exc:
                self._rate_limited(exc)
            except TaskRejected as exc:
                log.warning("translation task %d lost: %s", state.id, exc)
                return Dropped("failed")
            except TaskProcessingError as exc:
                log.info("polling translation task %d failed, trying again: %s", state.id, exc)
        if state.status != SUCCESSFUL or state.output is None:
            return Dropped("failed")
        if self._clock.now() > job.deadline:
            return Dropped("late")
        return Translated(state.output)


def _resolve(job: Job, outcome: Outcome) -> None:
    try:
        job.done(outcome)
    except Exception:
        log.exception("a translation outcome could not be handed over")
