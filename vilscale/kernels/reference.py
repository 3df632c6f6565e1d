"""Dense reference of ViL attention: the definition every faster backend is tested against.

Token layout (all backends): ``q``, ``k``, ``v`` are ``(B, heads, G + H*W, d)`` with the ``G``
global tokens first, then the local tokens of an ``H x W`` map in row-major order.

Who sees whom, in ONE softmax per query:
- a global query sees every token (global and local);
- a local query at (y, x) sees every global token and the local keys of its window:
  - ``mode="exact"`` (the paper): keys with ``|dy| <= w`` and ``|dx| <= w``, truncated at the border;
  - ``mode="chunk"`` (the released checkpoints): the map is cut into ``w x w`` chunks from the
    top-left (the last row/column of chunks may be partial); a query sees the keys of its own chunk
    and of the 8 neighbouring chunks. Keys outside the map do not exist, so nothing is shifted.
    ``neighbour`` narrows this (chunk mode only): ``None`` = all 9 chunks; ``n`` in 0..8 = the own
    chunk plus chunk ``n`` of the 3x3 block around it, row-major, at chunk offset
    ``(n // 3 - 1, n % 3 - 1)``; ``n = 4`` is the own chunk, so it means "own chunk only". These are
    the official ``Long2DSCSelfAttention`` modes: ``mode=0`` is ``None``, ``mode=-1`` is 4, and a
    random ``mode`` in 1..8 is ``neighbour_of_official_mode(mode)`` (see there).

Relative position biases (all optional, added to the scaled scores ``q.k * scale``):
- ``local_bias``  ``(heads, (4w-1)**2)``: local query -> local key, indexed by the offset
  ``(dy, dx) = key - query`` as ``(dy + 2w-1) * (4w-1) + (dx + 2w-1)``. ``|dy|, |dx| <= 2w-1`` in
  chunk mode, ``<= w`` in exact mode, so one table shape serves both modes.
- ``g2l_bias``  ``(heads, G)``: global query i -> every local key gets ``g2l_bias[h, i]``.
- ``l2g_bias``  ``(heads, G)``: every local query -> global key j gets ``l2g_bias[h, j]``.
- ``g2g_bias``  ``(heads, G, G)``: global query i -> global key j gets ``g2g_bias[h, i, j]``.

Memory is O(N^2): use it as an oracle and for small maps only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WINDOW_MODES = ("chunk", "exact")
OWN_CHUNK = 4
"""The ``neighbour`` that is the query's own chunk: ``neighbour=OWN_CHUNK`` sees the own chunk only."""


def neighbour_of_official_mode(mode: int) -> int | None:
    """The ``neighbour`` argument equal to the official ``Long2DSCSelfAttention`` ``mode``.

    Officially ``mode`` 0 is all 9 chunks, -1 the own chunk only, and ``mode`` in 1..8 the own chunk
    plus the chunk whose keys ``torch.roll(k, shifts=mode_dict[mode], dims=(rows, cols))`` brings
    under the query chunk: ``mode_dict`` = {1: (1, 1), 2: (1, 0), 3: (1, -1), 4: (0, 1), 5: (0, -1),
    6: (-1, 1), 7: (-1, 0), 8: (-1, -1)}, and rolling by +1 brings chunk ``m - 1`` to ``m``, so the
    chunk offset is minus the shift: modes 1..8 are the 8 neighbours in row-major order skipping the
    centre, neighbour ``mode - 1`` for ``mode <= 4`` and ``mode`` above (the official mask indexes
    ``chunk_id = mode if mode > 4 else mode - 1`` the same way)."""
    if mode == 0:
        return None
    if mode == -1:
        return OWN_CHUNK
    if not 1 <= mode <= 8:
        raise ValueError(f"official mode {mode} is not one of -1, 0, 1..8")
    return mode - 1 if mode <= 4 else mode


def neighbour_offset(neighbour: int) -> tuple[int, int]:
    """(dy, dx) chunk offset of ``neighbour`` (0..8, row-major over the 3x3 chunks around the query's)."""
    return neighbour // 3 - 1, neighbour % 3 - 1


@dataclass(frozen=True)
class AttentionProblem:
    """The shape of one ViL attention call that the fast backends carry from forward to backward
    (hashable, so autograd functions take it as a plain argument)."""

    map_hw: tuple[int, int]
    num_global: int
    window: int
    mode: str
    neighbour: int | None
    scale: float

    @classmethod
    def of(cls, head_dim: int, *, map_hw, num_global: int, window: int, mode: str, neighbour: int | None,
           scale: float | None) -> AttentionProblem:
        """``scale=None`` is the usual ``head_dim ** -0.5``."""
        return cls(map_hw=(int(map_hw[0]), int(map_hw[1])), num_global=int(num_global), window=int(window),
                   mode=mode, neighbour=neighbour, scale=float(head_dim ** -0.5 if scale is None else scale))


def validate_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, map_hw: tuple[int, int],
                     num_global: int, window: int, mode: str, neighbour: int | None = None) -> None:
    """Raise ValueError if the tensors do not describe a ViL attention problem."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"window mode {mode!r} is not valid; use one of {WINDOW_MODES}")
    if neighbour is not None:
        if mode != "chunk":
            raise ValueError(f"neighbour={neighbour} selects chunks, but window mode {mode!r} has none: shift "
                             "modes other than full need mode='chunk' (the official code refuses exact windows "
                             "with random shifts too)")
        if isinstance(neighbour, bool) or not isinstance(neighbour, int) or not 0 <= neighbour <= 8:
            raise ValueError(f"neighbour={neighbour!r} must be None (all 9 chunks) or an int in 0..8 "
                             f"({OWN_CHUNK} = own chunk only)")
    if window < 1:
        raise ValueError(f"window={window} must be a positive integer")
    if num_global < 0:
        raise ValueError(f"num_global={num_global} must be >= 0")
    height, width = map_hw
    if height < 1 or width < 1:
        raise ValueError(f"map size {map_hw} must be at least 1x1")
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, heads, tokens, head_dim), got shape {tuple(q.shape)}")
    expected = num_global + height * width
    if q.shape[2] != expected:
        raise ValueError(
            f"q has {q.shape[2]} tokens but num_global={num_global} + {height}x{width} map = {expected}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def local_offsets(map_hw: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) = key - query for every pair of local tokens, each (L, L)."""
    height, width = map_hw
    ys = torch.arange(height, device=device).repeat_interleave(width)
    xs = torch.arange(width, device=device).repeat(height)
    return ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]


def local_visibility(map_hw: tuple[int, int], window: int, mode: str, device=None,
                     neighbour: int | None = None) -> torch.Tensor:
    """Boolean (L, L): local query (row) may attend local key (column)."""
    height, width = map_hw
    if mode == "exact":
        dy, dx = local_offsets(map_hw, device)
        return (dy.abs() <= window) & (dx.abs() <= window)
    chunk_y = (torch.arange(height, device=device) // window).repeat_interleave(width)
    chunk_x = (torch.arange(width, device=device) // window).repeat(height)
    chunk_dy = chunk_y[None, :] - chunk_y[:, None]  # key chunk - query chunk
    chunk_dx = chunk_x[None, :] - chunk_x[:, None]
    if neighbour is None:
        return (chunk_dy.abs() <= 1) & (chunk_dx.abs() <= 1)
    offset_y, offset_x = neighbour_offset(neighbour)
    return ((chunk_dy == 0) & (chunk_dx == 0)) | ((chunk_dy == offset_y) & (chunk_dx == offset_x))


def relative_index(map_hw: tuple[int, int], window: int, device=None) -> torch.Tensor:
    """(L, L) index into the local table for every local pair, clamped to the table (the out of
    range pairs are masked anyway)."""
    span = 2 * window - 1
    dy, dx = local_offsets(map_hw, device)
    dy = dy.clamp(-span, span) + span
    dx = dx.clamp(-span, span) + span
    return dy * (2 * span + 1) + dx


def dense_bias_and_mask(map_hw: tuple[int, int], num_global: int, window: int, mode: str, heads: int,
                        *, local_bias=None, g2l_bias=None, l2g_bias=None, g2g_bias=None,
                        device=None, neighbour: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (heads, N, N) additive bias (fp32, or fp64 for fp64 tables; differentiable w.r.t. the tables)
    and (N, N) mask."""
    height, width = map_hw
    n_local = height * width
    n = num_global + n_local
    visible = torch.ones(n, n, dtype=torch.bool, device=device)
    visible[num_global:, num_global:] = local_visibility(map_hw, window, mode, device, neighbour)

    tables = [t for t in (local_bias, g2l_bias, l2g_bias, g2g_bias) if t is not None]
    compute = torch.float64 if any(t.dtype == torch.float64 for t in tables) else torch.float32
    bias = torch.zeros(heads, n, n, dtype=compute, device=device)
    if local_bias is not None:
        expected = (4 * window - 1) ** 2
        if local_bias.shape != (heads, expected):
            raise ValueError(f"local_bias must be (heads={heads}, (4w-1)^2={expected}), "
                             f"got {tuple(local_bias.shape)}")
        index = relative_index(map_hw, window, device)
        local = local_bias.to(compute)[:, index.reshape(-1)].reshape(heads, n_local, n_local)
        bias = bias + torch.nn.functional.pad(local, (num_global, 0, num_global, 0))
    for name, table, shape in (("g2l_bias", g2l_bias, (heads, num_global)),
                               ("l2g_bias", l2g_bias, (heads, num_global)),
                               ("g2g_bias", g2g_bias, (heads, num_global, num_global))):
        if table is not None and tuple(table.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(table.shape)}")
    if num_global and g2l_bias is not None:
        block = g2l_bias.to(compute)[:, :, None].expand(heads, num_global, n_local)
        bias = bias + torch.nn.functional.pad(block, (num_global, 0, 0, n_local))
    if num_global and l2g_bias is not None:
        block = l2g_bias.to(compute)[:, None, :].expand(heads, n_local, num_global)
        bias = bias + torch.nn.functional.pad(block, (0, n_local, num_global, 0))
    if num_global and g2g_bias is not None:
        bias = bias + torch.nn.functional.pad(g2g_bias.to(compute), (0, n_local, 0, n_local))
    return bias, visible


def vil_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            map_hw: tuple[int, int], num_global: int, window: int, mode: str = "chunk",
                            scale: float | None = None, local_bias: torch.Tensor | None = None,
                            g2l_bias: torch.Tensor | None = None, l2g_bias: torch.Tensor | None = None,
                            g2g_bias: torch.Tensor | None = None, neighbour: int | None = None) -> torch.Tensor:
    """ViL attention by its definition: dense scores, exact mask and biases, softmax in fp32 (in fp64
    for fp64 inputs: the oracle the GPU tests measure fp32 rounding against).

    Returns ``(B, heads, N, d)`` in the dtype of ``q``.
    """
    validate_problem(q, k, v, map_hw=map_hw, num_global=num_global, window=window, mode=mode, neighbour=neighbour)
    heads, head_dim = q.shape[1], q.shape[3]
    scale = head_dim ** -0.5 if scale is None else scale
    bias, visible = dense_bias_and_mask(
        map_hw, num_global, window, mode, heads, local_bias=local_bias, g2l_bias=g2l_bias,
        l2g_bias=l2g_bias, g2g_bias=g2g_bias, device=q.device, neighbour=neighbour)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(compute), k.to(compute)) * scale + bias  # (B, h, N, N)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.to(compute)).to(q.dtype)
