"""`vilscale report RUN_DIR [--out DIR]`: PNG plots of a run's metrics.jsonl, and predictions.png: the newest
checkpoint's predictions drawn on a few validation images (`vilscale predict`'s pictures, in a grid)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(parser) -> None:
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    parser.add_argument("--no-predictions", action="store_true",
                        help="only the plots, not the grid of validation predictions (which loads the model)")


def run(args) -> int:
    from vilscale.errors import EXIT_FAILED, EXIT_SPEC_ERROR

    run_dir = Path(args.run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"vilscale report: {metrics} does not exist; give the run_dir of a job that has started",
              file=sys.stderr)
        return EXIT_SPEC_ERROR
    from vilscale.orchestration.training.report import write_report

    out = Path(args.out) if args.out else run_dir / "report"
    written = write_report(run_dir, out)
    for path in written:
        print(path)
    if written and not args.no_predictions:
        grid = _prediction_grid(run_dir, out)
        if grid is not None:
            print(grid)
    return 0 if written else EXIT_FAILED


def _prediction_grid(run_dir: Path, out: Path) -> Path | None:
    """The newest checkpoint's predictions on a few validation images (`vilscale predict`'s pictures), or a line
    saying why there are none (a run without a checkpoint yet, validation data that moved)."""
    from vilscale.orchestration.checkpoint import CheckpointError
    from vilscale.orchestration.cli.predict import validation_grid

    try:
        return validation_grid(run_dir, out)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"vilscale report: no grid of validation predictions: {error}", file=sys.stderr)
        return None
