"""The Translator against the Task Processing stand-in over real HTTP: the
languages cache, a missing provider, rate limits, failures and late tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from live_transcription.clock import Clock, ManualClock
from live_transcription.hpb.ice import app_api_headers
from live_transcription.translation.ocs import TaskProcessingClient
from live_transcription.translation.translator import (
    Dropped,
    Job,
    Outcome,
    Translated,
    TranslationTemporarilyUnavailable,
    TranslationUnavailable,
    Translator,
)
from tests.fakes.nextcloud_taskprocessing import BASE, FakeTaskProcessing
from tests.waiting import until

SECRET = "task-processing-secret"


@asynccontextmanager
async def translator_for(
    fake: FakeTaskProcessing, *, secret: str = SECRET, clock: Clock | None = None, ttl: float = 300.0
) -> AsyncIterator[Translator]:
    headers = app_api_headers(app_id="live_transcription", app_version="1.2.3", app_secret=secret)
    async with (
        TaskProcessingClient(fake.url, headers, app_id="live_transcription") as client,
        Translator(client, clock=clock, languages_ttl=ttl, max_tasks=4, queue_size=8) as translator,
    ):
        yield translator


@pytest.fixture
async def fake() -> AsyncIterator[FakeTaskProcessing]:
    async with FakeTaskProcessing(app_secret=SECRET) as server:
        yield server


async def translate(translator: Translator, text: str, *, bound: float = 20.0, target: str = "fr") -> Outcome:
    result: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    translator.submit(
        Job(
            text,
            "en",
            target,
            asyncio.get_running_loop().time() + bound,
            result.set_result,
            "lt-room-en-fr",
        )
    )
    async with asyncio.timeout(30):
        return await result


def schedules(fake: FakeTaskProcessing) -> int:
    return sum(1 for method, path in fake.requests if method == "POST" and path == BASE + "/schedule")


async def test_a_translation_is_scheduled_polled_and_returned(fake: FakeTaskProcessing) -> None:
    fake.delay = 0.6  # scheduled, then running, then done: a few polls
    async with translator_for(fake) as translator:
        assert await translate(translator, "good morning") == Translated("[fr] good morning")
    assert fake.scheduled() == [{"input": "good morning", "origin_language": "en", "target_language": "fr"}]
    task = next(iter(fake.tasks.values()))
    assert task.app_id == "live_transcription" and task.custom_id == "lt-room-en-fr"
    polls = [path for method, path in fake.requests if method == "GET" and path.startswith(BASE + "/task/")]
    assert 1 <= len(polls) <= 10  # the interval grows, bounded


async def test_requests_carry_appapi_authentication(fake: FakeTaskProcessing) -> None:
    async with translator_for(fake, secret="wrong") as translator:
        with pytest.raises(TranslationTemporarilyUnavailable):
            await translator.languages()
        assert await translate(translator, "hello") == Dropped("failed")
    assert fake.refused == 2 and fake.tasks == {}


async def test_languages_are_cached_for_the_ttl_and_the_provider_can_come_and_go(
    fake: FakeTaskProcessing, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    async with translator_for(fake, clock=clock, ttl=60) as translator:
        languages = await translator.languages()
        assert "fr" in languages.target and "detect_language" in languages.origin
        await translator.languages()
        assert translator.checks == 1

        fake.provider = False
        await clock.advance(59)
        assert translator.cached() is not None  # still within the TTL
        await clock.advance(2)
        with caplog.at_level(logging.WARNING), pytest.raises(TranslationUnavailable):
            await translator.languages()
        with pytest.raises(TranslationUnavailable):
            await translator.languages()  # no new request while the TTL runs
        assert translator.checks == 2 and translator.cached() is None
        assert sum("live translation off" in r.getMessage() for r in caplog.records) == 1

        fake.provider = True
        await clock.advance(61)
        assert "fr" in (await translator.languages()).target
        assert translator.available


async def test_no_provider_on_schedule_turns_translation_off_without_retrying(
    fake: FakeTaskProcessing, caplog: pytest.LogCaptureFixture
) -> None:
    async with translator_for(fake) as translator:
        await translator.languages()
        fake.provider = False  # uninstalled since the languages were read
        with caplog.at_level(logging.WARNING):
            assert await translate(translator, "one") == Dropped("no-provider")
            assert await translate(translator, "two") == Dropped("no-provider")
        assert schedules(fake) == 1
        assert not translator.available and translator.cached() is None
        with pytest.raises(TranslationUnavailable):
            await translator.languages()
        assert sum("live translation off" in r.getMessage() for r in caplog.records) == 1


async def test_rate_limits_back_off_then_the_translation_goes_through(fake: FakeTaskProcessing) -> None:
    fake.rate_limit, fake.retry_after = 2, "0.1"
    async with translator_for(fake) as translator:
        assert await translate(translator, "patience") == Translated("[fr] patience")
    assert schedules(fake) == 3  # two refused, one accepted: never a tight loop


async def test_a_rate_limit_longer_than_the_time_bound_drops(fake: FakeTaskProcessing) -> None:
    fake.rate_limit, fake.retry_after = 1, "30"
    async with translator_for(fake) as translator:
        assert await translate(translator, "hurry", bound=2.0) == Dropped("rate-limited")
        # the pause holds for the next job too, without asking Nextcloud
        assert await translate(translator, "again", bound=2.0) == Dropped("rate-limited")
    assert schedules(fake) == 1


async def test_failed_and_late_tasks_are_dropped(fake: FakeTaskProcessing) -> None:
    fake.fail_when = lambda text: "bad" in text
    fake.hold_when = lambda text: "slow" in text
    async with translator_for(fake) as translator:
        assert await translate(translator, "bad input") == Dropped("failed")
        assert await translate(translator, "slow input", bound=0.8) == Dropped("late")
        assert await translate(translator, "fine") == Translated("[fr] fine")


async def test_a_full_queue_drops_new_jobs_and_shutdown_resolves_the_rest(fake: FakeTaskProcessing) -> None:
    fake.hold_when = lambda text: True
    outcomes: list[Outcome] = []
    async with translator_for(fake) as translator:
        deadline = asyncio.get_running_loop().time() + 60
        for index in range(4):  # every worker busy with a held task
            translator.submit(Job(f"line {index}", "en", "fr", deadline, outcomes.append))
        await fake.wait_for(lambda: len(fake.tasks) == 4)
        for index in range(4, 20):  # a queue of 8
            translator.submit(Job(f"line {index}", "en", "fr", deadline, outcomes.append))
        assert outcomes == [Dropped("process-busy")] * 8
    assert len(outcomes) == 20
    assert outcomes.count(Dropped("shutdown")) == 12


async def test_without_nextcloud_translation_says_why_it_is_off() -> None:
    async with Translator(None, off_reason="NEXTCLOUD_URL not set") as translator:
        with pytest.raises(TranslationUnavailable, match="NEXTCLOUD_URL"):
            await translator.languages()
        outcomes: list[Outcome] = []
        translator.submit(Job("x", "en", "fr", 0.0, outcomes.append))
        assert outcomes == [Dropped("no-provider")]


async def test_rooms_translating_keep_the_provider_state_fresh_in_the_background(
    fake: FakeTaskProcessing,
) -> None:
    clock = ManualClock()
    fake.provider = False
    async with translator_for(fake, clock=clock, ttl=60) as translator:
        assert translator.current() is None  # starts a check, answers at once
        await until(lambda: not translator.checking)
        assert translator.current() is None  # known missing: no new request within the TTL
        assert not translator.checking and len(fake.requests) == 1
        fake.provider = True
        await clock.advance(61)
        assert translator.current() is None  # the check runs in the background
        await until(lambda: not translator.checking)
        assert translator.current() is not None and translator.checks == 2
