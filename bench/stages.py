"""CPU by stage of the service's path, from py-spy's collapsed stacks. Pure.

A sample belongs to the stage of the innermost frame on its stack that
names one (the leaf is tried first, then its callers): a libopus call made
by ``audio/opus.py`` is *decode*, the same frame pushed on into
``stt/remote.py`` is *STT*, a ``websockets`` write under ``hpb/`` is *caption
send*. Library frames with no stage of their own (``websockets``, ``ssl``,
``asyncio``, numpy) take the stage of the service frame that called them.

Limits, said in the report: py-spy samples Python stacks (``--native`` adds
C frames but slows the service more), so time in the event loop itself
(uvloop's C code polling, reading datagrams and dispatching) appears under
the callback it runs, or as *event loop itself* when the leaf is the loop's
entry (``Runner.run``) with no Python frame below;
kernel time (system calls) is counted where the call was made only with
``--native``; py-spy drops idle samples, so shares are of busy time and are
turned into CPU by multiplying with the window's measured CPU; a
``websockets`` frame read by the event loop with no service frame above it
cannot be told apart between the HPB link and the STT, and is shown alone.
"""

from __future__ import annotations

from collections.abc import Mapping

RECEIVE = "receive"
DECODE = "decode"
STT = "STT send/read"
CAPTION = "caption send"
ROOMS = "rooms (glue)"
WEBSOCKETS = "websockets (HPB or STT)"
EVENT_LOOP = "event loop itself"
OTHER = "other"

STAGES: tuple[str, ...] = (RECEIVE, DECODE, STT, CAPTION, ROOMS, WEBSOCKETS, EVENT_LOOP, OTHER)

RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (DECODE, ("live_transcription/audio/", "opuslib", "libopus", "av/", "soxr")),
    (STT, ("live_transcription/stt/",)),
    (
        CAPTION,
        ("live_transcription/captions/", "live_transcription/hpb/", "live_transcription/rooms/targets.py"),
    ),
    (
        RECEIVE,
        (
            "live_transcription/media/",
            "aiortc/",
            "aioice/",
            "pylibsrtp",
            "libsrtp",
            "OpenSSL/",
            "cryptography/",
            "pyee/",
        ),
    ),
    (ROOMS, ("live_transcription/rooms/",)),
)
"""Stage -> substrings of a frame (``function (path:line)``) that name it.
Order matters only within one frame (a frame matches the first rule)."""

_FALLBACK: tuple[tuple[str, tuple[str, ...]], ...] = ((WEBSOCKETS, ("websockets/",)),)
"""Used only when no frame of the stack has a stage of its own."""

_LOOP = ("asyncio/runners.py", "asyncio/base_events.py", "selectors.py", "uvloop", "libuv")
"""A stack whose leaf is here is the event loop's own work: with uvloop,
polling, reading sockets and running transports in C, below the last
Python frame (``Runner.run``)."""


def _match(frame: str, rules: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    location = frame.rpartition("(")[2] if "(" in frame else frame
    for stage, needles in rules:
        if any(needle in location for needle in needles):
            return stage
    return None


def stage_of(frames: tuple[str, ...]) -> str:
    """The stage of one stack (root first, leaf last)."""
    for frame in reversed(frames):
        stage = _match(frame, RULES)
        if stage is not None:
            return stage
    for frame in reversed(frames):
        stage = _match(frame, _FALLBACK)
        if stage is not None:
            return stage
    if frames and _match(frames[-1], ((EVENT_LOOP, _LOOP),)):
        return EVENT_LOOP
    return OTHER


def split(stacks: Mapping[tuple[str, ...], int]) -> dict[str, float]:
    """Share of the samples (0..1) per stage, every stage present."""
    counts = dict.fromkeys(STAGES, 0)
    for frames, count in stacks.items():
        counts[stage_of(frames)] += count
    total = sum(counts.values())
    return {stage: (count / total if total else 0.0) for stage, count in counts.items()}


def cpu_by_stage(shares: Mapping[str, float], cpu_percent: float, per: float) -> dict[str, float]:
    """Each stage's share of ``cpu_percent`` (of one core), divided by
    ``per`` (participants or talkers); NaN-free: 0 when ``per`` is 0."""
    if per <= 0:
        return dict.fromkeys(shares, 0.0)
    return {stage: share * cpu_percent / per for stage, share in shares.items()}
