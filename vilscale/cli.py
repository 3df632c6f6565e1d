"""The ``vilscale`` command: one program, one subcommand per task.

Each subcommand lives with its concern (``vilscale.data``, ``vilscale.model``,
``vilscale.orchestration``) and registers itself here through ``add_parser(subparsers)``; this
module only wires them together, so ``vilscale --help`` stays cheap (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module providing ``add_parser`` and ``run``, one-line help, issue area when missing)
SUBCOMMANDS = {
    "prepare": ("vilscale.data.cli", "write FFCV shards from an ImageFolder, ImageNet-21K tars or digits", "data"),
    "train": ("vilscale.orchestration.cli_train", "train from a job spec (YAML), on 1 or N local processes",
              "trainer"),
    "submit": ("vilscale.orchestration.cli_submit", "submit a job to Ray, SLURM (submitit) or locally",
               "launchers"),
    "eval": ("vilscale.orchestration.cli_eval", "evaluate a run's checkpoint (top-1/top-5)", "trainer"),
    "export": ("vilscale.orchestration.cli_export", "export a run's consolidated weights to safetensors",
               "trainer"),
    "convert": ("vilscale.model.cli", "convert an official ViL checkpoint to vilscale weights", "model"),
    "report": ("vilscale.orchestration.report", "plot a run's metrics.jsonl to PNG files", "trainer"),
    "bench": ("vilscale.model.bench", "measure FLOPs and parameters of the model variants", "model"),
    "demo": ("vilscale.orchestration.demo", "the quickstart: digits shards, training, eval, report", "trainer"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vilscale", description="Pretrain Multi-Scale Vision Longformer (ViL) at cluster scale.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text, _area) in SUBCOMMANDS.items():
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
    module_name, help_text, area = SUBCOMMANDS[name]
    module = _load(module_name)
    if module is None:
        print(f"vilscale {name}: not built yet; the {area} issue provides it", file=sys.stderr)
        return 3
    sub_parser = argparse.ArgumentParser(prog=f"vilscale {name}", description=help_text)
    module.add_parser(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
