"""Full fp32 model weights from a run's checkpoint, whatever ZeRO stage and world size wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from vilscale.orchestration.checkpoint import MANIFEST, Checkpointer, CheckpointError
from vilscale.orchestration.spec import JobSpec, spec_from_dict


def load_run_spec(run_dir: Path) -> JobSpec:
    path = Path(run_dir) / "spec.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a vilscale run directory (no spec.yaml); give the run_dir of a job")
    return spec_from_dict(yaml.safe_load(path.read_text()))


def consolidated_state_dict(run_dir: Path, *, zero_stage: int, tag: str | None = None,
                            ema: bool = False) -> tuple[dict, dict]:
    """(fp32 state dict, manifest) of ``tag`` (default: the newest verified checkpoint)."""
    checkpointer = Checkpointer(Path(run_dir), keep=1 << 30, spec_digest="")
    if tag is None:
        manifest = checkpointer.find_resumable()
        if manifest is None:
            raise CheckpointError(f"{checkpointer.root} has no complete, verified checkpoint")
        tag = manifest["tag"]
    else:
        problem = checkpointer.verify(tag)
        if problem:
            raise CheckpointError(f"checkpoint {tag} is not usable: {problem}")
        manifest = json.loads((checkpointer.root / tag / MANIFEST).read_text()) | {"tag": tag}
    directory = checkpointer.root / tag
    if ema:
        client = torch.load(directory / "client_rank0.pt", map_location="cpu", weights_only=True)
        if not client.get("ema"):
            raise CheckpointError(f"checkpoint {tag} has no EMA weights (optim.ema_decay was 0)")
        state = client["ema"]
    elif zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpointer.root), tag=tag)
    else:
        model_file = directory / "mp_rank_00_model_states.pt"
        state = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    state = {key.removeprefix("_orig_mod."): value.float().contiguous() for key, value in state.items()}
    return state, manifest

