"""Full fp32 model weights from a run's checkpoint, whatever ZeRO stage and world size wrote it."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from vilscale.orchestration.checkpoint.store import EMA_FILE, MANIFEST, Checkpointer, CheckpointError


def consolidated_state_dict(run_dir: Path, *, zero_stage: int, tag: str | None = None,
                            ema: bool = False) -> tuple[dict, dict]:
    """(fp32 state dict, manifest) of ``tag`` (default: the newest verified checkpoint).

    Asking for what the run does not have (a tag it never wrote, the EMA of a run without one) is the
    user's mistake, a `RunDirError`; a checkpoint that cannot be read is a `CheckpointError`."""
    from vilscale.orchestration.checkpoint.rundir import RunDirError

    checkpointer = Checkpointer(Path(run_dir), keep=1 << 30, spec_digest="")
    if tag is None:
        from vilscale.orchestration.checkpoint.store import NoUsableCheckpoint

        try:
            manifest = checkpointer.find_resumable(log=lambda line: None)
        except NoUsableCheckpoint as error:
            raise CheckpointError(str(error)) from None
        if manifest is None:
            raise CheckpointError(f"{checkpointer.root} has no complete, verified checkpoint")
        tag = manifest["tag"]
    else:
        if not (checkpointer.root / tag).is_dir():
            raise RunDirError(f"{run_dir} has no checkpoint {tag!r}; its checkpoints: "
                              f"{checkpointer.complete_tags() or 'none'}")
        problem = checkpointer.verify(tag)
        if problem:
            raise CheckpointError(f"checkpoint {tag} is not usable: {problem}")
        manifest = json.loads((checkpointer.root / tag / MANIFEST).read_text()) | {"tag": tag}
    directory = checkpointer.root / tag
    if ema:
        if not (directory / EMA_FILE).is_file():
            raise RunDirError(f"checkpoint {tag} of {run_dir} has no EMA weights (the run had optim.ema_decay=0); "
                              "drop --ema")
        from safetensors.torch import load_file

        state = load_file(str(directory / EMA_FILE))
    elif zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed prints its progress to stdout, which the commands keep for their results (JSON lines).
        with contextlib.redirect_stdout(sys.stderr):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpointer.root), tag=tag)
    else:
        model_file = directory / "mp_rank_00_model_states.pt"
        state = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    state = {key.removeprefix("_orig_mod."): value.float().contiguous() for key, value in state.items()}
    return state, manifest



def saved_train_state(run_dir: Path, tag: str) -> dict:
    """The training counters checkpoint ``tag`` was saved with (step, epoch, the attention mode in effect...)."""
    client = Path(run_dir) / "checkpoints" / tag / "client_rank0.pt"
    return torch.load(client, map_location="cpu", weights_only=True)["train_state"]
