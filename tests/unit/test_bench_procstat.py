"""The /proc parsing and the statistics of the benchmark harness."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from bench.procstat import (
    CpuTimes,
    ProcessSampler,
    ProcParseError,
    Sample,
    TreeSampler,
    cpu_percent,
    parse_children,
    parse_stat,
    parse_stat_reaped,
    parse_status_rss,
    percentile,
    slope,
)

STAT = (
    "4242 (python3 (x) y) S 1 4242 4242 0 -1 4194560 12345 0 0 0 "
    "1500 250 0 0 20 0 3 0 987654 123456789 4567 18446744073709551615 1 1 0 0 0 0 0 16781312 "
    "16386 0 0 0 17 1 0 0 0 0 0"
)

STATUS = """Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t  812345 kB
VmRSS:\t   53124 kB
RssAnon:\t   40000 kB
Threads:\t3
"""


def test_stat_fields_are_counted_after_the_last_parenthesis() -> None:
    times = parse_stat(STAT)
    assert times == CpuTimes(1500, 250)
    assert times.ticks == 1750
    assert times.seconds(100) == pytest.approx(17.5)


@pytest.mark.parametrize("text", ["", "4242 python S 1", "1 (a) S 1 2 3", "1 (a) S " + "x " * 20])
def test_bad_stat_is_a_parse_error(text: str) -> None:
    with pytest.raises(ProcParseError):
        parse_stat(text)


def test_vmrss_in_bytes() -> None:
    assert parse_status_rss(STATUS) == 53124 * 1024


@pytest.mark.parametrize(
    "text", ["Name:\tkthreadd\nState:\tS\n", "VmRSS:\t  abc kB\n", "VmRSS:\t 12 MB\n", "VmRSS:\n"]
)
def test_missing_or_bad_vmrss_is_a_parse_error(text: str) -> None:
    with pytest.raises(ProcParseError):
        parse_status_rss(text)


def test_cpu_percent_of_one_core() -> None:
    before = Sample(wall=10.0, cpu_seconds=1.0, rss_bytes=0)
    after = Sample(wall=20.0, cpu_seconds=3.5, rss_bytes=0)
    assert cpu_percent(before, after) == pytest.approx(25.0)
    with pytest.raises(ValueError):
        cpu_percent(after, before)


def test_slope_and_percentile() -> None:
    assert slope([0, 10, 20], [100, 120, 140]) == pytest.approx(2.0)
    assert slope([5, 5], [1, 9]) == 0.0
    with pytest.raises(ValueError):
        slope([], [])
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))


def test_sampler_reads_a_fake_proc_tree(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "stat").write_text(STAT)
    (tmp_path / "4242" / "status").write_text(STATUS)
    sample = ProcessSampler(4242, proc=tmp_path, clock_ticks=100).sample()
    assert sample.cpu_seconds == pytest.approx(17.5)
    assert sample.rss_bytes == 53124 * 1024


def test_sampler_reads_this_process() -> None:
    sample = ProcessSampler(os.getpid()).sample()
    assert sample.rss_bytes > 1 << 20
    assert sample.cpu_seconds > 0


def _stat(pid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0) -> str:
    fields = f"S 1 1 1 0 -1 0 0 0 0 0 {utime} {stime} {cutime} {cstime} 20 0 1 0 1 1 1"
    return f"{pid} (live-transcription) {fields}"


def _proc_entry(root: Path, pid: int, stat: str, rss_kb: int | None, children: list[int]) -> None:
    task = root / str(pid) / "task" / str(pid)
    task.mkdir(parents=True)
    (root / str(pid) / "stat").write_text(stat)
    status = f"Name:\tx\nVmRSS:\t{rss_kb} kB\n" if rss_kb is not None else "Name:\tx\n"
    (root / str(pid) / "status").write_text(status)
    (task / "children").write_text(" ".join(str(c) for c in children) + (" " if children else ""))


def test_reaped_children_times_and_children_lists_parse() -> None:
    assert parse_stat_reaped(_stat(7, 1, 2, 30, 4)) == CpuTimes(30, 4)
    assert parse_children("12 13 ") == [12, 13]
    assert parse_children("") == []
    with pytest.raises(ProcParseError):
        parse_children("12 x")
    with pytest.raises(ProcParseError):
        parse_stat_reaped("7 (x) S 1 2")


def test_tree_sampler_sums_the_supervisor_its_workers_and_the_reaped(tmp_path: Path) -> None:
    # supervisor 10 (its reaped worker left 40+10 ticks), workers 11 and 12,
    # and 12's own child 13, a zombie without VmRSS
    _proc_entry(tmp_path, 10, _stat(10, 100, 20, 40, 10), 1000, [11, 12])
    _proc_entry(tmp_path, 11, _stat(11, 300, 30), 2000, [])
    _proc_entry(tmp_path, 12, _stat(12, 200, 10), 3000, [13])
    _proc_entry(tmp_path, 13, _stat(13, 5, 5), None, [])
    sampler = TreeSampler(10, proc=tmp_path, clock_ticks=100)
    assert sampler.pids() == [10, 11, 12, 13]
    sample = sampler.sample()
    assert sample.cpu_seconds == pytest.approx((100 + 20 + 40 + 10 + 300 + 30 + 200 + 10 + 5 + 5) / 100)
    assert sample.system_seconds == pytest.approx((20 + 10 + 30 + 10 + 5) / 100)
    assert sample.rss_bytes == (1000 + 2000 + 3000) * 1024


def test_tree_sampler_skips_a_worker_that_ended_meanwhile(tmp_path: Path) -> None:
    _proc_entry(tmp_path, 10, _stat(10, 100, 0), 1000, [11, 99])
    _proc_entry(tmp_path, 11, _stat(11, 50, 0), 500, [])
    sample = TreeSampler(10, proc=tmp_path, clock_ticks=100).sample()
    assert sample.cpu_seconds == pytest.approx(1.5)
    assert sample.rss_bytes == 1500 * 1024


def test_tree_sampler_reads_this_process() -> None:
    sample = TreeSampler(os.getpid()).sample()
    assert sample.rss_bytes > 0
    assert sample.cpu_seconds > 0
