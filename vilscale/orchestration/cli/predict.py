"""`vilscale predict RUN_DIR IMAGE... --out DIR` (or ``JOB.yaml --weights W``): one PNG per image with the
model's predictions drawn on it, at the image's own size: boxes, category names and scores (detection), instance
masks too (Mask R-CNN), the class map (segmentation), the top-5 classes (classification); and
``DIR/predictions.json``, what each picture shows. The weights are chosen as `vilscale eval` chooses them
(``--weights``, ``--tag``, ``--ema``/``--live``) and read in the same attention mode and precision; images are
read as the task's evaluation reads them (`vilscale.tasks.pictures`).

Bad input (a missing or unreadable image, a run without a checkpoint, ``--out`` that is a file) is one line and
exit code 2, before anything is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(parser) -> None:
    from vilscale.orchestration.cli.eval import add_weights_arguments
    from vilscale.tasks.pictures import DEFAULT_SCORE_THRESHOLD

    parser.add_argument("target", metavar="RUN_DIR|JOB.yaml",
                        help="a run directory, or a job spec (YAML) whose model draws --weights' predictions")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything PIL reads)")
    parser.add_argument("--out", required=True,
                        help="folder for the pictures (IMAGE's name, .png) and predictions.json")
    parser.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                        help=f"detection: draw boxes scoring at least this (default {DEFAULT_SCORE_THRESHOLD})")
    add_weights_arguments(parser, verb="predict")


def class_names(task, weights) -> list[str]:
    """Names by label: a detector's are the run's annotation categories after the background (label 0), a
    classifier's the training manifest's (or an export's metadata); numbers where they are unknown."""
    spec = task.spec
    if spec.task == "detection":
        try:
            return ["background", *(name for _, name in task.categories())]
        except (OSError, ValueError):
            return [str(label) for label in range(spec.model.num_classes + 1)]
    if weights is not None and weights.classes:
        return list(weights.classes)
    names = getattr(task, "class_names", None)
    if callable(names):
        return list(names())
    return [str(label) for label in range(spec.model.num_classes)]


def load_predictor(spec, run_dir: Path | None, args, *, score_threshold: float):
    """The task's `Predictor` with the weights ``args`` choose, as `vilscale eval` loads them."""
    from vilscale.orchestration.cli.eval import loaded_model
    from vilscale.tasks import make_task
    from vilscale.tasks.pictures import Predictor

    task = make_task(spec)
    if run_dir is not None and args.weights is None:
        _require_checkpoint(run_dir)
    model, weights, device, _ = loaded_model(spec, run_dir, args)
    return Predictor(task, model, names=class_names(task, weights), device=device, score_threshold=score_threshold)


def _require_checkpoint(run_dir: Path) -> None:
    from vilscale.orchestration.checkpoint import Checkpointer
    from vilscale.orchestration.config import SpecError

    if not Checkpointer(run_dir, keep=1 << 30, spec_digest="").complete_tags():
        raise SpecError(f"{run_dir} has no checkpoint yet, so no weights to predict with; train it "
                        "(`vilscale train`) or give --weights")


def _picture_names(paths: list[Path]) -> list[str]:
    """IMAGE's stem + .png, numbered where two images share a stem."""
    names, seen = [], {}
    for path in paths:
        name = f"{path.stem}.png"
        if name in seen:
            seen[name] += 1
            name = f"{path.stem}_{seen[name]}.png"
        seen.setdefault(name, 0)
        names.append(name)
    return names


def run(args) -> int:
    from vilscale.errors import EXIT_FAILED, EXIT_SPEC_ERROR
    from vilscale.orchestration.checkpoint import CheckpointError
    from vilscale.orchestration.cli.eval import _spec
    from vilscale.orchestration.config import SpecError
    from vilscale.tasks.pictures import read_image

    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise SpecError(f"--out={args.out} is a file; give a folder for the pictures")
        if not 0 <= args.score_threshold <= 1:
            raise SpecError(f"--score-threshold={args.score_threshold} is not a score; give one in [0, 1]")
        paths = [Path(image) for image in args.images]
        images = [read_image(path) for path in paths]  # every image is readable before anything is written
        spec, run_dir = _spec(args)
        predictor = load_predictor(spec, run_dir, args, score_threshold=args.score_threshold)
    except (SpecError, CheckpointError, OSError, ValueError) as error:
        print(f"vilscale predict: {error}", file=sys.stderr)
        return EXIT_FAILED if isinstance(error, CheckpointError | OSError) else EXIT_SPEC_ERROR
    from torchvision.io import write_png

    shown = {}
    pictures = []
    for name, image in zip(_picture_names(paths), images):
        picture, shown[name] = predictor.draw(image, predictor.predict(image))
        pictures.append((name, picture))
    out.mkdir(parents=True, exist_ok=True)
    for name, picture in pictures:
        write_png(picture, str(out / name))
        print(f"{out / name}: {_summary(shown[name])}")
    (out / "predictions.json").write_text(json.dumps(shown, indent=1))
    return 0


def _summary(shown) -> str:
    if isinstance(shown, dict):  # segmentation: class -> share of the pixels
        return ", ".join(f"{name} {100 * share:.0f}%" for name, share in sorted(shown.items(), key=lambda i: -i[1])[:5])
    if shown and "box" in shown[0]:
        return f"{len(shown)} box(es): " + ", ".join(f"{item['label']} {item['score']:.2f}" for item in shown[:8])
    if not shown:
        return "nothing above the score threshold"
    return ", ".join(f"{item['label']} {100 * item['probability']:.1f}%" for item in shown)


# ----------------------------------------------------------------------------------------------------
# the report's grid of validation predictions
# ----------------------------------------------------------------------------------------------------

def validation_grid(run_dir: Path, out: Path, *, count: int | None = None) -> Path:
    """``out/predictions.png``: the run's newest checkpoint's predictions on the first ``count`` validation images
    (detection: the val annotations' first images by id; classification: the validation loader's first batch),
    in a grid. Raises SpecError/CheckpointError/OSError/ValueError when the run cannot predict."""
    import argparse

    from torchvision.io import write_png

    from vilscale.orchestration.checkpoint.rundir import load_run_spec
    from vilscale.orchestration.config import SpecError
    from vilscale.tasks.pictures import GRID_IMAGES, GRID_TILE, grid

    count = count or GRID_IMAGES
    spec = load_run_spec(run_dir)
    args = argparse.Namespace(weights=None, tag=None, ema=False, live=False, precision=None)
    predictor = load_predictor(spec, run_dir, args, score_threshold=0.3)
    images, preprocessed = _validation_images(predictor.task, count)
    if not images:
        raise SpecError(f"{run_dir}'s spec names no validation images")
    pictures = []
    for image in images:
        picture, _ = predictor.draw(image, predictor.predict(image, preprocessed=preprocessed),
                                    scale=GRID_TILE / max(image.shape[-2:]))
        pictures.append(picture)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.png"
    write_png(grid(pictures), str(path))
    return path


def _validation_images(task, count: int):
    """(images, already the evaluation's crop?)"""
    spec = task.spec
    if spec.task == "classification":
        import torch

        from vilscale.orchestration.training.distributed import RankContext

        loader = task.val_loader(RankContext(rank=0, world_size=1, local_rank=0, local_world_size=1,
                                             device=torch.device("cpu")), batch_size=count)
        if loader is None:
            return [], True
        images, _ = next(iter(loader))
        return list(images.cpu()), True
    if spec.task == "detection":
        from vilscale.data.coco import read_coco_json
        from vilscale.tasks.pictures import read_image

        if not spec.data.val_annotations:
            return [], False
        content = read_coco_json(spec.data.val_annotations)
        first = sorted(content["images"], key=lambda image: image["id"])[:count]
        return [read_image(Path(spec.data.val_images) / image["file_name"]) for image in first], False
    images = getattr(task, "validation_images", None)  # segmentation: the task module's (its val folder)
    if images is None:
        from vilscale.orchestration.config import SpecError

        raise SpecError(f"task={spec.task}: its task module has no validation_images(count) yet")
    return list(images(count)), False
