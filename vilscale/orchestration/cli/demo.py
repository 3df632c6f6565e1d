"""`vilscale demo [--journey | --detection]` (what `make demo` runs): the digits shards, vil_nano trained with
ZeRO-2 on 2 CPU processes with metrics served while it runs, evaluation of the final weights, and the report.
With ``--journey`` it goes on as a lab would: export the pretrained weights, fine-tune them at twice the
resolution (the shipped job journey_digits) and evaluate the fine-tuned model. The last line printed is
``val top-1: NN.N%`` of the last model trained. With ``--detection``: digits-coco canvases, Mask R-CNN
(the shipped job digits_mask_rcnn), the report, eval (box and mask AP) and `vilscale predict` on four val canvases;
the last line says where the pictures are. The jobs are the shipped ones (by name), so the demo runs from any
directory: data and runs are written under the current one."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def add_parser(parser) -> None:
    parser.add_argument("--job", default="demo_digits", help="job spec of the demo (a shipped job's name or a file)")
    parser.add_argument("--data", default="data/digits", help="where the digits shards are written")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo runs first")
    parser.add_argument("--journey", action="store_true",
                        help="then export, fine-tune at 64 px (journey_digits) and evaluate that")
    parser.add_argument("--journey-job", default="journey_digits", help="job spec of the fine-tune")
    parser.add_argument("--detection", action="store_true",
                        help="instead: digits-coco canvases, Mask R-CNN (digits_mask_rcnn), eval, and "
                             "pictures of its predictions on a few val canvases (vilscale predict)")
    parser.add_argument("--detection-job", default="digits_mask_rcnn", help="job spec of --detection")
    parser.add_argument("--detection-data", default="data/digits_coco", help="where the digits-coco canvases go")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="train at most this many steps (0: the job's schedule); for a quick look")


def run(args) -> int:
    import shutil

    from vilscale.cli import main as vilscale
    from vilscale.errors import EXIT_SPEC_ERROR
    from vilscale.orchestration.config import SpecError, load_spec

    started = time.perf_counter()
    if args.detection:
        return _detection(args, started)
    data = Path(args.data)
    data_sets = [f"data.train_manifest={data / 'train' / 'manifest.json'}",
                 f"data.val_manifest={data / 'val' / 'manifest.json'}"]
    if args.max_steps:
        data_sets.append(f"train.max_steps={args.max_steps}")
    try:
        spec = load_spec(args.job, data_sets)
        if args.journey:
            export = Path(spec.run_dir) / "vil_nano_digits.safetensors"
            journey_sets = [*data_sets, f"model.init_weights={export}"]
            journey = load_spec(args.journey_job, journey_sets)
    except SpecError as error:  # found before anything is written
        print(f"vilscale demo: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    if not (data / "train" / "manifest.json").is_file() or not (data / "val" / "manifest.json").is_file():
        code = vilscale(["prepare", "digits", str(data)])
        if code:
            return code
    run_dir = Path(spec.run_dir)
    pretrained = (run_dir / "summary.json").is_file() and not args.fresh
    if args.journey and pretrained:
        print(f"[vilscale] using the pretrained run {run_dir} (pass --fresh to train it again)", file=sys.stderr)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
        code = vilscale(["train", args.job, "--nproc", str(args.nproc), *_sets(data_sets)])
        if code:
            return code
        vilscale(["report", str(run_dir)])
    if not args.journey:
        print(f"demo finished in {time.perf_counter() - started:.0f} s; run dir {run_dir}, plots in "
              f"{run_dir / 'report'}")
        return vilscale(["eval", str(run_dir)])
    code = vilscale(["export", str(run_dir), str(export)])
    if code:
        return code
    shutil.rmtree(journey.run_dir, ignore_errors=True)
    code = vilscale(["train", args.journey_job, "--nproc", str(args.nproc), *_sets(journey_sets)])
    if code:
        return code
    print(f"journey finished in {time.perf_counter() - started:.0f} s: pretrained {run_dir} at "
          f"{spec.model.img_size} px, fine-tuned {journey.run_dir} at {journey.model.img_size} px")
    return vilscale(["eval", str(journey.run_dir)])


def _detection(args, started: float) -> int:
    """prepare digits-coco -> train the detection job -> report -> eval -> predict on the first val canvases; the
    last line printed says where the pictures are."""
    import shutil

    from vilscale.cli import main as vilscale
    from vilscale.errors import EXIT_SPEC_ERROR
    from vilscale.orchestration.config import SpecError, load_spec

    data = Path(args.detection_data)
    data_sets = [f"data.{split}_{what}={data / split / ('annotations.json' if what == 'annotations' else 'images')}"
                 for split in ("train", "val") for what in ("annotations", "images")]
    if args.max_steps:
        data_sets.append(f"train.max_steps={args.max_steps}")
    try:
        spec = load_spec(args.detection_job, data_sets)
    except SpecError as error:  # found before anything is written
        print(f"vilscale demo: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    if not (data / "train" / "annotations.json").is_file() or not (data / "val" / "annotations.json").is_file():
        code = vilscale(["prepare", "digits-coco", str(data)])
        if code:
            return code
    run_dir = Path(spec.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    for command in (["train", args.detection_job, "--nproc", str(args.nproc), *_sets(data_sets)],
                    ["report", str(run_dir)], ["eval", str(run_dir)]):
        code = vilscale(command)
        if code:
            return code
    val_images = sorted((data / "val" / "images").iterdir())[:4]
    pictures = run_dir / "pictures"
    code = vilscale(["predict", str(run_dir), *map(str, val_images), "--out", str(pictures)])
    if code:
        return code
    print(f"detection demo finished in {time.perf_counter() - started:.0f} s; run dir {run_dir}, plots and a grid "
          f"of val predictions in {run_dir / 'report'}; pictures of predictions in {pictures}")
    return 0


def _sets(assignments: list[str]) -> list[str]:
    return [item for assignment in assignments for item in ("--set", assignment)]
