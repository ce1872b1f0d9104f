"""Pure helpers of the harness: Prometheus text, histogram quantiles,
py-spy profiles. No I/O."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Scrape = dict[tuple[str, Labels], float]
"""Every sample of a scrape: (sample name, sorted labels) -> value."""


def parse_metrics(text: str) -> Scrape:
    samples: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples[(sample.name, labels)] = float(sample.value)
    return samples


def total(scrape: Scrape, name: str, **match: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``match``."""
    return sum(
        value
        for (sample, labels), value in scrape.items()
        if sample == name and all((key, want) in labels for key, want in match.items())
    )


def by_label(scrape: Scrape, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (sample, labels), value in scrape.items():
        if sample != name:
            continue
        key = dict(labels).get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def diff(after: Scrape, before: Scrape) -> Scrape:
    """What changed between two scrapes (counters and histogram buckets)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def histogram_buckets(scrape: Scrape, name: str) -> list[tuple[float, float]]:
    """``name``'s cumulative buckets as (upper bound, count), summed over
    other labels, sorted by bound (the last is +Inf)."""
    buckets: dict[float, float] = {}
    for (sample, labels), value in scrape.items():
        if sample != f"{name}_bucket":
            continue
        bound = float(dict(labels)["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value
    return sorted(buckets.items())


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' estimate: linear within the bucket holding the q-quantile
    (0 < q < 1). NaN with no observations; the last finite bound when the
    quantile falls into +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    count = buckets[-1][1]
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower_bound
            span = cumulative - lower_count
            if span <= 0:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / span
        lower_bound, lower_count = bound, cumulative
    return lower_bound


@dataclass(frozen=True, slots=True)
class ProfileEntry:
    function: str
    share: float
    """Fraction of all samples (0..1)."""


_LINE = re.compile(r":\d+\)$")


def parse_collapsed(lines: Iterable[str], *, by_function: bool = True) -> Counter[tuple[str, ...]]:
    """py-spy ``--format raw`` (collapsed stacks: ``a;b;c 42``) -> stack
    counts. ``by_function`` drops the line numbers (``f (file.py:12)`` ->
    ``f (file.py)``) so a function's lines add up. Bad lines are skipped."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(frame.strip() for frame in stack.split(";") if frame.strip())
        if by_function:
            frames = tuple(_LINE.sub(")", frame) for frame in frames)
        if frames:
            stacks[frames] += int(count)
    return stacks


def top_self(stacks: Mapping[tuple[str, ...], int], limit: int = 15) -> list[ProfileEntry]:
    """Functions by the samples spent in them (the leaf of the stack)."""
    counts: Counter[str] = Counter()
    for frames, count in stacks.items():
        counts[frames[-1]] += count
    grand = sum(counts.values()) or 1
    return [ProfileEntry(name, n / grand) for name, n in counts.most_common(limit)]


def top_inclusive(stacks: Mapping[tuple[str, ...], int], limit: int = 15) -> list[ProfileEntry]:
    """Functions by the samples where they are anywhere on the stack."""
    counts: Counter[str] = Counter()
    for frames, count in stacks.items():
        for name in set(frames):
            counts[name] += count
    grand = sum(stacks.values()) or 1
    return [ProfileEntry(name, n / grand) for name, n in counts.most_common(limit)]
