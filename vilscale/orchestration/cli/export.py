"""`vilscale export RUN_DIR OUT.safetensors`: consolidated weights for `create_model(...).load_state_dict`.

The file's metadata says what the weights are: the model and its shape keys, the step and tag, and (for a
classifier) ``classes``, the training manifest's class list as JSON, which `vilscale eval` compares with the
validation data it is given.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CLASSES = "classes"
"""Metadata key of the training class list (a JSON list of names, index = label)."""


def add_parser(parser) -> None:
    parser.add_argument("run_dir", help="run directory (the job's run_dir)")
    parser.add_argument("out", help="output file, e.g. vil_small.safetensors")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest verified one)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the live ones")


def training_classes(spec) -> list[str] | None:
    """The class list a classification spec trains on (its training manifest's), None when unknown here."""
    from vilscale.data.manifest import DataError, load_manifest

    if spec.task != "classification" or not spec.data.train_manifest:
        return None
    try:
        return list(load_manifest(spec.data.train_manifest).classes)
    except (DataError, OSError):
        return None  # the shards moved since training: the export still says its class count


def export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file ({} when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def _check_writable(out: Path) -> None:
    """SpecError (the user's to fix) when ``out`` cannot become a file here: a directory, under a file, read-only."""
    from vilscale.orchestration.config import SpecError

    if out.is_dir():
        raise SpecError(f"{out} is a directory; give the path of the file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SpecError(f"cannot write {out}: {out.parent} is a file; give another path") from None
    except OSError as error:
        raise SpecError(f"cannot write {out}: {error.strerror}; give another path") from None
    if not os.access(out.parent, os.W_OK):
        raise SpecError(f"cannot write {out}: {out.parent} is not writable; give another path")


def run(args) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from vilscale.errors import EXIT_FAILED, EXIT_SPEC_ERROR
    from vilscale.orchestration.checkpoint import CheckpointError
    from vilscale.orchestration.checkpoint.consolidate import consolidated_state_dict
    from vilscale.orchestration.checkpoint.rundir import load_run_spec
    from vilscale.orchestration.config import SpecError

    out = Path(args.out)
    try:
        spec = load_run_spec(Path(args.run_dir))
        _check_writable(out)  # before the consolidation, which may take minutes
        state, manifest = consolidated_state_dict(Path(args.run_dir), zero_stage=spec.train.zero_stage, tag=args.tag,
                                                  ema=args.ema)
        metadata = {"model": spec.model.name, "step": str(manifest["step"]), "tag": manifest["tag"],
                    "img_size": str(spec.model.img_size), "num_classes": str(spec.model.num_classes),
                    "pos_embed": spec.model.pos_embed, "window_mode": spec.model.window_mode,
                    "window": str(spec.model.window)}
        classes = training_classes(spec)
        if classes is not None:
            metadata[CLASSES] = json.dumps(classes)
        temporary = out.with_name(out.name + ".tmp")
        try:
            save_file(state, str(temporary), metadata=metadata)
            temporary.replace(out)
        except (OSError, SafetensorError) as error:  # a full disk, a lost mount: may pass on a retry
            temporary.unlink(missing_ok=True)
            raise CheckpointError(f"writing {out} failed: {error}") from None
    except (CheckpointError, SpecError) as error:
        print(f"vilscale export: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR if isinstance(error, SpecError) else EXIT_FAILED
    print(f"exported {len(state)} tensors of {spec.model.name} at step {manifest['step']} to {out}")
    return 0
