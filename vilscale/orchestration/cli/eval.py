"""`vilscale eval RUN_DIR [--weights FILE.safetensors] [--tag TAG] [--ema | --live] [--precision P]`:
the task's evaluation on the run's validation split, every sample once: top-1/top-5 (classification), or COCO
box AP (and mask AP for Mask R-CNN) with the predictions written to RUN_DIR/eval/bbox.json (segm.json).

By default it evaluates what the trainer's own evaluation did: the EMA weights when the run keeps an
EMA and ``eval.use_ema``, in the run's training precision (a bf16 run is evaluated in bf16) and in the
ViL attention mode the run had reached at that checkpoint (full attention once the schedule switched
from random shifts), so the two report the same accuracy for the same checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(parser) -> None:
    parser.add_argument("run_dir", help="run directory (its spec.yaml says the model and the data)")
    parser.add_argument("--weights", default=None, help="exported .safetensors to evaluate instead of a checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest verified one)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    which.add_argument("--live", action="store_true", help="evaluate the live (non-EMA) weights")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="compute precision (default: the run's train.precision, as the trainer evaluates)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run's spec, e.g. --set data.val_manifest=other.json")


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


def run(args) -> int:

    from vilscale.devices import resolve_device
    from vilscale.orchestration.checkpoint import CheckpointError
    from vilscale.orchestration.checkpoint.consolidate import consolidated_state_dict
    from vilscale.orchestration.checkpoint.rundir import stored_spec
    from vilscale.orchestration.config import SpecError, apply_override, spec_from_dict
    from vilscale.orchestration.training.distributed import RankContext
    from vilscale.orchestration.training.engine import COMPUTE_DTYPES, build_model, settle_attention_backend
    from vilscale.tasks import make_task

    run_dir = Path(args.run_dir)
    try:
        raw = stored_spec(run_dir)
        if raw is None:
            raise SpecError(f"{run_dir} has no spec.yaml; give the run_dir of a job")
        raw.setdefault("model", {})["init_weights"] = ""  # the checkpoint's weights are what is evaluated
        for assignment in args.overrides:
            apply_override(raw, assignment)
        spec = spec_from_dict(raw)
        task = make_task(spec)
        if spec.task == "classification" and not spec.data.val_manifest:
            raise SpecError("data.val_manifest is empty; set it with --set data.val_manifest=PATH")
        if spec.task == "detection" and not (spec.data.val_annotations and spec.data.val_images):
            raise SpecError("data.val_annotations/val_images are empty; set them with --set data.val_annotations=PATH "
                            "--set data.val_images=DIR")
        use_ema = args.ema or (not args.live and not args.weights and spec.optim.ema_decay > 0 and spec.eval.use_ema)
        if args.weights:
            from safetensors.torch import load_file

            state, source, tag = load_file(args.weights), args.weights, args.tag
        else:
            state, manifest = consolidated_state_dict(run_dir, zero_stage=spec.train.zero_stage, tag=args.tag,
                                                      ema=use_ema)
            source, tag = f"{manifest['tag']} ({'EMA' if use_ema else 'live'} weights)", manifest["tag"]
        device = resolve_device(spec.train.device)
        model = build_model(spec)
        model.load_state_dict(state)
        _attention_mode_of_the_run(model, run_dir, tag)
        precision = args.precision or spec.train.precision
        settle_attention_backend(model, spec, device, precision=precision,
                                 log=lambda line: print(line, file=sys.stderr))
    except (SpecError, CheckpointError, OSError, ValueError) as error:
        print(f"vilscale eval: {error}", file=sys.stderr)
        return 2 if isinstance(error, SpecError | ValueError) else 1
    model.to(device=device, dtype=COMPUTE_DTYPES[precision])
    ctx = RankContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device)
    result = task.evaluate(model, task.val_loader(ctx), ctx, out_dir=run_dir / "eval")
    result.update(weights=source, precision=precision, shift_mode=model.shift_mode)
    print(json.dumps(result))
    for line in task.report(result):
        print(line)
    return 0
