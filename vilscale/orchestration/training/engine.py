"""The model and its DeepSpeed engine, wrapped from outside the model file.

Order matters and is fixed here: the model is built (and its starting weights loaded), the optimizer's
parameter groups are taken from the plain module (so ``no_weight_decay()`` names match), then
activation checkpointing and ``torch.compile`` are applied in place (``Module.compile`` keeps every
parameter name, so checkpoints and exports never see ``_orig_mod.``), and DeepSpeed wraps the result.
"""

from __future__ import annotations

import os
import sys

import torch

from vilscale.orchestration.config import JobSpec, SpecError
from vilscale.orchestration.training.optim import build_optimizer
from vilscale.tasks.precision import COMPUTE_DTYPES


def use_environment_ninja() -> None:
    """Put this interpreter's bin folder first on PATH and build extensions inside the environment:
    DeepSpeed rebuilds its JIT op (a minute and several GB on a small machine) whenever the ninja it
    finds changes, and `make setup` built it with the environment's ninja."""
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # Each environment keeps its own build, so two checkouts never rebuild each other's op.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def deepspeed_config(spec: JobSpec, world_size: int, device: torch.device) -> dict:
    from vilscale.tasks import make_task

    accum = spec.grad_accum(world_size)
    config = {
        "train_micro_batch_size_per_gpu": spec.train.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": spec.train.micro_batch * accum * world_size,
        "zero_optimization": {"stage": spec.train.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if spec.train.zero_stage in (1, 2):
        # Overlapping communication needs CUDA streams; on CPU it only costs memory.
        config["zero_optimization"].update(overlap_comm=device.type == "cuda", contiguous_gradients=True)
    # Always written: DeepSpeed's default when the key is absent is 1.0, not "no clipping".
    config["gradient_clipping"] = spec.optim.clip_grad
    # The task decides what DeepSpeed's own precision is: classification casts the model to bf16 (DeepSpeed's mode,
    # fp32 master weights in the optimizer); detection and segmentation keep fp32 weights and compute in autocast
    # islands inside the model (``vilscale.tasks.precision``), so DeepSpeed runs them in fp32.
    precision = make_task(spec).engine_precision
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        if device.type != "cuda":
            raise SpecError("train.precision='fp16' needs a GPU; use 'bf16' or 'fp32' on CPU")
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def build_model(spec: JobSpec, *, log=None, initial_weights: bool = True) -> torch.nn.Module:
    """The spec's task model (a ViL classifier, or a detector on the ViL backbone), with `model.init_weights`
    loaded into its ViL network (position tables fitted; a classifier's head fitted, a detector's dropped)
    unless ``initial_weights`` is False (a resumed run: its checkpoint holds the weights)."""
    from vilscale.tasks import make_task

    cfg = spec.model
    task = make_task(spec)
    try:
        model = task.create_model()
    except ValueError as error:
        raise SpecError(f"model: {error}") from None
    if cfg.init_weights and initial_weights:
        from vilscale.orchestration.training.init_weights import load_initial_weights

        report = load_initial_weights(task.init_target(model), cfg.init_weights)
        if task.init_note:
            report.head = task.init_note
        if log is not None:
            log(f"initial weights {report.summary()}")
    return model


def settle_attention_backend(model: torch.nn.Module, spec: JobSpec, device: torch.device, *,
                             precision: str | None = None, log=None) -> str:
    """Resolve ``model.attn_backend`` on ``device``: where the triton kernels would run, they are checked
    against chunked first (``vilscale.kernels.selfcheck``); ``auto`` falls back to chunked when they fail, an
    explicit ``triton`` stops here (exit 2). Sets the model's backend; returns it, and logs one line why."""
    from vilscale.kernels.selfcheck import KernelCheckError, settle_backend

    try:
        backend, reason = settle_backend(model, spec.model.attn_backend, device,
                                         COMPUTE_DTYPES[precision or spec.train.precision])
    except KernelCheckError as error:
        raise SpecError(str(error)) from None
    if log is not None:
        log(f"attention backend: {backend} ({reason})")
    return backend


def build_engine(spec: JobSpec, model: torch.nn.Module, *, world_size: int, device: torch.device,
                 load_universal: bool = False):
    """(DeepSpeed engine, the torch optimizer inside it) for ``model`` on ``device``."""
    import deepspeed

    model = model.to(device)
    optimizer = build_optimizer(model, spec)  # groups from the plain module's parameter names
    if spec.train.activation_checkpointing:
        model.set_grad_checkpointing(True)
    if spec.train.compile:
        model.compile()  # in place: parameter names stay as they are
    config = deepspeed_config(spec, world_size, device)
    if load_universal:
        # ZeRO shards are per rank: a checkpoint of another world size loads through DeepSpeed's universal format.
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine, optimizer
