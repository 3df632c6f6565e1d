"""Exponential moving average of the weights, kept in fp32 on the training device.

Under ZeRO stages 0-2 every rank holds the full parameters after each step, so every rank keeps the
same EMA; rank 0 writes it into each checkpoint (``ema.safetensors``) and every rank reads it back on
resume, whatever the world size. Under bf16 the EMA follows the bf16 module weights (DeepSpeed keeps
the fp32 master copy partitioned inside the optimizer).
"""

from __future__ import annotations

import contextlib

import torch


class ExponentialMovingAverage:
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    Args:
        module: the model whose parameters are averaged (the engine's module).
        decay: e.g. 0.9998.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().to(torch.float32, copy=True) for name, p in module.named_parameters()}

    @torch.no_grad()
    def restart_from(self, module: torch.nn.Module) -> None:
        """Start the average again from ``module``'s weights (e.g. the resumed ones, when EMA is switched on
        at a resume)."""
        for name, parameter in module.named_parameters():
            self.shadow[name].copy_(parameter.detach())

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, parameter in module.named_parameters():
            self.shadow[name].mul_(self.decay).add_(parameter.detach().float(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"the saved EMA lacks {missing[:5]}")
        for name, tensor in self.shadow.items():
            tensor.copy_(state[name])

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, module: torch.nn.Module):
        """Within the block, ``module`` carries the EMA weights; afterwards its own weights, bit for bit.
        The shadow itself is never touched (no rounding to the module's dtype)."""
        live = {name: p.detach().clone() for name, p in module.named_parameters()}
        try:
            for name, parameter in module.named_parameters():
                parameter.copy_(self.shadow[name])
            yield module
        finally:
            for name, parameter in module.named_parameters():
                parameter.copy_(live[name])
