"""One ``/metrics`` answer from the supervisor's and every worker's own (pure).

Each process exports Prometheus text. The merge keeps each family once
(its ``# HELP`` and ``# TYPE``), and takes each family's samples from the
process that owns what it measures:

- the supervisor's HTTP front, its cluster node, its workers and what it
  answers Talk's ``/capabilities`` with (``live_transcription_http_connections*``,
  ``live_transcription_cluster_*``, ``live_transcription_worker*``,
  ``live_transcription_translation_available``): the supervisor's samples, as they are;
- every other ``live_transcription_*`` family (rooms, speakers, captions,
  STT, ...): the workers' samples, each with a ``worker="<index>"`` label;
- the rest (``process_*``, ``python_*``): every process, the supervisor's
  without a ``worker`` label, the workers' with one.

Summing is left to Prometheus (``sum without (worker) (...)``): a restarted
worker's counters start again from zero, which Prometheus handles per
series, while a sum made here would go backwards.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

WORKER_LABEL = "worker"
SUPERVISOR_PREFIXES = (
    "live_transcription_http_connections",
    "live_transcription_cluster_",
    "live_transcription_worker",
    "live_transcription_translation_available",
)
SERVICE_PREFIX = "live_transcription_"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def owned_by_supervisor(family: str) -> bool:
    return family.startswith(SUPERVISOR_PREFIXES)


def owned_by_workers(family: str) -> bool:
    return family.startswith(SERVICE_PREFIX) and not owned_by_supervisor(family)


@dataclass(slots=True)
class Family:
    name: str
    header: list[str] = field(default_factory=list)
    """Its ``# HELP`` and ``# TYPE`` lines."""
    samples: list[str] = field(default_factory=list)


def families(text: str) -> dict[str, Family]:
    """The families of one exposition, in order. A sample line belongs to the
    family whose ``# HELP``/``# TYPE`` came last (as prometheus_client writes them)."""
    found: dict[str, Family] = {}
    current: Family | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(maxsplit=3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if current is None or current.name != name:
                    current = found.setdefault(name, Family(name))
                current.header.append(line)
            continue
        match = _NAME.match(line)
        if match is None:
            continue
        if current is None:  # a sample without a header: a family of its own
            current = found.setdefault(match.group(), Family(match.group()))
        current.samples.append(line)
    return found


def with_label(sample: str, name: str, value: str) -> str:
    """``sample`` with one more label, first among its labels."""
    match = _NAME.match(sample)
    if match is None:
        return sample
    end = match.end()
    label = f'{name}="{value}"'
    if sample[end : end + 2] == "{}":
        return f"{sample[:end]}{{{label}}}{sample[end + 2 :]}"
    if sample[end : end + 1] == "{":
        return f"{sample[:end]}{{{label},{sample[end + 1 :]}"
    return f"{sample[:end]}{{{label}}}{sample[end:]}"


def merge(supervisor: str, workers: Mapping[str, str]) -> str:
    """The supervisor's exposition and the workers' (by worker label value) as one."""
    own = families(supervisor)
    theirs = {worker: families(text) for worker, text in workers.items()}
    order: dict[str, None] = dict.fromkeys(own)
    for parsed in theirs.values():
        order.update(dict.fromkeys(parsed))
    lines: list[str] = []
    for name in order:
        from_supervisor = not owned_by_workers(name)
        from_workers = not owned_by_supervisor(name)
        sources = ([own] if from_supervisor else []) + (list(theirs.values()) if from_workers else [])
        header = next((f.header for source in sources if (f := source.get(name)) and f.header), None)
        if header is None:
            continue  # a family only another process owns
        lines += header
        if from_supervisor and name in own:
            lines += own[name].samples
        if from_workers:
            for worker, parsed in theirs.items():
                family = parsed.get(name)
                if family is not None:
                    lines += [with_label(sample, WORKER_LABEL, worker) for sample in family.samples]
    return "\n".join(lines) + "\n"
