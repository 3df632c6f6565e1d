"""The ``vilscale`` command: one program, one subcommand per task.

Each subcommand is a small module with ``add_parser(parser)`` and ``run(args)``: ``prepare`` lives with
the data (``vilscale.data.cli``), ``convert`` and ``bench`` with the model, the run commands in
``vilscale.orchestration.cli``. This module only wires them together and imports a subcommand's module
only when it runs, so ``vilscale --help`` stays cheap (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module providing ``add_parser`` and ``run``, one-line help)
SUBCOMMANDS = {
    "prepare": ("vilscale.data.cli", "write FFCV shards from an ImageFolder, ImageNet-21K tars or digits"),
    "train": ("vilscale.orchestration.cli.train", "train from a job spec (YAML), on 1 or N local processes"),
    "plan": ("vilscale.orchestration.cli.plan", "what a job will do and cost: batches, lr, steps, FLOPs, wall time"),
    "submit": ("vilscale.orchestration.cli.submit", "submit a job to Ray, SLURM (submitit) or locally"),
    "eval": ("vilscale.orchestration.cli.eval", "evaluate a run's checkpoint, or any weights on a job spec's data"),
    "export": ("vilscale.orchestration.cli.export", "export a run's consolidated weights to safetensors"),
    "convert": ("vilscale.model.cli", "convert an official ViL checkpoint to vilscale weights"),
    "predict": ("vilscale.orchestration.cli.predict", "draw a run's predictions on images (boxes, masks, classes)"),
    "report": ("vilscale.orchestration.cli.report", "plot a run's metrics.jsonl and a grid of val predictions to PNGs"),
    "bench": ("vilscale.model.bench", "measure FLOPs and parameters of the model variants"),
    "demo": ("vilscale.orchestration.cli.demo", "the quickstart: digits shards, training, eval, report"),
    "jobs": ("vilscale.orchestration.cli.jobs", "the job specs shipped with vilscale: list, show, copy one out"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vilscale", description="Pretrain Multi-Scale Vision Longformer (ViL) at cluster scale.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, add_help=False)
        sub.set_defaults(_module=module_name, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; valid commands: {', '.join(SUBCOMMANDS)}")
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"vilscale {name}", description=help_text)
    module.add_parser(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
