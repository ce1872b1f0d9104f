"""``/metrics`` of a supervisor and its workers as one exposition: each family
once, the workers' samples labelled, each family from the process that owns it."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from live_transcription.workers.exposition import families, merge, with_label


def process(*, rooms: float, captions: float, http: float, rss: float, restarts: float = 0) -> str:
    """One process's own exposition, as prometheus_client writes it."""
    registry = CollectorRegistry()
    Gauge("live_transcription_rooms", "Rooms joined", registry=registry).set(rooms)
    sent = Counter("live_transcription_captions_sent", "Captions sent", ["kind"], registry=registry)
    sent.labels("final").inc(captions)
    sent.labels("partial")
    latency = Histogram(
        "live_transcription_caption_latency_seconds", "Latency", buckets=(0.1, 1.0), registry=registry
    )
    latency.observe(0.05 * captions)
    Gauge("live_transcription_http_connections", "Open HTTP connections", registry=registry).set(http)
    Counter("live_transcription_worker_restarts", "Restarts", ["worker"], registry=registry).labels("1").inc(
        restarts
    )
    Gauge("process_resident_memory_bytes", "RSS", registry=registry).set(rss)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_each_family_once_from_its_owner_with_worker_labels() -> None:
    supervisor = process(rooms=0, captions=0, http=3, rss=50, restarts=2)
    workers = {
        "0": process(rooms=2, captions=7, http=0, rss=100),
        "1": process(rooms=1, captions=5, http=0, rss=120),
    }
    text = merge(supervisor, workers)

    headers = Tally(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE"))
    assert all(count == 1 for count in headers.values()), headers
    found = samples(text)
    # the rooms' metrics come from the workers, labelled; the supervisor's zeros are left out
    assert found[("live_transcription_rooms", (("worker", "0"),))] == 2
    assert found[("live_transcription_rooms", (("worker", "1"),))] == 1
    assert ("live_transcription_rooms", ()) not in found
    assert found[("live_transcription_captions_sent_total", (("kind", "final"), ("worker", "1")))] == 5
    bucket = ("live_transcription_caption_latency_seconds_bucket", (("le", "0.1"), ("worker", "0")))
    assert found[bucket] == 0
    # the supervisor's own: its HTTP front and its workers' restarts, as they are
    assert found[("live_transcription_http_connections", ())] == 3
    assert not any(name == "live_transcription_http_connections" and labels for name, labels in found)
    assert found[("live_transcription_worker_restarts_total", (("worker", "1"),))] == 2
    # every process's memory
    assert found[("process_resident_memory_bytes", ())] == 50
    assert found[("process_resident_memory_bytes", (("worker", "0"),))] == 100
    assert found[("process_resident_memory_bytes", (("worker", "1"),))] == 120


def test_without_workers_only_the_supervisors_own_families_remain() -> None:
    text = merge(process(rooms=0, captions=0, http=1, rss=50), {})
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "live_transcription_rooms" not in names
    assert {"live_transcription_http_connections", "process_resident_memory_bytes"} <= names


def test_a_label_goes_first_whatever_the_sample_looks_like() -> None:
    assert with_label("a 1.0", "worker", "0") == 'a{worker="0"} 1.0'
    assert with_label("a{} 1.0", "worker", "0") == 'a{worker="0"} 1.0'
    assert with_label('a{b="x y}"} 1.0', "worker", "0") == 'a{worker="0",b="x y}"} 1.0'


def test_families_keeps_order_and_takes_a_headerless_sample_as_its_own() -> None:
    parsed = families('orphan 1\n# HELP a x\n# TYPE a gauge\na 2\n\n# HELP b y\nb{c="d"} 3\n')
    assert list(parsed) == ["orphan", "a", "b"]
    assert parsed["a"].header == ["# HELP a x", "# TYPE a gauge"]
    assert parsed["b"].samples == ['b{c="d"} 3']
