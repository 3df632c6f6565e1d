"""`vilscale prepare {imagefolder,imagenet21k,digits}`: write FFCV shards and their manifest.json.

    vilscale prepare imagefolder /data/imagenet/train /shards/in1k/train
    vilscale prepare imagefolder /data/imagenet/val /shards/in1k/val --classes /shards/in1k/train/manifest.json
    vilscale prepare imagenet21k /data/imagenet21k /shards/in21k --shard-size-mb 512 --max-side 320
    vilscale prepare imagenet21k /data/imagenet21k /shards/in21k-p --processed   # -> /shards/in21k-p/{train,val}
    vilscale prepare digits /shards/digits          # -> /shards/digits/{train,val}/manifest.json
    vilscale prepare digits-coco data/digits_coco   # -> data/digits_coco/{train,val}/annotations.json + images/
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

UNUSABLE_PATH = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS)
"""What creating OUT meets when the path is wrong for it (under a file, read-only): the user's to change."""


def _common_options(parser: argparse.ArgumentParser, *, max_side: int, compress: float, page_mb: int) -> None:
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--num-shards", type=int, default=None, help="number of shards (equal sample counts)")
    count.add_argument("--shard-size-mb", type=float, default=None,
                       help="approximate shard size in MB, from the source sizes (default: 256)")
    parser.add_argument("--max-side", type=int, default=max_side,
                        help=f"resize images whose longer side exceeds this; 0 keeps them (default: {max_side})")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored images (default: 90)")
    parser.add_argument("--compress-probability", type=float, default=compress,
                        help=f"fraction of images stored as JPEG, the rest raw (default: {compress})")
    parser.add_argument("--page-size-mb", type=int, default=page_mb,
                        help=f"FFCV page size in MiB, a power of two >= 2 (default: {page_mb})")
    parser.add_argument("--workers", type=int, default=0, help="parallel writer processes (default: one per core)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete shards of another source or other settings found in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when "
                        "stderr is not a terminal)")


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Re-running the same command after an interruption keeps the finished shards (verified by "
                     "checksum) and writes only the rest.")
    sources = parser.add_subparsers(dest="source_kind", metavar="SOURCE", required=True)
    folder = sources.add_parser("imagefolder", help="one folder per class (ImageNet-1K train/ or val/)")
    folder.add_argument("src", metavar="SRC", help="folder with one sub-folder of images per class")
    folder.add_argument("out", metavar="OUT", help="output folder for the shards and manifest.json")
    folder.add_argument("--classes", default=None, metavar="FILE",
                        help="class list (one name per line, or a manifest.json) fixing the class indices")
    _common_options(folder, max_side=512, compress=1.0, page_mb=8)
    in21k = sources.add_parser("imagenet21k", help="per-synset tar files (n01440764.tar) or per-synset folders")
    in21k.add_argument("src", metavar="SRC", help="folder with the per-synset tar files or folders")
    in21k.add_argument("out", metavar="OUT", help="output folder for the shards and manifest.json")
    in21k.add_argument("--classes", default=None, metavar="FILE",
                       help="class list (one synset per line, or a manifest.json) fixing the class indices")
    in21k.add_argument("--processed", action="store_true",
                       help="ImageNet-21K-P (Ridnik et al. 2021): --min-images-per-class 500 --val-per-class 50 "
                            "unless given; writes OUT/train and OUT/val")
    in21k.add_argument("--min-images-per-class", type=int, default=None, metavar="N",
                       help="drop every class with N or fewer images, listed in the manifest under dropped_classes "
                            "(the paper: 500; default: keep all, or 500 with --processed)")
    in21k.add_argument("--val-per-class", type=int, default=None, metavar="K",
                       help="hold out K images of every kept class (seeded by --seed) in OUT/val, the rest in "
                            "OUT/train, one class list in both (the paper: 50; default: none, or 50 with --processed)")
    _common_options(in21k, max_side=512, compress=1.0, page_mb=8)
    digits = sources.add_parser("digits", help="scikit-learn's handwritten digits (the quickstart data)")
    digits.add_argument("out", metavar="OUT", help="output folder; writes OUT/train and OUT/val")
    digits.add_argument("--side", type=int, default=32, help="image side after upscaling (default: 32)")
    digits.add_argument("--num-shards", type=int, default=4, help="shards per split (default: 4)")
    digits.add_argument("--workers", type=int, default=0, help="parallel writer processes (default: one per core)")
    digits.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default: 0)")
    digits.add_argument("--overwrite", action="store_true", help="delete shards of other settings found in OUT")
    digits.add_argument("--no-progress", action="store_true", help="no progress bar")
    coco = sources.add_parser("digits-coco", help="COCO-format detection data: canvases of several handwritten "
                              "digits at random positions and scales, boxes and masks from the strokes")
    coco.add_argument("out", metavar="OUT", help="output folder; writes OUT/{train,val}/annotations.json and "
                      "OUT/{train,val}/images/")
    coco.add_argument("--canvas", type=int, default=96, help="canvas side in pixels (default: 96)")
    coco.add_argument("--train-images", type=int, default=600, help="training canvases (default: 600)")
    coco.add_argument("--val-images", type=int, default=120, help="validation canvases (default: 120)")
    coco.add_argument("--seed", type=int, default=0, help="seed of the placements (default: 0)")
    coco.add_argument("--train-digits-per-class", type=int, default=None, metavar="N",
                      help="draw the training canvases from only N handwritten digits of each class (a small "
                      "labelled set; the validation canvases keep every validation digit); default: all")


def run(args: argparse.Namespace) -> int:
    from vilscale.data.manifest import DataError
    from vilscale.data.writer import (
        WriterSettings,
        prepare,
        prepare_digits,
        scan_imagefolder,
        scan_imagenet21k,
        split_imagenet21k,
        summarize_skipped,
    )
    from vilscale.errors import EXIT_SPEC_ERROR

    if args.source_kind == "digits-coco":
        return _prepare_digits_coco(args)
    progress = False if args.no_progress else None
    try:
        if args.source_kind == "digits":
            manifests = prepare_digits(args.out, side=args.side, num_shards=args.num_shards, seed=args.seed,
                                       workers=args.workers, overwrite=args.overwrite, progress=progress)
        else:
            settings = WriterSettings(max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                                      compress_probability=args.compress_probability,
                                      page_size=args.page_size_mb << 20, seed=args.seed)
            if args.source_kind == "imagefolder":
                splits = {args.out: scan_imagefolder(args.src, args.classes)}
            else:
                splits = _imagenet21k_splits(args, scan_imagenet21k(args.src, args.classes, workers=args.workers or 8),
                                             split_imagenet21k)
            manifests = [prepare(plan, out, num_shards=shards, shard_size_mb=args.shard_size_mb, settings=settings,
                                 workers=args.workers, overwrite=args.overwrite, progress=progress)
                         for out, (plan, shards) in _shard_counts(splits, args.num_shards).items()]
    except DataError as error:
        print(f"vilscale prepare: error: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    except OSError as error:
        if error.errno not in UNUSABLE_PATH:
            raise
        print(f"vilscale prepare: error: {args.out} cannot be written here ({error}); give another OUT folder",
              file=sys.stderr)
        return EXIT_SPEC_ERROR
    for manifest in manifests:
        if manifest.dropped_classes:
            rule = manifest.writer["processing"]
            print(f"{manifest.path}: {manifest.num_classes} classes kept, {len(manifest.dropped_classes)} dropped "
                  f"(--min-images-per-class {rule['min_images_per_class']}: listed under dropped_classes); "
                  f"{rule['val_per_class']} image(s) of every class held out for validation", file=sys.stderr)
        if manifest.skipped:
            print(f"{manifest.path}: skipped {len(manifest.skipped)} unreadable image(s) or damaged tar(s):\n"
                  f"{summarize_skipped(list(manifest.skipped))}", file=sys.stderr)
        if manifest.empty_classes:
            names = ", ".join(manifest.empty_classes[:10]) + (" ..." if len(manifest.empty_classes) > 10 else "")
            print(f"{manifest.path}: {len(manifest.empty_classes)} class folder(s) hold no image (they keep their "
                  f"class index): {names}", file=sys.stderr)
        if manifest.ignored:
            print(f"{manifest.path}: ignored {len(manifest.ignored)} file(s) that are not images:\n"
                  f"{summarize_skipped(list(manifest.ignored))}", file=sys.stderr)
    return 0


def _imagenet21k_splits(args: argparse.Namespace, plan, split) -> dict:
    """{OUT folder: plan}: OUT itself, or OUT/train and OUT/val when images are held out for validation."""
    minimum, val = args.min_images_per_class, args.val_per_class
    if args.processed:
        from vilscale.data.writer import PAPER_MIN_IMAGES_PER_CLASS, PAPER_VAL_PER_CLASS

        minimum = PAPER_MIN_IMAGES_PER_CLASS if minimum is None else minimum
        val = PAPER_VAL_PER_CLASS if val is None else val
    if minimum is None and not val:
        return {args.out: plan}
    train, held_out = split(plan, min_images_per_class=minimum, val_per_class=val or 0, seed=args.seed)
    if held_out is None:
        return {args.out: train}
    return {os.path.join(args.out, "train"): train, os.path.join(args.out, "val"): held_out}


def _shard_counts(splits: dict, num_shards: int | None) -> dict:
    """{OUT: (plan, --num-shards)}: with several splits, --num-shards is the first's and the others get a share
    in proportion to their samples."""
    first = len(next(iter(splits.values())).refs)
    return {out: (plan, None if num_shards is None else max(1, round(num_shards * len(plan.refs) / first)))
            for out, plan in splits.items()}


def _prepare_digits_coco(args: argparse.Namespace) -> int:
    from vilscale.data.coco import DigitsCocoSettings, write_digits_coco
    from vilscale.errors import EXIT_SPEC_ERROR

    if args.canvas < 48 or args.train_images < 1 or args.val_images < 1:
        print("vilscale prepare digits-coco: error: --canvas must be >= 48 and --train-images/--val-images >= 1",
              file=sys.stderr)
        return EXIT_SPEC_ERROR
    if args.train_digits_per_class is not None and args.train_digits_per_class < 1:
        print(f"vilscale prepare digits-coco: error: --train-digits-per-class {args.train_digits_per_class} must be "
              ">= 1 (leave it out to draw from every training digit)", file=sys.stderr)
        return EXIT_SPEC_ERROR
    settings = DigitsCocoSettings(canvas=args.canvas, train_images=args.train_images, val_images=args.val_images,
                                  seed=args.seed, train_digits_per_class=args.train_digits_per_class)
    try:
        written = write_digits_coco(args.out, settings)
    except OSError as error:
        if error.errno not in UNUSABLE_PATH:
            raise
        print(f"vilscale prepare digits-coco: error: {args.out} cannot be written here ({error}); give another OUT "
              "folder", file=sys.stderr)
        return EXIT_SPEC_ERROR
    for split, path in written.items():
        print(f"{split}: {path} and {path.parent / 'images'}")
    return 0
