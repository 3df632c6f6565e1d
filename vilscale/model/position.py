"""Position information: the absolute 2-D embedding (APE) and resizing of position tables.

APE follows the official model: the first half of the channels carries a learned embedding of the
row, the second half one of the column, and every global token has its own learned vector. On a
grid other than the one it was built for, the row and column embeddings are interpolated linearly
(``align_corners=False``), which is also how ``load_official`` adapts a checkpoint to a new size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_1d(embedding: torch.Tensor, length: int) -> torch.Tensor:
    """(1, n, c) -> (1, length, c) by linear interpolation along n."""
    if embedding.shape[1] == length:
        return embedding
    resized = F.interpolate(embedding.transpose(1, 2).float(), size=length, mode="linear", align_corners=False)
    return resized.transpose(1, 2).to(embedding.dtype)


def resize_table_2d(table: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    """(heads, old_h * old_w) -> (heads, new_h * new_w): a table over a 2-D grid of relative offsets,
    resized bilinearly (as the official checkpoint loader does for its relative-position tables)."""
    if tuple(old_hw) == tuple(new_hw):
        return table
    heads = table.shape[0]
    grid = table.float().reshape(1, heads, *old_hw)
    resized = F.interpolate(grid, size=tuple(new_hw), mode="bilinear", align_corners=False)
    return resized.reshape(heads, -1).to(table.dtype)


class AbsolutePositionEmbedding(nn.Module):
    """Learned row, column and global-token embeddings added to ``(B, G + H*W, C)`` tokens.

    Args:
        dim: channel width (even).
        map_hw: the (height, width) grid the row and column tables are built for.
        num_global: number of global tokens, each with its own embedding.
    """

    def __init__(self, dim: int, map_hw: tuple[int, int], num_global: int):
        super().__init__()
        self.num_global = num_global
        self.global_embed = nn.Parameter(torch.zeros(1, num_global, dim)) if num_global else None
        self.row_embed = nn.Parameter(torch.zeros(1, map_hw[0], dim // 2))
        self.col_embed = nn.Parameter(torch.zeros(1, map_hw[1], dim // 2))
        for parameter in self.parameters():
            nn.init.trunc_normal_(parameter, std=0.02)

    def forward(self, tokens: torch.Tensor, map_hw: tuple[int, int]) -> torch.Tensor:
        height, width = map_hw
        rows = resize_1d(self.row_embed, height)[:, :, None, :].expand(-1, height, width, -1)
        cols = resize_1d(self.col_embed, width)[:, None, :, :].expand(-1, height, width, -1)
        local = torch.cat([rows, cols], dim=-1).reshape(1, height * width, -1)
        embedding = local if self.global_embed is None else torch.cat([self.global_embed, local], dim=1)
        return tokens + embedding
