"""The production-path figures and their section of the report. Pure.

One run is one scenario (active, silent, meeting) with one engine (``modal``
or ``moshi`` through the service's production client over TLS to the fake
STT in its own process; ``instant`` in-process, a lower bound only) and one
audio shape (RFC 6464 levels present or absent). Its windows come from
``bench.run.measure``; ``figures`` turns one window into what the targets
speak of, ``section`` renders every run.
"""

from __future__ import annotations

import math
from typing import Any

from bench import stages
from bench.report import Json, _fmt, table, valid

UTTERANCE_ALLOWANCE_S = 0.3
"""STT audio allowed beyond the talk itself, per utterance (pre-roll + flush)."""

TARGETS = {
    "cpu_per_talker_levels": 0.4,
    "cpu_per_talker_no_levels": 0.5,
    "cpu_per_silent": 0.04,
    "added_latency_p99_ms_at_100": 40.0,
}

STAGE_ORDER = stages.STAGES


def _num(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def figures(window: Json, profile: Json | None = None) -> Json:
    """One window -> the figures of the report (NaN where not measured)."""
    n = int(window.get("n", 0))
    seconds = _num(window.get("seconds"))
    cpu = _num(window.get("cpu_percent"))
    talk = _num(window.get("talk_seconds"))
    utterances = int(window.get("utterances", 0))
    talkers = _ratio(talk, seconds)
    stt = window.get("stt") or {}
    stt_audio = _num(stt.get("audio_seconds")) if stt else math.nan
    participant_audio = n * seconds if n else math.nan
    allowed = talk + UTTERANCE_ALLOWANCE_S * utterances
    service = window.get("service_latency_ms") or {}
    word = window.get("latency_ms") or {}
    out: Json = {
        "n": n,
        "engine": window.get("engine", "instant"),
        "levels": window.get("levels", "present"),
        "cpu_percent": cpu,
        "cpu_per_participant": _ratio(cpu, n),
        "talkers_mean": talkers,
        "talkers_max": window.get("talking_max", math.nan),
        "cpu_per_talker": _ratio(cpu, talkers) if n else math.nan,
        "rss_mb": _num(window.get("rss_mb")),
        "added_latency_ms": {q: _num(word.get(q)) for q in ("p50", "p95", "p99")},
        "service_histogram_ms": {q: _num(service.get(q)) for q in ("p50", "p95", "p99")},
        "latency_samples": int(window.get("words", 0)),
        "stt_audio_s": stt_audio,
        "participant_audio_s": participant_audio,
        "stt_ratio": _ratio(stt_audio, participant_audio),
        "talk_share": _ratio(talk, participant_audio),
        "stt_allowed_s": allowed,
        "stt_over_allowed": _ratio(stt_audio, allowed),
        "stt_open_mean": _num(window.get("stt_open_mean")),
        "stt_open_max": _num(stt.get("open_max")) if stt else math.nan,
        "stt_busy_mean": _num(window.get("stt_busy_mean")),
        "stt_connections": _num(stt.get("connections_opened")) if stt else math.nan,
        "stt_cpu_percent": _num(window.get("stt_cpu_percent")),
        "generator_cpu_percent": _num(window.get("generator_cpu_percent")),
        "words_delivered": int(window.get("words_delivered", 0)),
        "words_while_silent": int(window.get("words_while_silent", 0)),
        "frames_dropped": _num(window.get("frames_dropped")),
        "service_stt": window.get("service_stt") or {},
        "service_stt_ratio": service_ratio(window.get("service_stt") or {}),
    }
    if profile and profile.get("stages") and profile.get("n") == n and n:
        shares = profile["stages"]
        out["stages_per_participant"] = stages.cpu_by_stage(shares, cpu, n)
        out["stages_per_talker"] = stages.cpu_by_stage(shares, cpu, talkers)
    return out


def service_ratio(metrics: Json) -> float:
    """STT audio over participant audio by the service's own counters
    (speech, flush and keepalive together), NaN where it has none."""
    sent = metrics.get("audio_seconds")
    participants = _num(metrics.get("participant_audio_seconds"))
    if not isinstance(sent, dict) or not participants > 0:
        return math.nan
    return sum(_num(v) for v in sent.values()) / participants


def run_title(key: str, run: Json) -> str:
    kind = run.get("kind", key.split("/", maxsplit=1)[0])
    engine = run.get("engine", "?")
    levels = run.get("levels", "present")
    what = {"active": "active speakers", "silent": "silent participants", "meeting": "meeting mix"}.get(
        kind, kind
    )
    how = (
        "instant engine in-process: **lower bound**, no STT transport"
        if engine == "instant"
        else f"`{engine}` client over TLS to the fake STT"
    )
    workers = run.get("workers")
    processes = f", {workers} worker process{'es' if workers != 1 else ''}" if workers else ""
    return f"{what}, {how}, audio levels {levels}{processes}"


def run_table(run: Json) -> str:
    profile = run.get("profile") or {}
    rows = []
    for window in run.get("windows", []):
        f = figures(window, profile)
        lat = f["added_latency_ms"]
        hist = f["service_histogram_ms"]
        rows.append(
            [
                f["n"],
                _fmt(f["cpu_percent"]),
                _fmt(f["cpu_per_participant"], 3),
                _fmt(f["talkers_mean"]),
                _fmt(f["cpu_per_talker"], 3),
                _fmt(f["rss_mb"]),
                f"{_fmt(lat['p50'])} / {_fmt(lat['p95'])} / {_fmt(lat['p99'])}"
                f" ({f['latency_samples']} words, {window.get('unmatched_words', 0)} unmatched,"
                f" {window.get('early_words', 0)} early)",
                f"{_fmt(hist['p50'])} / {_fmt(hist['p99'])}",
                _fmt(f["stt_ratio"], 3),
                _fmt(f["talk_share"], 3),
                _fmt(f["stt_over_allowed"], 2),
                f"{_fmt(f['stt_open_mean'])} / {_fmt(f['stt_open_max'], 0)}",
                f"{_fmt(f['talkers_mean'])} / {_fmt(f['talkers_max'], 0)}",
                _fmt(f["stt_connections"], 0),
                f"{f['words_delivered']} / {f['words_while_silent']}",
                _fmt(f["frames_dropped"], 0),
                f"{_fmt(f['stt_cpu_percent'])} / {_fmt(f['generator_cpu_percent'])}",
                "yes" if _valid(window) else "**no**",
            ]
        )
    return table(
        [
            "N",
            "CPU %",
            "CPU %/participant",
            "talking (mean)",
            "CPU %/talker",
            "RSS MB",
            "added latency p50/p95/p99 ms",
            "service histogram p50/p99 ms",
            "STT audio / participant audio",
            "talk share",
            "STT audio / (talk + 0.3 s per utterance)",
            "STT streams open mean / max",
            "talking mean / max",
            "STT connections opened",
            "words delivered / while silent",
            "frames dropped",
            "CPU % fake STT / generator",
            "valid window",
        ],
        rows,
    )


def stage_table(run: Json) -> str:
    profile = run.get("profile") or {}
    if not profile.get("stages"):
        return ""
    window = next((w for w in run.get("windows", []) if w.get("n") == profile.get("n")), None)
    if window is None:
        return ""
    f = figures(window, profile)
    rows = [
        [
            stage,
            f"{100 * profile['stages'].get(stage, 0.0):.1f} %",
            _fmt(f["stages_per_participant"].get(stage), 4),
            _fmt(f["stages_per_talker"].get(stage), 4),
        ]
        for stage in STAGE_ORDER
    ]
    return (
        f"CPU by stage at N = {profile['n']} (py-spy, {profile.get('samples', 0)} samples;"
        " method and limits below):\n\n"
        + table(["stage", "share of busy samples", "CPU %/participant", "CPU %/talker"], rows)
    )


def service_metrics_lines(run: Json) -> list[str]:
    lines = []
    for window in run.get("windows", []):
        metrics = window.get("service_stt") or {}
        if metrics:
            ratio = service_ratio(metrics)
            shown = ", ".join(f"{k} {v}" for k, v in sorted(metrics.items()))
            if not math.isnan(ratio):
                shown += f"; STT audio / participant audio by these counters {ratio:.3f}"
            lines.append(f"- N = {window['n']}: {shown}")
    if not lines:
        return ["The service exported none of the STT pool metrics in this run (the fake's counts are used)."]
    return ["The service's own STT metrics over each window:", "", *lines]


def targets(runs: dict[str, Json]) -> str:
    """The issue's targets next to this run's figures (production engines only)."""
    rows: list[list[object]] = []
    for key, run in sorted(runs.items()):
        if not isinstance(run, dict) or run.get("engine") == "instant" or "error" in run:
            continue
        if "workers" in run:
            continue  # scale-out runs: judged by bench.scale
        profile = run.get("profile") or {}
        kind, levels = run.get("kind"), run.get("levels")
        windows = [w for w in run.get("windows", []) if w.get("n", 0) > 0]
        if not windows:
            continue
        top = figures(windows[-1], profile)
        at = f"{key} N={top['n']}" + ("" if _valid(windows[-1]) else " (invalid window)")
        if top["stt_allowed_s"] > 0:
            value = top["stt_over_allowed"]
            rows.append(
                [at, "STT audio / (talk + 0.3 s per utterance)", _fmt(value, 2), "<= 1", _ok(value <= 1)]
            )
        else:
            value = top["stt_ratio"]
            rows.append(
                [at, "STT audio / participant audio (nobody talks)", _fmt(value, 3), "~0", "see table"]
            )
        rows.append(
            [
                at,
                "STT streams open (max) vs talking (max)",
                f"{_fmt(top['stt_open_max'], 0)} vs {_fmt(top['talkers_max'], 0)}",
                "<= talkers + headroom",
                "see table",
            ]
        )
        if kind in ("active", "meeting"):
            limit = TARGETS["cpu_per_talker_levels" if levels == "present" else "cpu_per_talker_no_levels"]
            value = top["cpu_per_participant"] if kind == "active" else top["cpu_per_talker"]
            label = "CPU % per speaker (all talk in bursts)" if kind == "active" else "CPU % per talker"
            rows.append([at, label, _fmt(value, 3), f"<= {limit}", _ok(value <= limit)])
        if kind == "silent":
            value = top["cpu_per_participant"]
            rows.append([at, "CPU % per silent participant", _fmt(value, 3), "<= 0.04", _ok(value <= 0.04)])
        at100 = next((w for w in windows if w["n"] == 100), None)
        if at100 is not None and kind in ("active", "meeting"):
            p99 = figures(at100)["added_latency_ms"]["p99"]
            rows.append([f"{key} N=100", "added latency p99 ms", _fmt(p99), "< 40", _ok(p99 < 40)])
        words = run.get("words") or {}
        if words:
            lost, silent = words.get("lost", 0), words.get("while_silent", 0)
            rows.append(
                [
                    key,
                    "words lost / misattributed",
                    f"{lost} / {silent}",
                    "0 / 0",
                    _ok(lost == 0 and silent == 0),
                ]
            )
    if not rows:
        return "No production-path run in these results."
    return table(["run", "figure", "value", "target", "verdict"], rows)


def _valid(window: Json) -> bool:
    """Every stream up and the generator kept its pace (``report.valid``)."""
    try:
        return valid(window)
    except KeyError:
        return False


def _ok(ok: bool) -> str:
    return "met" if ok else "**not met**"


METHOD = """\
How these figures are taken:

- **Added latency** is measured outside the service: from the generator
  handing over the RTP packet that completes a word's audio to the
  transcript carrying that word arriving at the HPB emulator (same process,
  same clock). The word goes through the engine client, TLS and loopback to
  the fake STT in another process and back; the fake answers at zero delay
  (`--stt-delay-frames 0`), so no model delay is in the figure. Which packet
  completes which word is known offline (the service's audio gate and the
  fake's word rule over the pattern). In the meeting mix every turn starts
  at the pattern's talk and the same map is used from each onset; words
  are left unmatched (no latency) past the first 3 s of a turn, in
  utterances that start less than 1 s after the previous one (the gate has
  not closed, so frames do not restart at the onset) and in a caption that
  ran into the speaker's next utterance; *early* words arrived before the
  packet the map names (the map did not hold) and are left out too. The service's own histogram
  (`live_transcription_caption_latency_seconds`) is shown beside it: it
  dates a word by the engine's assumed model delay (Modal: 0.48 s), so with
  a zero-delay fake it reads that much too high.
- **STT load** is counted by the fake STT server itself: audio-seconds it
  received, over participant audio-seconds (N x window). *Talk* is what the
  generator sent as speech; the allowance is talk + 0.3 s per utterance.
  Streams open are sampled once a second from the fake (mean / max), next to
  the speakers talking at that moment (generator).
- **CPU per talker** is the service's CPU over the mean number of
  participants talking (talk seconds / window); it includes what the silent
  participants of the same run cost. In `active` runs every speaker talks
  in bursts (3 s on, 1.5 s off), so the target is checked per speaker.
- **Lost / misattributed words**: after the last window the generator falls
  silent (`--settle` seconds), then the words the fake STT sent over the
  whole scenario are compared with the new words that reached the HPB; a
  word for a speaker who had not talked for 3 s is counted as misattributed
  (the generator knows who talked when; the audio is the same for all).
- **CPU by stage**: py-spy samples the service (100 Hz, after the window, at
  `--profile-at`); each sample goes to the stage of the innermost frame on
  its stack that names one: *receive* (media/, aiortc, aioice, SRTP, DTLS),
  *decode* (audio/: Opus decode, gate, framing), *STT send/read* (stt/:
  conversion, framing, the engine client; library calls such as websockets
  and ssl under it), *caption send* (captions/, hpb/), *rooms* (glue), *event loop itself*
  (the leaf is the loop's entry: uvloop's C code polling, reading sockets,
  running transports, with no Python frame below). Limits:
  time in uvloop's C code is seen under the Python callback it runs, if
  any; kernel time is attributed to its caller only with
  `--profile-native`; py-spy leaves idle samples out, so shares are of busy
  time and are multiplied by the window's measured CPU; a websockets frame
  read by the loop with no service frame above cannot be told apart between
  the HPB link and the STT. py-spy slows the process while it samples: the
  CPU figure comes from the window before the profile, not during it."""


def section(results: Json) -> str:
    runs = results.get("runs")
    if not isinstance(runs, dict) or not runs:
        return ""
    parts = ["## Production path: against the targets", "", targets(runs), ""]
    for key, run in runs.items():
        if not isinstance(run, dict):
            continue
        parts += [f"### {run_title(key, run)}", ""]
        if "error" in run:
            parts += [f"Failed: `{run['error']}`", ""]
            continue
        parts += [run_table(run), ""]
        if run.get("kind") == "meeting" and run.get("rooms"):
            rooms = run["rooms"]
            parts += [
                f"Rooms: {len(rooms)} ({min(rooms)}-{max(rooms)} participants);"
                " seed and shape in results.json.",
                "",
            ]
        stage = stage_table(run)
        if stage:
            parts += [stage, ""]
        words = run.get("words") or {}
        if words:
            parts += [
                f"Words over the scenario: the STT sent {words.get('stt_words')}, the HPB got "
                f"{words.get('delivered')} (lost {words.get('lost')}),"
                f" misattributed {words.get('while_silent')}.",
                "",
            ]
        parts += [*service_metrics_lines(run), ""]
    parts += [METHOD, ""]
    return "\n".join(parts)
