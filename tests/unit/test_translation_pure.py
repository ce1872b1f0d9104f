"""The pure parts of live translation: the provider's languages, OCS
answers, and releasing translations in the order they were asked for."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from live_transcription.translation.languages import (
    DETECT_LANGUAGE,
    TASK_TYPE,
    NoTranslateTaskType,
    parse_task_types,
)
from live_transcription.translation.ocs import (
    ProviderMissing,
    RateLimited,
    TaskProcessingError,
    TaskRejected,
    parse_answer,
    parse_task,
)
from live_transcription.translation.ordering import InOrder


def task_types(origin: object, target: object) -> dict[str, object]:
    return {
        "types": {
            TASK_TYPE: {
                "name": "Translate",
                "inputShapeEnumValues": {"origin_language": origin, "target_language": target},
            }
        }
    }


def test_languages_come_from_the_enum_values_of_the_translate_task_type() -> None:
    languages = parse_task_types(
        task_types(
            [{"name": "Detect language", "value": "detect_language"}, {"name": "English", "value": "en"}],
            [
                {"name": "French", "value": "fr"},
                {"name": "Arabic", "value": "ar"},
                {"name": "", "value": "ja"},
            ],
        )
    )
    assert list(languages.origin) == ["detect_language", "en"]
    assert languages.as_talk()["target_languages"] == {
        "fr": {"name": "French", "metadata": {"separator": " ", "rtl": False}},
        "ar": {"name": "Arabic", "metadata": {"separator": " ", "rtl": True}},
        "ja": {"name": "ja", "metadata": {"separator": "", "rtl": False}},
    }
    assert languages.origin_for("en") == "en"
    assert languages.origin_for("it") == DETECT_LANGUAGE


def test_without_detect_language_an_unknown_origin_cannot_be_translated() -> None:
    languages = parse_task_types(
        task_types([{"name": "English", "value": "en"}], [{"name": "F", "value": "fr"}])
    )
    assert languages.origin_for("de") is None


@pytest.mark.parametrize(
    "data",
    [
        {"types": []},  # PHP's empty array: no task type at all
        {"types": {"core:text2text": {}}},
        task_types([{"name": "English", "value": "en"}], []),  # Talk refuses an empty target list
        task_types([], [{"name": "French", "value": "fr"}]),
        {"types": {TASK_TYPE: {"inputShapeEnumValues": []}}},
    ],
)
def test_no_translate_task_type_or_no_language_means_no_provider(data: object) -> None:
    with pytest.raises(NoTranslateTaskType):
        parse_task_types(data)


@pytest.mark.parametrize("data", [None, [], {"types": "x"}, {"types": {TASK_TYPE: "x"}}])
def test_malformed_task_types_are_an_error_not_a_missing_provider(data: object) -> None:
    with pytest.raises(ValueError, match="task types"):
        parse_task_types(data)


def ocs(status: int, data: object) -> bytes:
    meta = {"status": "ok" if status < 300 else "failure", "statuscode": status, "message": ""}
    return json.dumps({"ocs": {"meta": meta, "data": data}}).encode()


def test_ocs_answers_map_to_data_or_typed_errors() -> None:
    assert parse_answer(200, ocs(200, {"task": {"id": 1}})) == {"task": {"id": 1}}
    with pytest.raises(ProviderMissing, match="not available"):
        parse_answer(412, ocs(412, {"message": "The given provider is not available"}))
    with pytest.raises(RateLimited) as limited:
        parse_answer(429, ocs(429, []), retry_after="7")
    assert limited.value.retry_after == 7.0
    with pytest.raises(RateLimited) as no_header:
        parse_answer(429, b"<html>Too many requests</html>")
    assert no_header.value.retry_after is None
    for status in (400, 401, 404):
        with pytest.raises(TaskRejected):
            parse_answer(status, ocs(status, {"message": "no"}))
    with pytest.raises(TaskProcessingError) as server_error:
        parse_answer(500, b"oops")
    assert server_error.value.status == 500
    with pytest.raises(TaskProcessingError, match="not an OCS answer"):
        parse_answer(200, b"<html/>")


def test_tasks_parse_their_status_and_output() -> None:
    done = parse_task({"task": {"id": 3, "status": "STATUS_SUCCESSFUL", "output": {"output": "bonjour"}}})
    assert done.finished and done.output == "bonjour"
    running = parse_task({"task": {"id": 3, "status": "STATUS_RUNNING", "output": None}})
    assert not running.finished and running.output is None
    for bad in ({}, {"task": {"id": "3", "status": "x"}}, {"task": {"id": True, "status": "x"}}, None):
        with pytest.raises(ValueError):
            parse_task(bad)


def test_results_wait_for_earlier_ones_of_their_stream_only() -> None:
    order: InOrder[str, str] = InOrder()
    first, second = order.add("alice/fr"), order.add("alice/fr")
    other = order.add("bob/fr")
    assert order.resolve("alice/fr", second, "two") == []
    assert order.held_back() == 1
    assert order.resolve("bob/fr", other, "bob") == ["bob"]
    assert order.resolve("alice/fr", first, "one") == ["one", "two"]
    assert order.pending() == 0 and order.held_back() == 0
    assert order.resolve("alice/fr", first, "again") == []  # resolved twice: ignored


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_every_stream_is_released_in_the_order_it_was_added(streams: list[str], rng: random.Random) -> None:
    order: InOrder[str, int] = InOrder()
    tickets = [(stream, order.add(stream)) for stream in streams]
    released: dict[str, list[int]] = {}
    shuffled = tickets[:]
    rng.shuffle(shuffled)
    for stream, ticket in shuffled:
        released.setdefault(stream, []).extend(order.resolve(stream, ticket, ticket))
    for stream in set(streams):
        assert released[stream] == [t for s, t in tickets if s == stream]
    assert order.pending() == 0
