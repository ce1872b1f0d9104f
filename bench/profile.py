"""Where a running service spends its CPU, by stage of its path:
``python -m bench.profile --pid <service pid> --seconds 20``.

Records the process with py-spy (from the ``bench`` extras; it needs ptrace
permission on the process), then prints the share of busy samples per stage
(``bench.stages``: receive, decode, STT send/read, caption send, ...), the
functions most often at the top of the stack and the ones most often on it.
``--from-raw`` reads an earlier ``--format raw`` recording instead (e.g. the
``profile-*.txt`` that ``bench.run`` leaves in its work directory).
``--cpu-percent`` and ``--per`` turn the shares into CPU per participant.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench import analysis, stages
from bench.report import table

PY_SPY = Path(sys.executable).parent / "py-spy"


def record_command(
    pid: int, seconds: float, fmt: str, output: Path, *, native: bool, rate: int = 100
) -> list[str]:
    """The py-spy command line for one recording."""
    return [
        str(PY_SPY),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        str(rate),
        *(["--native"] if native else []),
        "--format",
        fmt,
        "--output",
        str(output),
    ]


def render(lines: list[str], *, cpu_percent: float | None, per: float | None, top: int = 15) -> str:
    stacks = analysis.parse_collapsed(lines)
    shares = stages.split(stacks)
    header = ["stage", "share of busy samples"]
    cpu = None
    if cpu_percent is not None and per:
        cpu = stages.cpu_by_stage(shares, cpu_percent, per)
        header.append("CPU % per unit")
    rows = [
        [stage, f"{100 * share:.1f} %", *([f"{cpu[stage]:.4f}"] if cpu is not None else [])]
        for stage, share in shares.items()
    ]
    parts = [f"{sum(stacks.values())} samples", "", table(header, rows), "", "Self:", ""]
    parts.append(
        table(
            ["function", "share"],
            [[e.function, f"{100 * e.share:.1f} %"] for e in analysis.top_self(stacks, top)],
        )
    )
    parts += ["", "On the stack:", ""]
    inclusive = [e for e in analysis.top_inclusive(stacks, top + 10) if e.share < 0.97][:top]
    parts.append(table(["function", "share"], [[e.function, f"{100 * e.share:.1f} %"] for e in inclusive]))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pid", type=int, help="the service process to record")
    source.add_argument("--from-raw", type=Path, help="an earlier py-spy --format raw recording")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--native", action="store_true", help="C frames too (slows the process more)")
    parser.add_argument(
        "--raw", type=Path, default=Path("/tmp/bench-profile.txt"), help="where to keep the recording"
    )
    parser.add_argument("--cpu-percent", type=float, help="the process' CPU over the recording, % of a core")
    parser.add_argument("--per", type=float, help="divide the CPU by this (participants, talkers)")
    args = parser.parse_args(argv)
    raw: Path = args.from_raw or args.raw
    if args.pid is not None:
        if not PY_SPY.exists():
            print("py-spy is not installed in this venv (pip install -e '.[bench]')", file=sys.stderr)
            return 2
        command = record_command(args.pid, args.seconds, "raw", raw, native=args.native, rate=args.rate)
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.seconds + 60, check=False)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
    print(render(raw.read_text().splitlines(), cpu_percent=args.cpu_percent, per=args.per))
    return 0


if __name__ == "__main__":
    sys.exit(main())
