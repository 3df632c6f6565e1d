"""The two attention modules of a ViL stage: ViL attention (``s1``) and full attention (``s0``).

Both take ``(B, G + H*W, C)`` tokens (global tokens first) and the ``(H, W)`` of the local map.
With ``rpe`` they carry relative-position tables in vilscale's orientation: ``(heads, entries)``,
indexed by the offset ``key - query`` (the official checkpoints store ``(entries, heads)`` indexed
by ``query - key``; ``vilscale.model.official`` converts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vilscale.kernels import vil_attention
from vilscale.kernels.dense import dense_biased_attention
from vilscale.kernels.reference import OWN_CHUNK, neighbour_of_official_mode
from vilscale.model.config import check_shift_mode


def _global_tables(module: nn.Module, heads: int, num_global: int) -> None:
    """Biases between global and local tokens: g2l (global query -> any local key), l2g (local
    query -> global key j), g2g (global query i -> global key j)."""
    if num_global:
        module.rel_bias_g2l = nn.Parameter(torch.zeros(heads, num_global))
        module.rel_bias_l2g = nn.Parameter(torch.zeros(heads, num_global))
        module.rel_bias_g2g = nn.Parameter(torch.zeros(heads, num_global, num_global))
    else:
        module.rel_bias_g2l = module.rel_bias_l2g = module.rel_bias_g2g = None
    for name, parameter in module.named_parameters(recurse=False):
        if name.startswith("rel_bias"):
            nn.init.trunc_normal_(parameter, std=0.02)


class ViLAttention(nn.Module):
    """Multi-head ViL attention: a local query sees all global tokens and its 2-D window in one
    softmax; a global query sees every token.

    Args:
        dim: channel width.
        heads: attention heads (divides ``dim``).
        num_global: global tokens at the front of the sequence.
        window: ViL window ``w``.
        window_mode: ``chunk`` or ``exact`` (see ``vilscale.kernels.reference``).
        rpe: add relative position biases (a ``(4w-1)^2`` local table per head plus g2l/l2g/g2g).
        qkv_bias: bias in the query/key/value projection.
        backend: ``vilscale.kernels`` backend name (``auto``, ``reference``, ``chunked``, ``triton``).
        shift_mode: ``full``, ``random`` or ``own`` (see ``vilscale.model.config.ViLConfig.shift_mode``).
    """

    def __init__(self, dim: int, heads: int, *, num_global: int, window: int, window_mode: str, rpe: bool,
                 qkv_bias: bool = True, backend: str = "auto", shift_mode: str = "full"):
        super().__init__()
        self.heads, self.num_global, self.window, self.window_mode = heads, num_global, window, window_mode
        self.backend = backend
        check_shift_mode(shift_mode, window_mode)
        self.shift_mode = shift_mode
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rpe = rpe
        if rpe:
            self.rel_bias_local = nn.Parameter(torch.zeros(heads, (4 * window - 1) ** 2))
            _global_tables(self, heads, num_global)

    def neighbour(self) -> int | None:
        """The ``neighbour`` argument of ``vil_attention`` for this forward call (None: all 9 chunks).

        In ``random`` shift mode while training, this draws the official ``mode = randrange(1, 9)``
        from torch's global CPU generator: one draw per attention layer and forward call, as the
        official code does (with Python's ``random``). torch's generator is what the trainer
        checkpoints and what activation checkpointing replays, so a resumed run and a recomputed
        forward see the same chunks."""
        if self.shift_mode == "own":
            return OWN_CHUNK
        if self.shift_mode == "random" and self.training:
            return neighbour_of_official_mode(int(torch.randint(1, 9, ())))
        return None

    def forward(self, x: torch.Tensor, map_hw: tuple[int, int]) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        tables = {}
        if self.rpe:
            tables = dict(local_bias=self.rel_bias_local, g2l_bias=self.rel_bias_g2l, l2g_bias=self.rel_bias_l2g,
                          g2g_bias=self.rel_bias_g2g)
        if torch.compiler.is_compiling():  # one opaque op: the whole block stays in one graph
            from vilscale.kernels.op import vil_attention_compiled

            out = vil_attention_compiled(q, k, v, map_hw=tuple(map_hw), num_global=self.num_global,
                                         window=self.window, mode=self.window_mode, backend=self.backend,
                                         neighbour=self.neighbour_tensor(), **tables)
        else:
            out = vil_attention(q, k, v, map_hw=tuple(map_hw), num_global=self.num_global, window=self.window,
                                mode=self.window_mode, backend=self.backend, neighbour=self.neighbour(), **tables)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))

    def neighbour_tensor(self) -> torch.Tensor:
        """``neighbour()`` as the int64 scalar tensor the compiled op takes (-1: all 9 chunks), drawn in the graph."""
        if self.shift_mode == "random" and self.training:
            from vilscale.kernels.op import random_neighbour

            return random_neighbour()
        chosen = self.neighbour()
        return torch.tensor(-1 if chosen is None else chosen)


class FullAttention(nn.Module):
    """Plain multi-head attention over all tokens (the ``s0`` stages).

    Args:
        dim: channel width.
        heads: attention heads (divides ``dim``).
        num_global: global tokens at the front of the sequence.
        map_hw: the (height, width) the relative table is built for (``(2H-1)(2W-1)`` entries); on a
            larger map, offsets beyond the table reuse its border entries.
        rpe: add relative position biases.
        qkv_bias: bias in the query/key/value projection.
    """

    def __init__(self, dim: int, heads: int, *, num_global: int, map_hw: tuple[int, int], rpe: bool,
                 qkv_bias: bool = True):
        super().__init__()
        self.heads, self.num_global, self.map_hw = heads, num_global, tuple(map_hw)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rpe = rpe
        self._index_cache: dict = {}
        if rpe:
            self.rel_bias_local = nn.Parameter(torch.zeros(heads, (2 * map_hw[0] - 1) * (2 * map_hw[1] - 1)))
            _global_tables(self, heads, num_global)

    def relative_index(self, map_hw: tuple[int, int]) -> torch.Tensor:
        """(L, L) long: the entry of ``rel_bias_local`` for every (local query, local key) of a ``map_hw``
        map; offsets beyond the table reuse its border entries. Cached per map size and device."""
        if torch.compiler.is_compiling():  # in the graph: a cache filled during tracing would force a recompile
            return self._build_index(map_hw)
        key = (tuple(map_hw), self.rel_bias_local.device)
        if key not in self._index_cache:
            self._index_cache[key] = self._build_index(map_hw)
        return self._index_cache[key]

    def _build_index(self, map_hw: tuple[int, int]) -> torch.Tensor:
        height, width = map_hw
        table_h, table_w = self.map_hw
        device = self.rel_bias_local.device
        ys = torch.arange(height, device=device).repeat_interleave(width)
        xs = torch.arange(width, device=device).repeat(height)
        dy = (ys[None, :] - ys[:, None]).clamp(-(table_h - 1), table_h - 1) + table_h - 1
        dx = (xs[None, :] - xs[:, None]).clamp(-(table_w - 1), table_w - 1) + table_w - 1
        return dy * (2 * table_w - 1) + dx

    def relative_bias(self, map_hw: tuple[int, int]) -> torch.Tensor:
        """(heads, N, N) additive bias for a ``map_hw`` map (the definition ``forward`` computes in place)."""
        local = self.rel_bias_local[:, self.relative_index(map_hw)]  # (heads, L, L)
        g = self.num_global
        if not g:
            return local
        n_local = map_hw[0] * map_hw[1]
        top = torch.cat([self.rel_bias_g2g, self.rel_bias_g2l[:, :, None].expand(-1, g, n_local)], dim=-1)
        bottom = torch.cat([self.rel_bias_l2g[:, None, :].expand(-1, n_local, g), local], dim=-1)
        return torch.cat([top, bottom], dim=1)

    def forward(self, x: torch.Tensor, map_hw: tuple[int, int]) -> torch.Tensor:
        batch, tokens, channels = x.shape
        head_dim = channels // self.heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self.rpe:
            # Softmax in fp32 with the bias tables differentiable, on every device.
            out = dense_biased_attention(q, k, v, self.rel_bias_local, self.rel_bias_g2l, self.rel_bias_l2g,
                                         self.rel_bias_g2g, index=self.relative_index(map_hw),
                                         num_global=self.num_global, scale=head_dim ** -0.5)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))
