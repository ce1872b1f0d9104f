"""A process' CPU time and resident memory, read from ``/proc`` (Linux).

The parsing is pure (text in, numbers out) so it is tested without a
process; ``ProcessSampler`` reads the files and turns two readings into
CPU percent of one core over the interval between them.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ProcParseError(ValueError):
    """The text is not what ``/proc`` would contain."""


@dataclass(frozen=True, slots=True)
class CpuTimes:
    utime_ticks: int
    stime_ticks: int

    @property
    def ticks(self) -> int:
        return self.utime_ticks + self.stime_ticks

    def seconds(self, clock_ticks: int = CLOCK_TICKS) -> float:
        return self.ticks / clock_ticks


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading: wall time (monotonic seconds), CPU seconds, RSS bytes."""

    wall: float
    cpu_seconds: float
    rss_bytes: int
    system_seconds: float = 0.0
    """The part of ``cpu_seconds`` spent in the kernel (stime)."""


def parse_stat(text: str) -> CpuTimes:
    """utime and stime (fields 14 and 15) of ``/proc/<pid>/stat``. The
    command name (field 2) is in parentheses and may contain spaces and
    parentheses itself: fields are counted after its last ``)``."""
    end = text.rfind(")")
    if end < 0:
        raise ProcParseError("no command name in stat")
    fields = text[end + 1 :].split()
    # fields[0] is field 3 (state): utime is field 14 -> index 11
    if len(fields) < 13:
        raise ProcParseError(f"stat has {len(fields)} fields after the name, need 13")
    try:
        return CpuTimes(int(fields[11]), int(fields[12]))
    except ValueError as exc:
        raise ProcParseError(f"stat utime/stime not integers: {exc}") from None


def parse_stat_reaped(text: str) -> CpuTimes:
    """cutime and cstime (fields 16 and 17) of ``/proc/<pid>/stat``: the CPU
    of the process' children that ended and were waited for. A worker that
    dies moves its CPU here, so a process tree's total stays whole."""
    end = text.rfind(")")
    if end < 0:
        raise ProcParseError("no command name in stat")
    fields = text[end + 1 :].split()
    if len(fields) < 15:
        raise ProcParseError(f"stat has {len(fields)} fields after the name, need 15")
    try:
        return CpuTimes(int(fields[13]), int(fields[14]))
    except ValueError as exc:
        raise ProcParseError(f"stat cutime/cstime not integers: {exc}") from None


def parse_children(text: str) -> list[int]:
    """The pids in ``/proc/<pid>/task/<tid>/children``."""
    try:
        return [int(word) for word in text.split()]
    except ValueError as exc:
        raise ProcParseError(f"children not pids: {exc}") from None


def parse_status_rss(text: str) -> int:
    """``VmRSS`` of ``/proc/<pid>/status`` in bytes (the file says kB)."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise ProcParseError(f"bad VmRSS line: {line!r}")
            unit = parts[2].lower() if len(parts) > 2 else "kb"
            if unit != "kb":
                raise ProcParseError(f"unexpected VmRSS unit {unit!r}")
            return int(parts[1]) * 1024
    raise ProcParseError("no VmRSS line (a kernel thread or a zombie?)")


def cpu_percent(before: Sample, after: Sample, *, system_only: bool = False) -> float:
    """CPU used between two samples, in percent of one core (kernel time
    only with ``system_only``)."""
    wall = after.wall - before.wall
    if wall <= 0:
        raise ValueError("samples must be in time order and apart")
    if system_only:
        return 100.0 * (after.system_seconds - before.system_seconds) / wall
    return 100.0 * (after.cpu_seconds - before.cpu_seconds) / wall


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0.0 when xs do not vary)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("need equally many xs and ys, at least one")
    n = len(xs)
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class ProcessSampler:
    """Reads one process' ``/proc`` files."""

    def __init__(self, pid: int, *, proc: Path = Path("/proc"), clock_ticks: int = CLOCK_TICKS) -> None:
        self.pid = pid
        self._dir = proc / str(pid)
        self._clock_ticks = clock_ticks

    def sample(self) -> Sample:
        wall = time.monotonic()
        times = parse_stat((self._dir / "stat").read_text())
        rss = parse_status_rss((self._dir / "status").read_text())
        return Sample(wall, times.seconds(self._clock_ticks), rss, times.stime_ticks / self._clock_ticks)


class TreeSampler:
    """A process and all its descendants (a supervisor and its workers) as
    one: CPU and RSS summed over the tree. The CPU of descendants that ended
    and were waited for is counted through their parent's cutime/cstime, so
    a worker killed between two samples does not take its CPU with it."""

    def __init__(self, pid: int, *, proc: Path = Path("/proc"), clock_ticks: int = CLOCK_TICKS) -> None:
        self.pid = pid
        self._proc = proc
        self._clock_ticks = clock_ticks

    def pids(self) -> list[int]:
        """The root and every live descendant, root first."""
        found = [self.pid]
        index = 0
        while index < len(found):
            pid = found[index]
            index += 1
            try:
                tasks = list((self._proc / str(pid) / "task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    found.extend(parse_children((task / "children").read_text()))
                except OSError:
                    continue
        return found

    def sample(self) -> Sample:
        wall = time.monotonic()
        ticks = system = rss = 0
        for index, pid in enumerate(self.pids()):
            directory = self._proc / str(pid)
            try:
                stat = (directory / "stat").read_text()
                status = (directory / "status").read_text()
            except OSError:
                if index == 0:
                    raise
                continue  # ended between the listing and the read
            own = parse_stat(stat)
            reaped = parse_stat_reaped(stat)
            ticks += own.ticks + reaped.ticks
            system += own.stime_ticks + reaped.stime_ticks
            with contextlib.suppress(ProcParseError):  # a zombie has no VmRSS
                rss += parse_status_rss(status)
        return Sample(wall, ticks / self._clock_ticks, rss, system / self._clock_ticks)
