"""`vilscale export RUN_DIR OUT.safetensors`: consolidated weights for `create_model(...).load_state_dict`."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(parser) -> None:
    parser.add_argument("run_dir", help="run directory (the job's run_dir)")
    parser.add_argument("out", help="output file, e.g. vil_small.safetensors")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest verified one)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the live ones")


def run(args) -> int:
    from safetensors.torch import save_file

    from vilscale.orchestration.checkpoint import CheckpointError
    from vilscale.orchestration.checkpoint.consolidate import consolidated_state_dict
    from vilscale.orchestration.checkpoint.rundir import RunDirError, load_run_spec

    try:
        spec = load_run_spec(Path(args.run_dir))
        state, manifest = consolidated_state_dict(Path(args.run_dir), zero_stage=spec.train.zero_stage, tag=args.tag,
                                                  ema=args.ema)
    except (CheckpointError, RunDirError) as error:
        print(f"vilscale export: {error}", file=sys.stderr)
        return 2 if isinstance(error, RunDirError) else 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    metadata = {"model": spec.model.name, "step": str(manifest["step"]), "tag": manifest["tag"],
                "img_size": str(spec.model.img_size), "num_classes": str(spec.model.num_classes),
                "pos_embed": spec.model.pos_embed, "window_mode": spec.model.window_mode,
                "window": str(spec.model.window)}
    save_file(state, str(temporary), metadata=metadata)
    temporary.replace(out)
    print(f"exported {len(state)} tensors of {spec.model.name} at step {manifest['step']} to {out}")
    return 0
