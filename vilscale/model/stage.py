"""One ViL stage: patch embedding -> LayerNorm -> global tokens -> APE -> blocks -> local map."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vilscale.model.attention import FullAttention, ViLAttention
from vilscale.model.block import Block
from vilscale.model.config import StageConfig
from vilscale.model.position import AbsolutePositionEmbedding


class PatchEmbed(nn.Module):
    """Non-overlapping patches: a convolution with kernel = stride = ``patch_size`` (trailing rows
    and columns that do not fill a patch are dropped, as a strided convolution does), then
    LayerNorm on the tokens.

    Args:
        in_chans: input channels.
        dim: output width.
        patch_size: kernel and stride.
        ln_eps: LayerNorm epsilon.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, ln_eps: float = 1e-6):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=ln_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.shape[-2] < self.patch_size or x.shape[-1] < self.patch_size:
            raise ValueError(f"input of {x.shape[-2]}x{x.shape[-1]} pixels is smaller than patch_size="
                             f"{self.patch_size}; use a larger image")
        x = self.proj(x)  # (B, C, h, w)
        map_hw = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), map_hw  # (B, h*w, C)


class Stage(nn.Module):
    """A stage of the multi-scale pyramid.

    Args:
        in_chans: channels of the incoming map (image or previous stage).
        config: the stage's shape (depth, patch, heads, width, global tokens, attention kind, window).
        map_hw: the token map at the configured image size (position tables are built for it).
        use_vil: ViL attention (``s1``) or full attention (``s0``).
        pos_embed: ``ape`` or ``rpe``.
        window_mode: ``chunk`` or ``exact``.
        drop_paths: one stochastic-depth rate per block.
        mlp_ratio: MLP hidden width relative to the stage width.
        qkv_bias: bias in the query/key/value projections.
        ln_eps: LayerNorm epsilon.
        attn_backend: backend of the ViL attention.
        shift_mode: which chunks a ViL attention query sees (``full``, ``random``, ``own``).
    """

    def __init__(self, in_chans: int, config: StageConfig, *, map_hw: tuple[int, int], use_vil: bool, pos_embed: str,
                 window_mode: str, drop_paths: list[float], mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 ln_eps: float = 1e-6, attn_backend: str = "auto", shift_mode: str = "full"):
        super().__init__()
        dim, g = config.dim, config.num_global
        self.num_global = g
        self.patch_embed = PatchEmbed(in_chans, dim, config.patch_size, ln_eps)
        self.global_tokens = nn.Parameter(torch.zeros(1, g, dim)) if g else None
        if self.global_tokens is not None:
            nn.init.trunc_normal_(self.global_tokens, std=0.02)
        self.pos_embed = AbsolutePositionEmbedding(dim, map_hw, g) if pos_embed == "ape" else None
        rpe = pos_embed == "rpe"
        blocks = []
        for rate in drop_paths:
            if use_vil:
                attn = ViLAttention(dim, config.heads, num_global=g, window=config.window, window_mode=window_mode,
                                    rpe=rpe, qkv_bias=qkv_bias, backend=attn_backend, shift_mode=shift_mode)
            else:
                attn = FullAttention(dim, config.heads, num_global=g, map_hw=map_hw, rpe=rpe, qkv_bias=qkv_bias)
            blocks.append(Block(dim, attn, mlp_ratio=mlp_ratio, drop_path=rate, ln_eps=ln_eps))
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C_in, H, W) -> tokens (B, G + h*w, C) after the blocks, and (h, w)."""
        tokens, map_hw = self.patch_embed(x)
        if self.global_tokens is not None:
            tokens = torch.cat([self.global_tokens.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        if self.pos_embed is not None:
            tokens = self.pos_embed(tokens, map_hw)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute the block in backward instead of keeping its activations.
                tokens = checkpoint(block, tokens, map_hw, use_reentrant=False)
            else:
                tokens = block(tokens, map_hw)
        return tokens, map_hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, h, w): global tokens dropped, local tokens as a map."""
        tokens, (height, width) = self.forward_tokens(x)
        local = tokens[:, self.num_global:]
        return local.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
