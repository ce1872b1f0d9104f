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
    cpu_percent,
    parse_stat,
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
