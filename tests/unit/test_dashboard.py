"""The Grafana dashboard and docs/operations.md use exactly the metric names
the service exports: scraped from ``/metrics``, not from a hand-kept list."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from live_transcription import metrics
from live_transcription.api.app import Runtime, create_app
from live_transcription.config import load_settings
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.manager import Manager
from live_transcription.stt.base import Language
from tests.fake_link import LinkFactory, SpeakerFactory

DOCS = Path(__file__).resolve().parents[2] / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
OPERATIONS = DOCS / "operations.md"
METRIC_NAME = re.compile(r"\b((?:live_transcription|process)_[a-z0-9_]+)\b")
PROMQL_FUNCTIONS = re.compile(r"\b([a-z_]+)\s*\(")


@pytest.fixture
async def scraped() -> AsyncIterator[set[str]]:
    """Every metric name a Prometheus scrape of /metrics can see."""
    settings = load_settings(APP_SECRET="x", LT_HPB_URL="https://hpb.example", LT_INTERNAL_SECRET="i")
    manager = Manager(
        link_factory=LinkFactory(),
        speaker_factory=SpeakerFactory(),
        languages={"en": Language("en", "English")},
        admission=Admission(max_speakers=1, max_speakers_per_room=1),
    )
    async with manager:
        metrics.observe_state(lambda: metrics.StateSnapshot(0, 0, 0, 0, 0, 0))
        try:
            app = create_app(Runtime(settings=settings, manager=manager, engine_name="fake"))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://exapp") as client:
                text = (await client.get("/metrics")).text
        finally:
            metrics.observe_state(None)
    yield exported_names(text)


def exported_names(text: str) -> set[str]:
    """Sample names, including those of labelled metrics without samples yet
    (from their ``# TYPE`` line; histograms export _bucket/_sum/_count)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in expressions(value)]
    if isinstance(node, list):
        return [e for item in node for e in expressions(item)]
    return []


def test_dashboard_is_grafana_10_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 38  # Grafana 10
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_in_the_dashboard_is_exported(scraped: set[str]) -> None:
    exprs = expressions(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 20
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, "no metric found in the dashboard"
    assert sorted(used - scraped) == []


def test_every_service_metric_is_on_the_dashboard_and_documented(scraped: set[str]) -> None:
    ours = {
        name for name in scraped if name.startswith("live_transcription_") and not name.endswith("_created")
    }
    dashboard_text = DASHBOARD.read_text()
    on_dashboard = set(METRIC_NAME.findall(dashboard_text))
    # a histogram counts as shown when any of its series is used
    missing = {
        name
        for name in ours
        if name not in on_dashboard
        and not any(name.removesuffix(s) + "_bucket" in on_dashboard for s in ("_sum", "_count"))
    }
    assert sorted(missing) == []
    documented = set(METRIC_NAME.findall(OPERATIONS.read_text()))
    names_in_docs = {name for name in ours if not name.endswith(("_bucket", "_sum", "_count"))}
    assert sorted(names_in_docs - documented) == []
    assert sorted(n for n in documented if n.startswith("live_transcription_") and n not in scraped) == []


def test_exported_names_reads_type_lines_of_empty_labelled_metrics() -> None:
    text = (
        "# HELP a_total x\n# TYPE a_total counter\n"
        '# HELP h x\n# TYPE h histogram\nh_bucket{le="1"} 0.0\n'
        "g 1.0\n"
    )
    assert exported_names(text) == {"a_total", "h_bucket", "h_sum", "h_count", "g"}
