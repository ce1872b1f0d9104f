"""docs/benchmarks.md and its plots, from the harness' results (a dict as in
``results.json``). Table building is pure; ``write`` draws and writes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import scale
from bench.procstat import slope

Json = dict[str, Any]

TARGETS = {
    "memory_per_active_mb": 3.0,
    "cpu_per_active_percent": 0.5,
    "cpu_per_silent_percent": 0.05,
    "latency_p99_ms_at_100": 50.0,
    "churn_growth_mb": 5.0,
}
NOTES = Path(__file__).with_name("notes.md")
IN_PROCESS_ENGINE = "(instant engine in-process: leaks and lifetimes; its CPU is a lower bound)"


def _fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(_fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
        for row in rows
    ]
    return "\n".join(lines)


def windows(results: Json, kind: str) -> list[Json]:
    section = results.get(kind)
    if not isinstance(section, dict):
        return []
    found = section.get("windows")
    return list(found) if isinstance(found, list) else []


def rss_slope(rows: list[Json], up_to: int) -> float:
    """MB per speaker: least-squares slope of RSS over N, N <= ``up_to``."""
    points = [(float(w["n"]), float(w["rss_mb"])) for w in rows if w["n"] <= up_to]
    if len(points) < 2:
        return math.nan
    return slope([p[0] for p in points], [p[1] for p in points])


def valid(row: Json) -> bool:
    """The window measured the service, not an overloaded generator: every
    stream up and the generator's timer (5 ms ticks) skipped under 5 % (a
    skipped tick is a packet not sent by a quarter of the streams)."""
    ticks = max(1.0, row.get("seconds", 30.0) / 0.005)
    return bool(row["connected"] >= row["n"] and row.get("ticker_skipped", 0) < 0.05 * ticks)


def cpu_per_speaker(row: Json, idle: Json | None) -> tuple[float, float]:
    """(total / N, (total - idle) / N) in percent of one core."""
    n = row["n"]
    if n <= 0:
        return math.nan, math.nan
    base = idle["cpu_percent"] if idle else 0.0
    return row["cpu_percent"] / n, (row["cpu_percent"] - base) / n


def load_table(rows: list[Json]) -> str:
    idle = next((w for w in rows if w["n"] == 0), None)
    out = []
    for w in rows:
        per, per_net = cpu_per_speaker(w, idle)
        rss_per = (w["rss_mb"] - idle["rss_mb"]) / w["n"] if idle and w["n"] else math.nan
        lat = w.get("latency_ms", {})
        svc = w.get("service_latency_ms", {})
        out.append(
            [
                w["n"],
                f"{w['connected']}/{w['n']}",
                w["rss_mb"],
                _fmt(rss_per, 2),
                w["cpu_percent"],
                _fmt(per, 3),
                _fmt(per_net, 3),
                w["generator_cpu_percent"],
                f"{_fmt(lat.get('p50'))} / {_fmt(lat.get('p95'))} / {_fmt(lat.get('p99'))}",
                f"{_fmt(svc.get('p50'))} / {_fmt(svc.get('p95'))} / {_fmt(svc.get('p99'))}",
                w["words"],
                _fmt(w["frames_dropped"], 0),
                _fmt(w["ticker_lag_max_ms"], 1),
                str(w.get("ticker_skipped", 0)) + ("" if valid(w) else " **(invalid)**"),
            ]
        )
    return table(
        [
            "N",
            "streams up",
            "RSS MB",
            "ΔRSS/N MB",
            "CPU % (1 core)",
            "CPU %/N",
            "(CPU-idle) %/N",
            "generator CPU %",
            "word latency p50/p95/p99 ms",
            "service histogram p50/p95/p99 ms",
            "words",
            "frames dropped",
            "generator timer lag max ms",
            "generator skipped ticks",
        ],
        out,
    )


def summary(results: Json) -> str:
    rows: list[list[object]] = []
    active = windows(results, "active")
    silent = windows(results, "silent")
    idle_a = next((w for w in active if w["n"] == 0), None)
    if active:
        good = [w for w in active if valid(w)]
        for up_to in (100, 200):
            if any(w["n"] >= up_to for w in good):
                value = rss_slope(good, up_to)
                rows.append(
                    [
                        f"memory per active speaker (RSS slope N=0..{up_to})",
                        f"{_fmt(value, 2)} MB",
                        "<= 3 MB",
                        _verdict(value <= 3.0),
                    ]
                )
        clean = [
            w
            for w in active
            if w["n"] > 0
            and valid(w)
            and w["frames_dropped"] == 0
            and w["latency_ms"].get("p99", math.inf) < 100
        ]
        # at the largest N the process still serves in time: a saturated
        # process batches more work per wake-up and would flatter the figure
        top = max(clean or [w for w in active if valid(w)], key=lambda w: w["n"])
        per, per_net = cpu_per_speaker(top, idle_a)
        rows.append(
            [
                f"CPU per active speaker (N={top['n']}, the largest N within capacity)",
                f"{_fmt(per, 3)} % ({_fmt(per_net, 3)} % above idle)",
                "<= 0.5 %",
                _verdict(per <= 0.5),
            ]
        )
        at100 = next((w for w in active if w["n"] == 100), None)
        if at100:
            p99 = at100["latency_ms"].get("p99", math.nan)
            rows.append(
                [
                    "added latency p99 at N=100 (packet sent -> transcript at HPB)",
                    f"{_fmt(p99)} ms",
                    "< 50 ms",
                    _verdict(p99 < 50),
                ]
            )
        rows.append(
            [
                "capacity measured (no drops, p99 < 100 ms, all streams up)",
                f"N = {max((w['n'] for w in clean), default=0)}",
                "500 on 2 cores",
                "(largest N tried: " + str(max(w["n"] for w in active)) + ")",
            ]
        )
    if silent:
        idle_s = next((w for w in silent if w["n"] == 0), None)
        top = max((w for w in silent if valid(w)), key=lambda w: w["n"])
        per, per_net = cpu_per_speaker(top, idle_s)
        rows.append(
            [
                f"CPU per silent participant (N={top['n']})",
                f"{_fmt(per, 3)} % ({_fmt(per_net, 3)} % above idle)",
                "<= 0.05 %",
                _verdict(per <= 0.05),
            ]
        )
    for key in sorted(k for k in results if k.startswith("churn")):
        churn = results[key]
        if not isinstance(churn, dict) or "rss_growth_mb" not in churn:
            continue
        growth = churn["rss_growth_mb"]
        end = churn.get("health_end", {})
        left = (end.get("rooms"), end.get("speakers"))
        cycles = churn.get("speaker_cycles", {})
        total = (cycles.get("connected") or 0) + (cycles.get("not_connected") or 0)
        how = f"{churn.get('concurrency', 10)} at once, {cycles.get('connected')} of {total:,} connected"
        rows.append([f"churn ({how}): RSS growth", f"{_fmt(growth, 2)} MB", "< 5 MB", _verdict(growth < 5)])
        what, measured, target, ok = "rooms / speakers", f"{left[0]} / {left[1]}", "0 / 0", left == (0, 0)
        peers = churn.get("objects_end", {}).get("peer_connections")
        if peers is not None:  # results from before the gauge existed have none
            what, measured, target = f"{what} / peer connections", f"{measured} / {peers}", f"{target} / 0"
            ok = ok and peers == 0
        rows.append([f"churn ({how}): {what} left", measured, target, _verdict(ok)])
    return table(["figure", "measured", "target", "verdict"], rows)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def churn_section(churn: Json) -> str:
    if "error" in churn:
        return f"Failed: `{churn['error']}`"
    rows: list[list[object]] = [
        [
            f"speaker join/leave cycles, {churn.get('concurrency', 10)} at once"
            " (connected within 20 s / not)",
            f"{churn['speaker_cycles'].get('connected')} / {churn['speaker_cycles'].get('not_connected')}"
            f" in {churn['speaker_seconds']} s",
        ],
        [
            "room open/close cycles",
            f"{churn['room_cycles']} ({churn['room_failures']} without both streams up)"
            f" in {churn['room_seconds']} s",
        ],
        [
            "RSS before / after (home room open, no speaker)",
            f"{_fmt(churn['rss_before_mb'])} / {_fmt(churn['rss_after_mb'])} MB",
        ],
        ["RSS growth", f"{_fmt(churn['rss_growth_mb'], 2)} MB"],
        [
            "speakers started / ended during the cycles (metrics)",
            f"{_fmt(churn['speakers_started'], 0)} / {_fmt(churn['speakers_ended'], 0)}",
        ],
        [
            "rooms opened / closed during the cycles (metrics)",
            f"{_fmt(churn['rooms_opened'], 0)} / {_fmt(churn['rooms_closed'], 0)}",
        ],
        [
            "live speakers / rooms at the end (metrics: started - ended)",
            f"{_fmt(churn['live_speakers_metric'], 0)} / {_fmt(churn['live_rooms_metric'], 0)}",
        ],
        [
            "/healthz at the end",
            "rooms {rooms}, speakers {speakers}, targets {targets}".format(**churn["health_end"]),
        ],
        ["generator peer connections left", str(churn["generator_subscriptions_left"])],
        *_objects_rows(churn),
        [
            "offers the service requested (whole run) / answers to replaced offers",
            f"{churn.get('generator_offers')} / {churn.get('generator_stale_answers')}",
        ],
    ]
    return table(["what", "value"], rows)


def _objects_rows(churn: Json) -> list[list[object]]:
    before, end = churn.get("objects_before"), churn.get("objects_end")
    if not isinstance(before, dict) or not isinstance(end, dict):
        return []
    settle = churn.get("objects_settle_s")
    when = "every room closed at the end" + (f" (+{settle} s)" if settle else "")
    return [
        [
            f"peer connections in memory (metrics): home room open before / {when}",
            f"{before['peer_connections']} / {end['peer_connections']}",
        ],
        [
            f"event-loop tasks (metrics): home room open before / {when}",
            f"{before['tasks']} / {end['tasks']}",
        ],
    ]


def soak_section(soak: Json) -> str:
    if "error" in soak:
        return f"Failed: `{soak['error']}`"
    head = table(
        [
            "speakers",
            "minutes",
            "CPU %",
            "generator CPU %",
            "RSS start / end MB",
            "RSS slope MB/h",
            "word latency p50/p95/p99 ms",
            "frames dropped",
        ],
        [
            [
                soak["speakers"],
                soak["minutes"],
                soak["cpu_percent"],
                soak["generator_cpu_percent"],
                f"{_fmt(soak['rss_start_mb'])} / {_fmt(soak['rss_end_mb'])}",
                _fmt(soak["rss_slope_mb_per_hour"], 2),
                " / ".join(_fmt(soak["latency_ms"].get(k)) for k in ("p50", "p95", "p99")),
                _fmt(soak["frames_dropped"], 0),
            ]
        ],
    )
    samples = table(
        ["minute", "RSS MB", "CPU %", "rooms", "speakers", "peer connections", "event-loop tasks"],
        [
            [
                s["minutes"],
                s["rss_mb"],
                s["cpu_percent"],
                s["rooms"],
                s["speakers"],
                s.get("peer_connections"),
                s.get("tasks"),
            ]
            for s in soak["samples"]
        ],
    )
    return head + "\n\nSamples:\n\n" + samples


def profile_section(profile: Json) -> str:
    if not profile:
        return "No profile was taken in this run."
    if "error" in profile:
        return f"py-spy failed: `{profile['error']}`"
    self_rows = [[f"`{e['function']}`", f"{100 * e['share']:.1f} %"] for e in profile["self"]]
    inclusive = [e for e in profile["inclusive"] if e["share"] < 0.97][:25]
    incl_rows = [[f"`{e['function']}`", f"{100 * e['share']:.1f} %"] for e in inclusive]
    return (
        f"py-spy, {profile.get('samples', 0)} samples at 100 Hz over {profile['seconds'] / 2:.0f} s "
        f"(flame graph: `{profile['svg']}`, not committed).\n\n"
        "Where the samples were (leaf function, self time):\n\n"
        + table(["function (file)", "share of samples"], self_rows)
        + "\n\nOn the stack (inclusive, top-level frames left out):\n\n"
        + table(["function (file)", "share of samples"], incl_rows)
    )


def _reference_lines(results: Json) -> list[str]:
    """The machine's speed at the start and the end of the run."""
    lines = []
    for key, when in (("reference_start", "start"), ("reference_end", "end")):
        ref = results.get(key)
        if not isinstance(ref, dict):
            continue
        if "error" in ref:
            lines.append(f"- machine speed at the {when}: `bench.packet_path` failed: `{ref['error']}`")
            continue
        lines.append(
            f"- machine speed at the {when} (`python -m bench.packet_path`): a voiced packet's receive path"
            f" {_fmt(ref.get('whole_path_us'))} us of CPU (Opus decode {_fmt(ref.get('opus_decode_us'))},"
            f" SRTP {_fmt(ref.get('srtp_unprotect_us'))}, Python {_fmt(ref.get('python_path_us'))})"
        )
    return lines


def markdown(results: Json, images: dict[str, str]) -> str:
    m = results.get("machine", {})
    pattern = results["pattern"]
    utterances = (results.get("word_map") or {}).get("utterances") or []
    words = "/".join(str(len(u)) for u in utterances) or "an unknown number of"
    parts = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.py` (do not edit by hand; notes come from `bench/notes.md`).",
        "",
        f"- command: `{results.get('command')}`",
        *(
            f"- {key} is from a second run (the first failed): `{command}`"
            for key, command in (results.get("repeat_commands") or {}).items()
        ),
        f"- date: {results.get('date')}, revision {results.get('revision')}",
        f"- machine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('memory_gb')} GB RAM,"
        f" Python {m.get('python')}, kernel {m.get('kernel')}",
        f"- talk pattern: {pattern['talk_ms']} ms speech, {pattern['pause_ms']} ms pause, looped;"
        f" the instant engine gives {words} words per utterance",
        "- durations (s): " + ", ".join(f"{k} {v}" for k, v in results.get("durations_s", {}).items()),
        *_reference_lines(results),
        "",
    ]
    from bench import production  # here: production imports this module

    parts += [production.section(results), ""]
    parts += [scale.section(results), ""]
    parts += [
        "## Against the targets: the in-process lower bound (instant engine, no STT transport)"
        if results.get("runs")
        else "## Against the targets",
        "",
        summary(results),
        "",
    ]
    for kind, title in (
        ("active", "Active speakers (instant engine: lower bound, no STT transport)"),
        ("silent", "Silent participants, in call with audio, not speaking (instant engine: lower bound)"),
    ):
        rows = windows(results, kind)
        section = results.get(kind)
        if isinstance(section, dict) and "error" in section:
            parts += [f"## {title}", "", f"Failed: `{section['error']}`", ""]
        elif rows:
            parts += [f"## {title}", "", load_table(rows), ""]
            for key in (f"rss_{kind}", f"cpu_{kind}", f"latency_{kind}"):
                if key in images:
                    parts.append(f"![{key}]({images[key]})")
            parts.append("")
    for key in sorted(k for k in results if k.startswith("churn")):
        if isinstance(results[key], dict):
            title = "Churn" if key == "churn" else f"Churn ({key.removeprefix('churn').strip('_-') or key})"
            parts += [f"## {title} {IN_PROCESS_ENGINE}", "", churn_section(results[key]), ""]
    if isinstance(results.get("soak"), dict):
        parts += [f"## Soak {IN_PROCESS_ENGINE}", "", soak_section(results["soak"]), ""]
        if "soak" in images:
            parts += [f"![soak]({images['soak']})", ""]
    for kind, title in (("active", "active speakers"), ("silent", "silent participants")):
        section = results.get(kind)
        profile = section.get("profile") if isinstance(section, dict) else None
        if kind == "active" or profile:
            n = (profile or {}).get("n")
            at = f", N = {n}" if n else ""
            parts += [f"## Where the time goes: {title}{at}", "", profile_section(profile or {}), ""]
    if NOTES.exists():
        parts += [NOTES.read_text().strip(), ""]
    return "\n".join(parts)


def plots(results: Json, img: Path, base: Path) -> dict[str, str]:
    """Draw the PNGs; returns name -> path relative to ``base``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        path = img / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made[name] = str(path.relative_to(base)) if path.is_relative_to(base) else str(path)

    for kind in ("active", "silent"):
        rows = windows(results, kind)
        if not rows:
            continue
        ns = [w["n"] for w in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ns, [w["rss_mb"] for w in rows], "o-")
        ax.set(xlabel=f"{kind} speakers", ylabel="service RSS (MB)", title=f"RSS vs N ({kind})")
        ax.grid(alpha=0.3)
        save(fig, f"rss_{kind}")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ns, [w["cpu_percent"] for w in rows], "o-", label="service")
        ax.plot(ns, [w["generator_cpu_percent"] for w in rows], "s--", label="load generator")
        ax.set(xlabel=f"{kind} speakers", ylabel="CPU (% of one core)", title=f"CPU vs N ({kind})")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, f"cpu_{kind}")
        with_latency = [w for w in rows if w["n"] > 0 and w["words"] > 0]
        if with_latency:
            fig, ax = plt.subplots(figsize=(6, 4))
            for q in ("p50", "p95", "p99"):
                ax.plot(
                    [w["n"] for w in with_latency], [w["latency_ms"][q] for w in with_latency], "o-", label=q
                )
            ax.set(
                xlabel=f"{kind} speakers", ylabel="ms", title="word latency: packet sent -> transcript at HPB"
            )
            ax.legend()
            ax.grid(alpha=0.3)
            save(fig, f"latency_{kind}")
    soak = results.get("soak")
    if isinstance(soak, dict) and soak.get("samples"):
        minutes = [s["minutes"] for s in soak["samples"]]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
        top.plot(minutes, [s["rss_mb"] for s in soak["samples"]], "o-")
        top.set(ylabel="service RSS (MB)", title=f"soak: {soak['speakers']} active speakers")
        top.grid(alpha=0.3)
        for key, label in (
            ("rooms", "rooms"),
            ("speakers", "speakers"),
            ("peer_connections", "peer connections in memory"),
            ("tasks", "event-loop tasks"),
        ):
            values = [s.get(key) for s in soak["samples"]]
            if all(v is not None for v in values):
                bottom.plot(minutes, values, "o-", label=label)
        bottom.set(xlabel="minutes", ylabel="live objects")
        bottom.legend()
        bottom.grid(alpha=0.3)
        save(fig, "soak")
    return made


def write(results: Json, out: Path, img: Path) -> None:
    images = plots(results, img.resolve(), out.parent.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, images))
