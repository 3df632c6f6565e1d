"""`vilscale eval RUN_DIR` or `vilscale eval JOB.yaml --weights W`: the task's evaluation on a validation split,
every sample once: top-1/top-5 (classification), or COCO box AP (and mask AP for Mask R-CNN) with the
predictions written in COCO's results format to ``--out`` (default for a run: RUN_DIR/eval/bbox.json, segm.json).

Given a run dir, it evaluates what the trainer's own evaluation did: the EMA weights when the run keeps an
EMA and ``eval.use_ema``, in the run's training precision (a bf16 run is evaluated in bf16) and in the
ViL attention mode the run had reached at that checkpoint (full attention once the schedule switched
from random shifts), so the two report the same accuracy for the same checkpoint.

Given a job spec, the spec (with ``--set``) says the model and the validation data, and ``--weights`` what is
evaluated: a vilscale export, an official ViL checkpoint or a run dir (its newest verified checkpoint, read as
above). Nothing is written but ``--out``. Before anything runs, the weights' class list (an export's metadata,
a run's training manifest, or just the head's size) is compared with the validation manifest's: another
count, or the same names in another order, would score the wrong labels, and is refused. Weights that do not
fit the model are refused naming the first weights and shapes that differ and the keys to set.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path


def add_parser(parser) -> None:
    parser.add_argument("target", metavar="RUN_DIR|JOB.yaml",
                        help="a run directory (its spec.yaml says the model and the data), or a job spec (YAML) "
                             "whose model and validation data evaluate --weights; no run dir is made")
    add_weights_arguments(parser, verb="evaluate")
    parser.add_argument("--out", default=None,
                        help="folder for predictions (detection: bbox.json, segm.json; segmentation: iou.json and "
                             "predictions/*.png); default: RUN_DIR/eval for "
                             "a run dir, none for a job spec")


def add_weights_arguments(parser, *, verb: str) -> None:
    """Which weights and how they compute, as `vilscale eval` and `vilscale predict` both choose them: --weights,
    --tag, --ema/--live, --precision, and --set for the spec."""
    parser.add_argument("--weights", default=None,
                        help=f"what to {verb} with (required with a job spec): a vilscale export (.safetensors), an "
                             "official ViL checkpoint (.pth) or a run directory (its newest verified checkpoint)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest verified one)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    which.add_argument("--live", action="store_true", help="the live (non-EMA) weights")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="compute precision (default: the spec's train.precision, as the trainer evaluates)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the spec, e.g. --set data.val_manifest=other.json")


@dataclass
class Weights:
    """A state dict to evaluate and what is known of it."""

    state: dict
    source: str
    """What the weights are, for the output and the error lines."""
    classes: list[str] | None = None
    """The class list they were trained on, where known (an export's metadata, a run's training manifest)."""
    metadata: dict | None = None
    """An export's metadata: the model keys it was made with, for the fix an error names."""
    run_dir: Path | None = None
    tag: str | None = None
    """The run and checkpoint they come from (for the run's attention mode)."""


def _attention_mode_of_the_run(model, run_dir: Path, tag: str | None) -> None:
    """Put ``model`` in the attention mode the run had at ``tag`` (an export: at the newest checkpoint)."""
    from vilscale.orchestration.checkpoint import Checkpointer
    from vilscale.orchestration.checkpoint.consolidate import saved_train_state

    if tag is None:
        tags = Checkpointer(run_dir, keep=1 << 30, spec_digest="").complete_tags()
        if not tags:
            return
        tag = tags[-1]
    mode = saved_train_state(run_dir, tag).get("shift_mode")
    if mode and model.shift_mode != mode:
        model.set_shift_mode(mode)
        print(f"ViL attention: {mode!r}, as the run's training had switched to by {tag}", file=sys.stderr)


def _spec(args):
    """(spec, run dir or None): the run's stored spec, or the job spec, with ``--set`` applied and no initial
    weights (what is evaluated comes from the checkpoint or ``--weights``)."""
    from vilscale.orchestration.checkpoint.rundir import stored_spec
    from vilscale.orchestration.config import SpecError, apply_override, load_spec, spec_from_dict

    target = Path(args.target)
    if target.is_dir():
        raw = stored_spec(target)
        if raw is None:
            raise SpecError(f"{target} has no spec.yaml; give the run_dir of a job, or a job spec with --weights")
        raw.setdefault("model", {})["init_weights"] = ""
        for assignment in args.overrides:
            apply_override(raw, assignment)
        return spec_from_dict(raw), target
    if not target.exists():
        raise SpecError(f"{target} does not exist; give a run dir, or a job spec (YAML) with --weights")
    if not args.weights:
        raise SpecError(f"{target} is a job spec: give the weights to evaluate with --weights (a vilscale export, "
                        "an official .pth or a run dir)")
    return load_spec(target, ["model.init_weights=", *args.overrides]), None


def _checkpoint_weights(run_dir: Path, args) -> Weights:
    """The newest verified (or ``--tag``) checkpoint of a run: its EMA when the run keeps one and evaluates it."""
    from vilscale.orchestration.checkpoint.consolidate import consolidated_state_dict
    from vilscale.orchestration.checkpoint.rundir import load_run_spec
    from vilscale.orchestration.cli.export import training_classes

    run_spec = load_run_spec(run_dir)
    use_ema = args.ema or (not args.live and run_spec.optim.ema_decay > 0 and run_spec.eval.use_ema)
    state, manifest = consolidated_state_dict(run_dir, zero_stage=run_spec.train.zero_stage, tag=args.tag,
                                              ema=use_ema)
    return Weights(state, f"{run_dir} {manifest['tag']} ({'EMA' if use_ema else 'live'} weights)",
                   classes=training_classes(run_spec), run_dir=run_dir, tag=manifest["tag"])


def _weights(args, run_dir: Path | None, model) -> Weights:
    from vilscale.orchestration.cli.export import CLASSES, export_metadata
    from vilscale.orchestration.config import SpecError
    from vilscale.orchestration.training.init_weights import read_initial_weights

    if args.weights is None:
        return _checkpoint_weights(run_dir, args)
    path = Path(args.weights).expanduser()
    if path.is_dir():
        return _checkpoint_weights(path, args)
    if args.ema or args.live or (args.tag and run_dir is None):
        raise SpecError(f"--ema, --live and --tag choose a run's checkpoint; --weights={args.weights!r} is a file, "
                        "evaluated as it is")
    state, described = read_initial_weights(args.weights, model, key="--weights")
    # a file evaluated in a run dir: the run still says the attention mode (at --tag, or its newest checkpoint)
    weights = Weights(state, described, run_dir=run_dir, tag=args.tag)
    if path.suffix == ".safetensors":
        weights.metadata = export_metadata(path)
        if CLASSES in weights.metadata:
            weights.classes = json.loads(weights.metadata[CLASSES])
    return weights


def _check_classes(spec, weights: Weights) -> None:
    """SpecError when the validation manifest's classes are not the weights' (count, or names and order)."""
    from vilscale.data.manifest import DataError, load_manifest
    from vilscale.orchestration.config import SpecError

    if spec.task != "classification":
        return  # detection: the task's own check compares the annotation files' categories
    try:
        val = load_manifest(spec.data.val_manifest)
    except (DataError, OSError) as error:
        raise SpecError(f"data.val_manifest={spec.data.val_manifest!r}: {error}") from None
    head = weights.state.get("head.weight")
    count = len(weights.classes) if weights.classes is not None else (None if head is None else head.shape[0])
    where = f"data.val_manifest={str(spec.data.val_manifest)!r}"
    if count is not None and count != val.num_classes:
        raise SpecError(f"the weights ({weights.source}) have {count} classes but {where} has {val.num_classes} "
                        "classes, so top-1 would count the wrong labels; evaluate on shards of the weights' class "
                        "list (`vilscale prepare imagefolder VAL_DIR OUT --classes TRAIN_MANIFEST`)")
    if weights.classes is not None and tuple(weights.classes) != val.classes:
        first = next(i for i, (a, b) in enumerate(zip(weights.classes, val.classes)) if a != b)
        what = "the same classes in another order" if set(weights.classes) == set(val.classes) else "other classes"
        raise SpecError(f"the weights ({weights.source}) and {where} have {what} (index {first}: "
                        f"{weights.classes[first]!r} in the weights' training, {val.classes[first]!r} in validation), "
                        "so top-1 would count the wrong labels; write the validation shards with the training class "
                        "list (`vilscale prepare imagefolder VAL_DIR OUT --classes TRAIN_MANIFEST`)")


def _what_to_set(spec, weights: Weights) -> str:
    """`--set` assignments that would make the spec's model the one an export was made from."""
    made = weights.metadata or {}
    keys = ("name", "pos_embed", "window_mode", "window", "img_size", "num_classes")
    differ = [f"model.{key}={made[key if key != 'name' else 'model']}" for key in keys
              if made.get(key if key != "name" else "model") not in (None, str(getattr(spec.model, key)))]
    return f"; the export was made with {', '.join(differ)}: set those" if differ else ""


def _load(model, spec, weights: Weights) -> None:
    """Load the weights into the model, as they are (position tables may be interpolated, with a line saying so);
    SpecError naming the first weights and shapes that differ."""
    from vilscale.model import adapt_state_dict
    from vilscale.orchestration.config import SpecError

    fix = _what_to_set(spec, weights)
    if spec.task != "classification":  # a detector's weights load exactly, or not at all
        try:
            model.load_state_dict(weights.state)
        except RuntimeError as error:
            detail = " ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
            what = spec.model.detector if spec.task == "detection" else "Semantic FPN"
            raise SpecError(f"the weights ({weights.source}) do not fit the {what} model of "
                            f"{spec.model.name}: {detail[:400]}{fix}") from None
        return
    want, have = model.state_dict().get("head.weight"), weights.state.get("head.weight")
    if want is None:
        pass  # a model without a classifier: nothing to compare
    elif have is None:
        raise SpecError(f"the weights ({weights.source}) have no classifier head (head.weight): they are a backbone, "
                        "which has nothing to score; fine-tune it (model.init_weights) and evaluate that")
    elif have.shape[0] != want.shape[0]:
        raise SpecError(f"the weights ({weights.source}): head.weight has shape {tuple(have.shape)}, the model needs "
                        f"{tuple(want.shape)}; set model.num_classes={have.shape[0]}")
    try:
        fitted, report = adapt_state_dict(weights.state, model, head="replace")
        model.load_state_dict(fitted)
    except (ValueError, RuntimeError) as error:
        raise SpecError(f"the weights ({weights.source}) do not fit {spec.model.name} "
                        f"(pos_embed={spec.model.pos_embed}, img_size={spec.model.img_size}): "
                        f"{str(error).splitlines()[0]}{fix}") from None
    if report.interpolated:
        print(f"evaluating at img_size={spec.model.img_size}: {report.summary()}", file=sys.stderr)


def loaded_model(spec, run_dir: Path | None, args):
    """(model, weights, device, precision): the spec's model with what ``args`` choose (``--weights``, ``--tag``,
    ``--ema``/``--live``) loaded and checked, in the run's attention mode, its attention backend settled, placed on
    the device in the precision (``--precision``, else the spec's) as the task computes in it (``task.place``).
    Raises SpecError (the user's to fix), CheckpointError or OSError. `vilscale predict` loads its model the same
    way."""
    from vilscale.devices import resolve_device
    from vilscale.orchestration.training.engine import build_model, settle_attention_backend
    from vilscale.tasks import make_task

    device = resolve_device(spec.train.device)
    model = build_model(spec)
    weights = _weights(args, run_dir, model)
    _check_classes(spec, weights)
    _load(model, spec, weights)
    if weights.run_dir is not None:
        _attention_mode_of_the_run(model, weights.run_dir, weights.tag)
    precision = args.precision or spec.train.precision
    settle_attention_backend(model, spec, device, precision=precision, log=lambda line: print(line, file=sys.stderr))
    return make_task(spec).place(model, device, precision), weights, device, precision


def run(args) -> int:
    from vilscale.errors import EXIT_FAILED, EXIT_SPEC_ERROR
    from vilscale.orchestration.checkpoint import CheckpointError
    from vilscale.orchestration.config import SpecError
    from vilscale.orchestration.training.distributed import RankContext
    from vilscale.tasks import make_task

    try:
        spec, run_dir = _spec(args)
        task = make_task(spec)
        if spec.task == "classification" and not spec.data.val_manifest:
            raise SpecError("data.val_manifest is empty; set it with --set data.val_manifest=PATH")
        if spec.task == "detection" and not (spec.data.val_annotations and spec.data.val_images):
            raise SpecError("data.val_annotations/val_images are empty; set them with --set data.val_annotations=PATH "
                            "--set data.val_images=DIR")
        if spec.task == "segmentation" and not (spec.data.val_images and spec.data.val_masks):
            raise SpecError("data.val_images/val_masks are empty; set them with --set data.val_images=DIR "
                            "--set data.val_masks=DIR")
        if hasattr(task, "check_eval"):  # the validation data's own checks (segmentation: label maps)
            task.check_eval()
        model, weights, device, precision = loaded_model(spec, run_dir, args)
    except (SpecError, CheckpointError, OSError, ValueError) as error:
        # a checkpoint that cannot be read may be read again (exit 1); everything else is the user's to fix
        print(f"vilscale eval: {error}", file=sys.stderr)
        return EXIT_FAILED if isinstance(error, CheckpointError | OSError) else EXIT_SPEC_ERROR
    ctx = RankContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device)
    out_dir = Path(args.out) if args.out else (run_dir / "eval" if run_dir is not None else None)
    result = task.evaluate(model, task.val_loader(ctx), ctx, out_dir=out_dir)
    result.update(weights=weights.source, precision=precision, shift_mode=model.shift_mode)
    print(json.dumps(result))
    for line in task.report(result):
        print(line)
    return 0
