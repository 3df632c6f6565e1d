"""Everything a rank needs before its first step: process group, device, model, DeepSpeed engine.

Wrapping (activation checkpointing, torch.compile, ZeRO) is applied here, from outside the model.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vilscale.orchestration.spec import JobSpec, SpecError


@dataclass(frozen=True, kw_only=True, slots=True)
class RankContext:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of ranks."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """Where the model and batches live."""


def use_environment_ninja() -> None:
    """Put this interpreter's bin folder first on PATH and build extensions inside the environment:
    DeepSpeed rebuilds its JIT op (a minute and several GB on a small machine) whenever the ninja it
    finds changes, and `make setup` built it with the environment's ninja."""
    bin_dir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # Each environment keeps its own build, so two checkouts never rebuild each other's op.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resolve_device(spec: JobSpec) -> str:
    if spec.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.train.device == "cuda" and not torch.cuda.is_available():
        raise SpecError("train.device='cuda' but no CUDA device is visible; use train.device=cpu or auto")
    return spec.train.device


def init_distributed(spec: JobSpec) -> RankContext:
    """Join the process group: Ray Train's if it exists, else the one the env vars describe (a
    one-rank group when none are set)."""
    device_type = resolve_device(spec)
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if os.environ["WORLD_SIZE"] != "1":
                raise RuntimeError("MASTER_PORT is not set for a multi-rank run; launch through "
                                   "`vilscale train --nproc N` or `vilscale submit`")
            os.environ["MASTER_PORT"] = str(free_port())
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return RankContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def deepspeed_config(spec: JobSpec, world_size: int, device: torch.device) -> dict:
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
    if spec.optim.clip_grad:
        config["gradient_clipping"] = spec.optim.clip_grad
    if spec.train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif spec.train.precision == "fp16":
        if device.type != "cuda":
            raise SpecError("train.precision='fp16' needs a GPU; use 'bf16' or 'fp32' on CPU")
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def build_model(spec: JobSpec) -> torch.nn.Module:
    from vilscale.model import create_model

    cfg = spec.model
    model = create_model(cfg.name, pos_embed=cfg.pos_embed, window_mode=cfg.window_mode, window=cfg.window,
                         img_size=cfg.img_size, num_classes=cfg.num_classes, attn_backend=cfg.attn_backend,
                         drop_path_rate=cfg.drop_path_rate)
    if cfg.init_weights:
        load_initial_weights(model, cfg.init_weights, spec)
    return model


def load_initial_weights(model: torch.nn.Module, path: str, spec: JobSpec) -> None:
    """Start from an official checkpoint (.pth/.pt) or a vilscale safetensors export."""
    from vilscale.model import load_official

    if not os.path.isfile(path):
        raise SpecError(f"model.init_weights={path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
        head_keys = [k for k in state if k.startswith("head.")]
        own = model.state_dict()
        if any(own[k].shape != state[k].shape for k in head_keys if k in own):
            # A different class count (e.g. 21K -> 1K): keep the new, freshly initialised head.
            for key in head_keys:
                state.pop(key)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("head.")]:
            raise SpecError(f"model.init_weights={path!r} does not fit {spec.model.name}: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
        return
    cfg = spec.model
    loaded = load_official(path, cfg.name, pos_embed=cfg.pos_embed, window_mode=cfg.window_mode, window=cfg.window,
                           img_size=cfg.img_size, num_classes=cfg.num_classes, attn_backend=cfg.attn_backend,
                           drop_path_rate=cfg.drop_path_rate)
    model.load_state_dict(loaded.state_dict())


def apply_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every transformer block in backward; returns how many blocks were wrapped."""
    from torch.utils.checkpoint import checkpoint

    from vilscale.model.block import Block

    wrapped = 0
    for module in model.modules():
        if isinstance(module, Block) and not getattr(module, "_vilscale_checkpointed", False):
            forward = module.forward

            def checkpointed(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            module.forward = checkpointed
            module._vilscale_checkpointed = True
            wrapped += 1
    return wrapped
