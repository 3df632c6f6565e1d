"""AdamW with the official (or timm's) weight-decay exclusions, and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vilscale.orchestration.config import JobSpec

WEIGHT_DECAY_RULES = ("official", "timm")


def param_groups(model: torch.nn.Module, weight_decay: float, rule: str = "official") -> list[dict]:
    """Two groups, decayed and not decayed, by ``rule``:

    - ``official``: the official ``get_opt`` (microsoft/vision-longformer): no decay exactly for what
      ``model.no_weight_decay()`` lists (for ViL: every LayerNorm, position embeddings, global tokens,
      relative-position tables, the head's bias); all other weights and biases (q/k/v, projections,
      MLPs, patch convolutions) are decayed.
    - ``timm``: timm's rule: additionally no decay for every 1-D parameter and every bias.
    """
    if rule not in WEIGHT_DECAY_RULES:
        raise ValueError(f"weight decay rule {rule!r} is not valid; use one of {WEIGHT_DECAY_RULES}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        excluded = name in skip or any(name.startswith(prefix + ".") for prefix in skip)
        if rule == "timm":
            excluded = excluded or parameter.ndim <= 1 or name.endswith(".bias")
        (no_decay if excluded else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, spec: JobSpec) -> torch.optim.Optimizer:
    """torch's optimizers: DeepSpeed would otherwise JIT-build its fused Adam, which CPUs cannot use."""
    groups = param_groups(model, spec.optim.weight_decay, rule=spec.optim.weight_decay_rule)
    if spec.optim.name == "qhm":
        return QHM(groups, lr=spec.optim.lr, momentum=spec.optim.momentum)
    return torch.optim.AdamW(groups, lr=spec.optim.lr, betas=spec.optim.betas, eps=spec.optim.eps)


class QHM(torch.optim.Optimizer):
    """Quasi-hyperbolic momentum with nu = 1, as the official fine-tuning recipe uses it: per step
    ``g = grad + weight_decay * w``, ``buffer = momentum * buffer + (1 - momentum) * g`` with the buffer starting
    at zero, ``w -= lr * buffer``. (torch's SGD with ``dampening=momentum`` seeds its buffer with the raw
    gradient instead, which makes the first update 1 / (1 - momentum) times the official one.)"""

    def __init__(self, params, *, lr: float, momentum: float, weight_decay: float = 0.0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"QHM momentum={momentum!r} must be in [0, 1)")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, decay, lr = group["momentum"], group["weight_decay"], group["lr"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                gradient = parameter.grad.add(parameter, alpha=decay) if decay else parameter.grad
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(gradient, alpha=1.0 - momentum)
                parameter.add_(buffer, alpha=-lr)
        return loss


def peak_lr(spec: JobSpec, world_size: int) -> float:
    """The spec's lr scaled linearly from ``optim.lr_batch_ref`` to this run's global batch."""
    if not spec.optim.lr_batch_ref:
        return spec.optim.lr
    return spec.optim.lr * spec.global_batch(world_size) / spec.optim.lr_batch_ref


def lr_at(step: int, *, peak: float, total_steps: int, warmup_steps: int, warmup_lr: float,
          min_lr: float, step_at: tuple[int, ...] | None = None, step_factor: float = 0.1,
          poly_power: float | None = None) -> float:
    """Linear warmup from ``warmup_lr`` to ``peak`` over ``warmup_steps``, then cosine to ``min_lr`` or, with
    ``step_at`` (absolute steps), the peak times ``step_factor`` once per milestone reached, or, with
    ``poly_power``, ``min_lr + (peak - min_lr) x (1 - progress)^poly_power``."""
    if step < warmup_steps:
        return warmup_lr + (peak - warmup_lr) * step / warmup_steps
    if step_at is not None:
        return peak * step_factor ** sum(step >= milestone for milestone in step_at)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if poly_power is not None:
        return min_lr + (peak - min_lr) * (1.0 - progress) ** poly_power
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True, kw_only=True, slots=True)
class LrSchedule:
    """The per-step learning rate of a run: linear warmup, then cosine to ``min_lr`` at ``total_steps``."""

    peak: float
    """Peak learning rate (the spec's lr scaled to the global batch)."""
    total_steps: int
    """Optimizer steps of the whole run."""
    warmup_steps: int
    """Steps of the linear warmup."""
    warmup_lr: float
    """Learning rate at step 0."""
    min_lr: float
    """Learning rate at the end (cosine)."""
    step_at: tuple[int, ...] | None = None
    """Steps where a multi-step schedule multiplies the peak by ``step_factor`` (None: cosine)."""
    step_factor: float = 0.1
    poly_power: float | None = None
    """The exponent of a poly decay (None: cosine or steps)."""

    @classmethod
    def for_run(cls, spec: JobSpec, *, world_size: int, steps_per_epoch: int, total_steps: int) -> LrSchedule:
        schedule = spec.schedule
        step_at = tuple(round(at * total_steps) for at in schedule.step_at) if schedule.decay == "step" else None
        return cls(peak=peak_lr(spec, world_size), total_steps=total_steps,
                   warmup_steps=round(schedule.warmup_epochs * steps_per_epoch),
                   warmup_lr=schedule.warmup_lr, min_lr=schedule.min_lr, step_at=step_at,
                   step_factor=schedule.step_factor, poly_power=schedule.power if schedule.decay == "poly" else None)

    def lr(self, step: int) -> float:
        return lr_at(step, peak=self.peak, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     warmup_lr=self.warmup_lr, min_lr=self.min_lr, step_at=self.step_at,
                     step_factor=self.step_factor, poly_power=self.poly_power)

    def apply(self, optimizer, step: int) -> float:
        """Set every parameter group's lr for ``step``; returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
