"""The pre-norm transformer block: ``x + DropPath(Attn(LN x))``, then ``x + DropPath(MLP(LN x))``."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``rate`` and
    scale the kept ones by ``1 / (1 - rate)``.

    Args:
        rate: probability of dropping the branch of one sample.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear.

    Args:
        dim: input and output width.
        hidden: hidden width.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One transformer block; the attention module decides ViL or full attention.

    Args:
        dim: channel width.
        attn: an attention module called as ``attn(x, map_hw)``.
        mlp_ratio: MLP hidden width relative to ``dim``.
        drop_path: stochastic-depth rate of both residual branches (as in the official model).
        ln_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, attn: nn.Module, *, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 ln_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, map_hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), map_hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))
