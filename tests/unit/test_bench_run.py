"""The harness' command line: which load runs it makes, and the command it
prints to reproduce a run."""

from __future__ import annotations

import pytest
from bench.run import load_runs, parse_args


def test_each_engine_runs_each_shape_and_scenario_then_the_others_once() -> None:
    opts, _ = parse_args(
        ["--scenario", "active,meeting,churn", "--engine", "modal", "--levels", "present,absent"]
    )
    assert load_runs(opts) == [
        ("modal", "present", "active"),
        ("modal", "present", "meeting"),
        ("modal", "absent", "active"),
        ("modal", "absent", "meeting"),
        ("moshi", "present", "active"),
        ("instant", "present", "active"),
    ]


def test_no_other_engines_without_the_active_scenario_or_when_asked() -> None:
    opts, _ = parse_args(["--scenario", "meeting", "--levels", "absent"])
    assert load_runs(opts) == [("modal", "absent", "meeting")]
    opts, _ = parse_args(["--scenario", "active", "--levels", "present", "--also-engines", ""])
    assert load_runs(opts) == [("modal", "present", "active")]


def test_the_printed_command_spells_out_every_option_and_parses_back_the_same() -> None:
    opts, command = parse_args(["--scenario", "meeting", "--participants", "50,200", "--room-size", "4-12"])
    assert "--participants 50,200" in command
    assert "--room-size 4-12" in command
    assert "--engine modal" in command
    again, command_again = parse_args(
        [part.strip("'") for part in command.split()[3:]]  # after "python -m bench.run"
    )
    assert again == opts
    assert command_again == command


def test_the_generator_is_chosen_and_spelled_out() -> None:
    opts, command = parse_args(["--scenario", "meeting"])
    assert opts.generator == "aiortc" and "--generator aiortc" in command
    opts, command = parse_args(["--scenario", "meeting", "--generator", "lean", "--generator-ahead", "50"])
    assert opts.generator == "lean" and "--generator lean --generator-ahead 50" in command
    again, _ = parse_args([part.strip("'") for part in command.split()[3:]])
    assert again == opts


@pytest.mark.parametrize(
    "argv",
    [
        ["--scenario", "nope"],
        ["--engine", "whisper"],
        ["--levels", "loud"],
        ["--room-size", "5"],
        ["--generator", "janus"],
        ["--generator", "lean", "--generator-ahead", "0"],
    ],
)
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
