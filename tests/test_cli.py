"""The `vilscale` command: help lists every subcommand of the design; unknown commands fail."""

from __future__ import annotations

import subprocess
import sys

from vilscale.cli import SUBCOMMANDS, main

DESIGN_SUBCOMMANDS = {"prepare", "train", "submit", "eval", "export", "convert", "report", "bench"}


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in DESIGN_SUBCOMMANDS:
        assert name in result.stdout, f"`vilscale --help` does not list {name}"
    assert DESIGN_SUBCOMMANDS <= set(SUBCOMMANDS)


def test_unknown_command_fails_with_the_valid_names(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        raise AssertionError("an unknown command must exit non-zero")
    assert "prepare" in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
