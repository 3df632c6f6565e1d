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


def test_the_jobs_ship_with_the_package_and_commands_take_their_names(tmp_path, monkeypatch, capsys):
    """From a directory that is not the checkout: `vilscale jobs` lists every shipped spec, a name loads as its
    file does, `copy` writes one out for editing and never over a file, an unknown name lists the real ones."""
    from pathlib import Path

    from vilscale.orchestration.config import load_spec
    from vilscale.orchestration.config.shipped import JOBS_DIR

    files = sorted(path.stem for path in JOBS_DIR.glob("*.yaml"))
    assert JOBS_DIR.parent.name == "vilscale" and {"smoke", "pretrain_21k", "digits_mask_rcnn"} <= set(files)
    monkeypatch.chdir(tmp_path)
    assert main(["jobs"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == files
    assert load_spec("smoke") == load_spec(JOBS_DIR / "smoke.yaml")
    assert load_spec("pretrain_21k.yaml", ["train.epochs=3"]).train.epochs == 3
    assert main(["jobs", "copy", "smoke"]) == 0
    assert Path("smoke.yaml").read_text() == (JOBS_DIR / "smoke.yaml").read_text()
    Path("smoke.yaml").write_text("# mine\n")
    capsys.readouterr()
    assert main(["jobs", "copy", "smoke"]) == 2 and "smoke.yaml exists" in capsys.readouterr().err
    assert Path("smoke.yaml").read_text() == "# mine\n"  # not overwritten
    assert main(["jobs", "copy", "monitoring", "mon"]) == 0 and (tmp_path / "mon" / "prometheus.yml").is_file()
    assert main(["train", "no_such_job", "--nproc", "1"]) == 2
    err = capsys.readouterr().err
    assert "job spec no_such_job does not exist" in err and "smoke" in err and "pretrain_21k" in err, err
    assert main(["jobs", "show", "nope"]) == 2 and "no shipped job is called 'nope'" in capsys.readouterr().err
