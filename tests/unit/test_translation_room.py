"""One room's translation worker with an in-memory Task Processing: one job
per language, the per-room bound, languages the provider cannot serve."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from live_transcription.clock import MonotonicClock
from live_transcription.translation.languages import TASK_TYPE
from live_transcription.translation.ocs import TaskState
from live_transcription.translation.room import RoomTranslations
from live_transcription.translation.translator import Translator
from tests.waiting import until


@dataclass
class MemoryTasks:
    """Tasks finish when the test says so."""

    origins: list[str] = field(default_factory=lambda: ["en"])
    targets: list[str] = field(default_factory=lambda: ["fr", "de", "es"])
    inputs: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def task_types(self) -> object:
        def enum(codes: list[str]) -> list[dict[str, str]]:
            return [{"name": code, "value": code} for code in codes]

        values = {"origin_language": enum(self.origins), "target_language": enum(self.targets)}
        return {"types": {TASK_TYPE: {"inputShapeEnumValues": values}}}

    async def schedule(self, text: str, origin: str, target: str, custom_id: str) -> TaskState:
        task_id = next(self._ids)
        self.inputs[task_id] = (text, origin, target)
        return TaskState(task_id, "STATUS_SCHEDULED")

    async def task(self, task_id: int) -> TaskState:
        if task_id in self.done:
            text, _, target = self.inputs[task_id]
            return TaskState(task_id, "STATUS_SUCCESSFUL", f"{target}:{text}")
        return TaskState(task_id, "STATUS_RUNNING")


@dataclass
class Setup:
    tasks: MemoryTasks
    translations: RoomTranslations
    delivered: list[tuple[str, str, str]]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    tasks = MemoryTasks()
    delivered: list[tuple[str, str, str]] = []

    def deliver(speaker: str, language: str, text: str) -> int:
        delivered.append((speaker, language, text))
        return 1

    async with Translator(tasks, max_tasks=8) as translator:
        await translator.languages()
        translations = RoomTranslations(
            "room", translator, deliver, clock=MonotonicClock(), timeout=30, max_jobs=2
        )
        worker = asyncio.create_task(translations.run())
        try:
            yield Setup(tasks, translations, delivered)
        finally:
            worker.cancel()
            translations.close()


async def test_jobs_beyond_the_room_bound_are_dropped_and_counted(setup: Setup) -> None:
    setup.translations.on_final("alice", "hello", "en", {"fr", "de", "es", "en"})
    await until(lambda: len(setup.tasks.inputs) == 2)
    assert setup.translations.stats.requested == 3  # the room's own language is not translated
    assert setup.translations.stats.dropped == 1  # the third language found the room's bound full
    assert sorted(target for _, _, target in setup.tasks.inputs.values()) == ["de", "es"]
    setup.tasks.done.update(setup.tasks.inputs)
    await until(lambda: len(setup.delivered) == 2)
    assert sorted(setup.delivered) == [("alice", "de", "de:hello"), ("alice", "es", "es:hello")]
    assert setup.translations.in_flight == 0


async def test_an_origin_the_provider_cannot_read_is_dropped_as_unsupported(setup: Setup) -> None:
    setup.translations.on_final("alice", "ciao", "it", {"fr"})  # no "it" origin, no detect_language
    await until(lambda: setup.translations.stats.dropped == 1)
    assert setup.tasks.inputs == {}


async def test_closing_counts_everything_undelivered(setup: Setup) -> None:
    setup.translations.on_final("alice", "one", "en", {"fr"})
    setup.translations.on_final("alice", "two", "en", {"fr"})
    await until(lambda: len(setup.tasks.inputs) == 2)
    setup.tasks.done.add(2)  # "two" is back but waits for "one"
    await until(lambda: setup.translations.held_back == 1)
    setup.translations.close()
    assert setup.translations.stats.dropped == 2 and setup.delivered == []
    setup.translations.on_final("alice", "flushed at the end", "en", {"fr"})
    assert setup.translations.stats.dropped == 3 and len(setup.tasks.inputs) == 2
