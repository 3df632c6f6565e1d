"""`vilscale report RUN_DIR [--out DIR]`: PNG plots of a run's metrics.jsonl."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(parser) -> None:
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")


def run(args) -> int:
    from vilscale.orchestration.launch.exit_codes import EXIT_FAILED, EXIT_SPEC_ERROR

    run_dir = Path(args.run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"vilscale report: {metrics} does not exist; give the run_dir of a job that has started",
              file=sys.stderr)
        return EXIT_SPEC_ERROR
    from vilscale.orchestration.training.report import write_report

    written = write_report(run_dir, Path(args.out) if args.out else run_dir / "report")
    for path in written:
        print(path)
    return 0 if written else EXIT_FAILED
