"""Scale-out figures: capacity by worker count, and fail-over. Pure code: the
scenarios in ``bench.run`` collect the numbers, this module judges and
reports them.

- **Capacity** of a service with ``w`` worker processes: the largest number
  of active speakers whose measurement window had an added latency p99 under
  ``CAPACITY_P99_MS``, no audio frame dropped and every stream connected.
  The steps stop at the first window that misses.
- **Fail-over**: rooms of active speakers with captions flowing, then one
  worker process is killed (the supervisor restarts it and re-opens its
  rooms), or one of two replicas sharing a nats-server is killed (its leases
  expire and the other replica takes the rooms over). Per room, the time
  from the kill to the first caption after it. Rooms on the survivors keep
  their captions; a room counts as *interrupted* when the service re-opened
  it (its service session at the HPB changed), or, where that is not known,
  when its first caption after the kill took longer than
  ``INTERRUPTED_AFTER_S``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

Json = dict[str, Any]

CAPACITY_P99_MS = 100.0
INTERRUPTED_AFTER_S = 2.5
"""Longer than the talk pattern's pause (1.5 s) plus a word (0.32 s) and a margin."""


def miss_reasons(window: Mapping[str, Any]) -> list[str]:
    """Why a window is past capacity (empty: within it)."""
    reasons = []
    p99 = float(window.get("latency_ms", {}).get("p99", math.nan))
    if not p99 < CAPACITY_P99_MS:
        reasons.append(f"p99 {p99:.0f} ms" if math.isfinite(p99) else "no words measured")
    dropped = float(window.get("frames_dropped", 0.0))
    if dropped > 0:
        reasons.append(f"{dropped:.0f} frames dropped")
    if int(window.get("connected", 0)) < int(window.get("n", 0)):
        reasons.append(f"{window.get('connected')} of {window.get('n')} streams connected")
    return reasons


def capacity(windows: Sequence[Mapping[str, Any]]) -> tuple[int, str]:
    """The largest N within capacity, counting from the smallest step up to
    the first miss, and why the next step missed ('' when none did)."""
    best = 0
    for window in sorted((w for w in windows if int(w.get("n", 0)) > 0), key=lambda w: int(w["n"])):
        reasons = miss_reasons(window)
        if reasons:
            return best, f"N={window['n']}: " + ", ".join(reasons)
        best = int(window["n"])
    return best, ""


def resume_times(
    killed_at: float, first_after: Mapping[str, float], rooms: Sequence[str]
) -> dict[str, float | None]:
    """Per room, seconds from the kill to its first caption after it (None:
    none came before the deadline)."""
    return {room: (first_after[room] - killed_at) if room in first_after else None for room in rooms}


def moved_rooms(before: Mapping[str, Sequence[str]], after: Mapping[str, Sequence[str]]) -> set[str]:
    """Rooms the service re-opened: their service session at the HPB changed
    (a new worker's or replica's connection joined)."""
    return {room for room, sessions in after.items() if set(sessions) - set(before.get(room, ()))}


def resume_summary(times: Mapping[str, float | None], moved: Collection[str] | None = None) -> Json:
    """Rooms that kept their captions and rooms that were interrupted: the
    rooms the service re-opened (``moved``) when known, else those whose
    first caption after the kill took longer than ``INTERRUPTED_AFTER_S``."""

    def was_interrupted(room: str, seconds: float) -> bool:
        return room in moved if moved is not None else seconds > INTERRUPTED_AFTER_S

    interrupted = sorted(t for r, t in times.items() if t is not None and was_interrupted(r, t))
    kept = [t for r, t in times.items() if t is not None and not was_interrupted(r, t)]
    never = sum(1 for t in times.values() if t is None)
    return {
        "rooms": len(times),
        "kept": len(kept),
        "interrupted": len(interrupted),
        "never_resumed": never,
        "interrupted_median_s": round(interrupted[len(interrupted) // 2], 2) if interrupted else None,
        "interrupted_max_s": round(interrupted[-1], 2) if interrupted else None,
        "kept_max_s": round(max(kept), 2) if kept else None,
    }


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else "-"
    return str(value)


def capacity_rows(runs: Mapping[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for key, run in runs.items():
        if not isinstance(run, dict) or run.get("kind") != "active" or "workers" not in run:
            continue
        windows = run.get("windows", [])
        best, why = capacity(windows)
        at = next((w for w in windows if int(w.get("n", 0)) == best), None)
        rows.append(
            [
                key,
                run["workers"],
                best,
                _fmt(float(at["latency_ms"]["p99"])) if at else "-",
                _fmt(at["cpu_percent"] / best) if at and best else "-",
                _fmt(at["cpu_percent"]) if at else "-",
                why or "no step missed",
            ]
        )
    return rows


def section(results: Mapping[str, Any]) -> str:
    """The scale-out part of docs/benchmarks.md ('' when nothing was run)."""
    runs = results.get("runs") or {}
    capacity_table = capacity_rows(runs)
    failover = results.get("failover") or {}
    if not capacity_table and not failover:
        return ""
    parts = ["## Scale-out: worker processes and replicas", ""]
    for command in results.get("scale_commands", []):
        parts += [f"- command: `{command}`"]
    if capacity_table:
        parts += [
            "",
            f"### Capacity: active speakers within added latency p99 < {CAPACITY_P99_MS:.0f} ms,"
            " no audio dropped, every stream connected",
            "",
            "| run | workers | capacity (speakers) | p99 ms there | CPU % per speaker there"
            " (all processes of the service) | service CPU % there | next step |",
            "|---|---|---|---|---|---|---|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in capacity_table),
            "",
        ]
    for what, run in failover.items():
        if not isinstance(run, dict):
            continue
        parts += [f"### Fail-over: {what}", ""]
        if "error" in run:
            parts += [f"Failed: `{run['error']}`", ""]
            continue
        summary = run.get("summary", {})
        parts += [
            f"{run.get('description', '')}",
            "",
            "| rooms | kept their captions | interrupted | captions resumed after (median / max s)"
            " | never resumed (deadline s) |",
            "|---|---|---|---|---|",
            f"| {summary.get('rooms')} | {summary.get('kept')} (max gap {_fmt(summary.get('kept_max_s'))} s)"
            f" | {summary.get('interrupted')} | {_fmt(summary.get('interrupted_median_s'))} /"
            f" {_fmt(summary.get('interrupted_max_s'))} | {summary.get('never_resumed')}"
            f" ({_fmt(run.get('deadline_s'))}) |",
            "",
        ]
        for line in run.get("notes", []):
            parts += [f"- {line}"]
        parts += [""]
    return "\n".join(parts)
