"""Starting weights for fine-tuning (`model.init_weights`): a vilscale export, an official ViL
checkpoint, or a run directory, at any resolution, window and class count.

Every source is first read as a state dict in vilscale's names, then fitted to the model by
``vilscale.model.adapt`` (the same code `load_official` uses): position tables interpolated, the head
replaced by a fresh one when the class count differs. What cannot fit is a `SpecError` naming
`model.init_weights` (the launcher's pre-flight check runs this same code before any rank starts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vilscale.model import Adaptation, adapt_state_dict
from vilscale.orchestration.config import SpecError

SOURCES = "a vilscale export (.safetensors), an official ViL checkpoint (.pth) or a run directory"


def read_initial_weights(source: str, model: torch.nn.Module, *,
                         key: str = "model.init_weights") -> tuple[dict[str, torch.Tensor], str]:
    """(state dict in vilscale names, what the source is) of ``source``; errors name it as ``key`` (the spec key,
    or the option of `vilscale eval --weights`)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SpecError(f"{key}={source!r} does not exist; give {SOURCES}")
    try:
        if path.is_dir():
            from vilscale.orchestration.checkpoint.consolidate import consolidated_state_dict
            from vilscale.orchestration.checkpoint.rundir import load_run_spec

            run_spec = load_run_spec(path)
            state, manifest = consolidated_state_dict(path, zero_stage=run_spec.train.zero_stage)
            return state, f"run {path} at step {manifest['step']}"
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), f"export {path}"
        from vilscale.model.official import read_official, translate_official

        # Names and layouts only: the resizing is shared with the other sources.
        return translate_official(read_official(path), num_stages=len(model.config.stages)), \
            f"official checkpoint {path}"
    except SpecError:
        raise
    except Exception as error:  # unreadable file, not a checkpoint, a run without a verified checkpoint
        raise SpecError(f"{key}={source!r} cannot be read as {SOURCES}: "
                        f"{type(error).__name__}: {str(error)[:300]}") from None


def load_initial_weights(model: torch.nn.Module, source: str) -> Adaptation:
    """Load ``source`` into ``model`` in place; returns what was interpolated, replaced or kept."""
    state, described = read_initial_weights(source, model)
    try:
        fitted, report = adapt_state_dict(state, model, head="replace")
        model.load_state_dict(fitted)
    except (ValueError, RuntimeError) as error:
        raise SpecError(f"model.init_weights={source!r} ({described}) does not fit the model: {error}") from None
    report.source = described
    return report
