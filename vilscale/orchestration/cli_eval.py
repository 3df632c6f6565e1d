"""`vilscale eval RUN_DIR [--weights FILE.safetensors] [--tag TAG]`: top-1/top-5 on the run's
validation manifest, from the newest verified checkpoint or from exported weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vilscale.orchestration.checkpoint import CheckpointError
from vilscale.orchestration.spec import SpecError, apply_override, spec_from_dict


def add_parser(parser) -> None:
    parser.add_argument("run_dir", help="run directory (its spec.yaml says the model and the data)")
    parser.add_argument("--weights", default=None, help="exported .safetensors to evaluate instead of a checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest verified one)")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run's spec, e.g. --set data.val_manifest=other.json")


def run(args) -> int:
    import torch
    import yaml

    from vilscale.orchestration.consolidate import consolidated_state_dict
    from vilscale.orchestration.engine import RankContext, build_model, resolve_device
    from vilscale.orchestration.evaluation import evaluate, validation_loader

    run_dir = Path(args.run_dir)
    try:
        raw = yaml.safe_load((run_dir / "spec.yaml").read_text()) if (run_dir / "spec.yaml").is_file() else None
        if raw is None:
            raise SpecError(f"{run_dir} has no spec.yaml; give the run_dir of a job")
        for assignment in args.overrides:
            apply_override(raw, assignment)
        spec = spec_from_dict(raw)
        if not spec.data.val_manifest:
            raise SpecError("data.val_manifest is empty; set it with --set data.val_manifest=PATH")
        if args.weights:
            from safetensors.torch import load_file

            state = load_file(args.weights)
        else:
            state, _ = consolidated_state_dict(run_dir, zero_stage=spec.train.zero_stage, tag=args.tag, ema=args.ema)
    except (SpecError, CheckpointError, OSError) as error:
        print(f"vilscale eval: {error}", file=sys.stderr)
        return 2 if isinstance(error, SpecError) else 1
    model = build_model(spec)
    model.load_state_dict(state)
    device = torch.device(resolve_device(spec))
    model.to(device)
    ctx = RankContext(rank=0, world_size=1, local_rank=0, device=device)
    result = evaluate(model, validation_loader(spec, ctx), spec, ctx)
    print(json.dumps(result))
    print(f"val top-1: {100 * result['val_top1']:.1f}%")
    return 0
