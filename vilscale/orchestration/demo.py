"""`vilscale demo` (what `make demo` runs): the digits shards, vil_nano trained with ZeRO-2 on 2 CPU
processes with metrics served while it runs, evaluation of the final weights, and the report.
The last line printed is ``val top-1: NN.N%``."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def add_parser(parser) -> None:
    parser.add_argument("--job", default="jobs/demo_digits.yaml", help="job spec of the demo")
    parser.add_argument("--data", default="data/digits", help="where the digits shards are written")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks")
    parser.add_argument("--fresh", action="store_true", help="delete an earlier demo run first")


def run(args) -> int:
    import shutil

    from vilscale.cli import main as vilscale
    from vilscale.orchestration.spec import SpecError, load_spec

    started = time.perf_counter()
    data = Path(args.data)
    if not (data / "train" / "manifest.json").is_file() or not (data / "val" / "manifest.json").is_file():
        code = vilscale(["prepare", "digits", str(data)])
        if code:
            return code
    overrides = [f"data.train_manifest={data / 'train' / 'manifest.json'}",
                 f"data.val_manifest={data / 'val' / 'manifest.json'}"]
    try:
        spec = load_spec(args.job, overrides)
    except SpecError as error:
        print(f"vilscale demo: {error}", file=sys.stderr)
        return 2
    run_dir = Path(spec.run_dir)
    if args.fresh or (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    sets = [item for assignment in overrides for item in ("--set", assignment)]
    code = vilscale(["train", args.job, "--nproc", str(args.nproc), *sets])
    if code:
        return code
    vilscale(["report", str(run_dir)])
    print(f"demo finished in {time.perf_counter() - started:.0f} s; run dir {run_dir}, plots in {run_dir / 'report'}")
    return vilscale(["eval", str(run_dir)])
