"""Host side of the chunk-tiled kernels (``_triton_chunks``): the problems they take, the bias tiles,
and the launches of the local part of forward and backward (local queries and local keys).
``triton_attention`` runs the global queries and keys with its split kernels either way, and picks
these kernels or the query-tile ones (``_triton_vil``) per call.

Nothing here touches CUDA at import time, nor imports triton.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from vilscale.kernels import _launch
from vilscale.kernels.reference import AttentionProblem, neighbour_offset

BLOCK = 64  # rows of a query or key block (``_triton_chunks.BLOCK``)
MAX_SUB = 2  # blocks per chunk: windows up to 11 (a 12x12 chunk would take 3 blocks, and 9 * 9 bias tiles)
MAX_HEAD_DIM = 64  # every ViL variant's; larger head dims take the query-tile kernels (not compiled for sm_90 here)
OWN = 4  # the own chunk among the 9 neighbours, row-major
# (num_warps, num_stages) the chunk kernels are autotuned over on GPU. Every one of them is compiled for sm_90
# by benchmarks/kernel_static.py and tests/test_kernels_static.py (no spills, wgmma products).
CHUNK_CONFIGS = ((4, 2), (4, 3))
INTERPRETER_STAGES = 2
# VILSCALE_TRITON_CHUNK_CONFIG=WARPSxSTAGES (e.g. 4x2) runs the chunk kernels at that one configuration.
FIXED_CHUNK_CONFIG_ENV = "VILSCALE_TRITON_CHUNK_CONFIG"
# The table-gradient kernel sums each (head, neighbour) tile over groups of query chunks; about this many
# groups per neighbour keep the GPU busy while the partial tiles stay small (16 KiB each). Under the
# interpreter, where every program costs its set-up again, one group (the tests set more to cover groups).
BIAS_GROUPS = 64
INTERPRETER_BIAS_GROUPS = 1


def sub_blocks(window: int) -> int:
    """Blocks of BLOCK rows a chunk of ``window x window`` tokens takes."""
    return -(-window * window // BLOCK)


def refusal(problem: AttentionProblem, head_dim: int) -> str | None:
    """Why the chunk kernels cannot run ``problem`` (then the query-tile kernels do), or None."""
    if problem.mode != "chunk":
        return f"window mode {problem.mode!r} (chunk mode only)"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} (at most {MAX_HEAD_DIM})"
    if sub_blocks(problem.window) > MAX_SUB:
        return f"window {problem.window} (chunks of more than {MAX_SUB * BLOCK} tokens)"
    return None


def fixed_config() -> tuple[int, int] | None:
    """The configuration named by VILSCALE_TRITON_CHUNK_CONFIG, or None (autotune)."""
    value = os.environ.get(FIXED_CHUNK_CONFIG_ENV, "").strip()
    if not value:
        return None
    try:
        config = tuple(int(part) for part in value.lower().split("x"))
    except ValueError:
        config = ()
    if config not in CHUNK_CONFIGS:
        valid = ", ".join("x".join(map(str, c)) for c in CHUNK_CONFIGS)
        raise ValueError(f"{FIXED_CHUNK_CONFIG_ENV}={value!r} is not a known configuration; valid: {valid}")
    return config


@functools.lru_cache(maxsize=1)
def _kernels():
    from vilscale.kernels import _triton_chunks

    assert _triton_chunks.BLOCK == BLOCK
    return _triton_chunks


KERNEL_NAMES = ("fwd_chunk_kernel", "bwd_chunk_dq_kernel", "bwd_chunk_dkdv_kernel", "bwd_chunk_bias_kernel")


@functools.lru_cache(maxsize=1)
def launchers() -> dict:
    """The four kernels, autotuned over CHUNK_CONFIGS on GPU, plain under the interpreter."""
    import triton

    kernels = _kernels()
    chosen = fixed_config()
    wrapped = {}
    for name in KERNEL_NAMES:
        kernel = getattr(kernels, name)
        if not kernels.INTERPRETED:
            configs = [triton.Config({"NUM_STAGES": stages}, num_warps=warps, num_stages=stages)
                       for warps, stages in ([chosen] if chosen else CHUNK_CONFIGS)]
            kernel = triton.autotune(configs, key=["H", "W", "G", "WINDOW", "ALL_NB", "HEAD_DIM"])(kernel)
        wrapped[name] = kernel
    return wrapped


def _stages() -> dict:
    return {"NUM_STAGES": INTERPRETER_STAGES} if _kernels().INTERPRETED else {}


# ----------------------------------------------------------------------------------------------
# bias tiles
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _tile_geometry(height: int, width: int, window: int, device: torch.device):
    """For every tile (neighbour, query sub-block, key sub-block; query row, key column): its entry of the
    local table, ``index`` (9, SUB, SUB, BLOCK, BLOCK), clamped where a row or column is no token; and
    which key columns are tokens, ``key_real`` (4 classes, SUB, BLOCK): class 2 * (key chunk cut by the
    bottom edge) + (cut by the right edge)."""
    w = window
    sub = sub_blocks(w)
    span = 2 * w - 1
    rows = torch.arange(sub * BLOCK)
    ry, rx = rows // w, rows % w
    neighbour = torch.arange(9)
    dy, dx = neighbour // 3 - 1, neighbour % 3 - 1
    off_y = dy[:, None, None] * w + ry[None, None, :] - ry[None, :, None]  # (9, query row, key column)
    off_x = dx[:, None, None] * w + rx[None, None, :] - rx[None, :, None]
    index = (off_y.clamp(-span, span) + span) * (2 * span + 1) + (off_x.clamp(-span, span) + span)
    index = index.view(9, sub, BLOCK, sub, BLOCK).permute(0, 1, 3, 2, 4).contiguous()
    cut_rows = height - (-(-height // w) - 1) * w  # real rows of the last chunk row (w when not cut)
    cut_cols = width - (-(-width // w) - 1) * w
    cut = torch.arange(4)
    limit_y = torch.where(cut // 2 == 1, cut_rows, w)
    limit_x = torch.where(cut % 2 == 1, cut_cols, w)
    key_real = (rows < w * w)[None, :] & (ry[None, :] < limit_y[:, None]) & (rx[None, :] < limit_x[:, None])
    return index.to(device), key_real.view(4, sub, BLOCK).to(device)


def bias_tiles(local_bias: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
    """(heads, 9, 4, SUB, SUB, BLOCK, BLOCK) fp32: ``local_bias / scale`` of every (query, key) of every tile,
    -inf where the key is no token (see ``_triton_chunks``). fp32, not the inputs' dtype: a tile is the
    accumulator's initial value, and bf16 tiles cost more instructions per score than they save (their
    conversion; measured in benchmarks/kernel_static.py) and round the bias."""
    index, key_real = _tile_geometry(*problem.map_hw, problem.window, local_bias.device)
    heads, sub = local_bias.shape[0], index.shape[1]
    values = local_bias.detach().float()[:, index.view(-1)].view(heads, 9, 1, sub, sub, BLOCK, BLOCK)
    values = values * (1.0 / problem.scale)
    mask = key_real.view(1, 1, 4, 1, sub, 1, BLOCK)
    return torch.where(mask, values, float("-inf"))


def _flat_with_empty(tiles: torch.Tensor) -> torch.Tensor:
    """The tiles, flat and contiguous, followed by one all -inf tile (block b of a step past the walk's end)."""
    empty = torch.full((BLOCK * BLOCK,), float("-inf"), dtype=tiles.dtype, device=tiles.device)
    return torch.cat([tiles.reshape(-1), empty])


def _neighbours(problem: AttentionProblem) -> list[int]:
    """The neighbours (0..8) whose tiles a query chunk uses, in the order of the table-gradient kernel's slots."""
    if problem.neighbour is None:
        return list(range(9))
    return [OWN] if problem.neighbour == OWN else [OWN, problem.neighbour]


def _diagonal_sums(m: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> (..., 2n - 1): entry ``a`` sums ``m[i, i + a - (n - 1)]`` over i (fixed order)."""
    n = m.shape[-1]
    padded = F.pad(m, (n - 1, n - 1)).contiguous()  # (..., n, 3n - 2)
    skewed = padded.as_strided((*padded.shape[:-2], n, 2 * n - 1), (*padded.stride()[:-2], 3 * n - 1, 1))
    return skewed.sum(-2)


def table_gradient(tile_grads: torch.Tensor, problem: AttentionProblem) -> torch.Tensor:
    """The local table's gradient (heads, (4w-1)^2) from the gradients of the tiles of each neighbour
    (heads, neighbours, SUB, SUB, BLOCK, BLOCK): every pair of tokens summed into its offset, in fixed order."""
    w = problem.window
    heads, n_neighbours, sub = tile_grads.shape[:3]
    pairs = tile_grads.permute(0, 1, 2, 4, 3, 5).reshape(heads, n_neighbours, sub * BLOCK, sub * BLOCK)
    pairs = pairs[:, :, :w * w, :w * w].reshape(heads, n_neighbours, w, w, w, w)  # [qy, qx, ky, kx]
    by_dy = _diagonal_sums(pairs.permute(0, 1, 3, 5, 2, 4))  # (heads, nb, qx, kx, dy + w - 1)
    by_offset = _diagonal_sums(by_dy.permute(0, 1, 4, 2, 3))  # (heads, nb, dy + w - 1, dx + w - 1)
    side = 4 * w - 1
    table = torch.zeros(heads, side, side, dtype=torch.float32, device=tile_grads.device)
    for slot, neighbour in enumerate(_neighbours(problem)):
        ny, nx = neighbour_offset(neighbour)
        table[:, (ny + 1) * w:(ny + 1) * w + 2 * w - 1, (nx + 1) * w:(nx + 1) * w + 2 * w - 1] += by_offset[:, slot]
    return table.view(heads, side * side)


# ----------------------------------------------------------------------------------------------
# launches
# ----------------------------------------------------------------------------------------------

def _shape(problem: AttentionProblem) -> tuple[tuple[int, int], dict, int, int]:
    """((nb_y, nb_x), constexprs of the window and neighbours, number of chunks, sub-blocks per chunk)."""
    height, width = problem.map_hw
    w = problem.window
    sub = sub_blocks(w)
    offset = (0, 0) if problem.neighbour is None else neighbour_offset(problem.neighbour)
    n_chunks = -(-height // w) * -(-width // w)
    return offset, dict(WINDOW=w, ALL_NB=problem.neighbour is None, BLOCK=BLOCK, SUB=sub), n_chunks, sub


def forward_local(q, k, v, out, lse, strides, local_bias, l2g, problem: AttentionProblem, common: dict,
                  qk_scale: float) -> None:
    """Output and log-sum-exp of every local query (global keys included)."""
    batch, heads = q.shape[:2]
    height, width = problem.map_hw
    (nb_y, nb_x), shape, n_chunks, sub = _shape(problem)
    tiles = _flat_with_empty(bias_tiles(local_bias, problem)) if local_bias is not None else lse
    args = (q, k, v, out, lse, tiles, lse if l2g is None else l2g, *strides, heads, problem.num_global, height,
            width, qk_scale, 1.0 / problem.scale, nb_y, nb_x)
    kwargs = dict(HAS_LB=local_bias is not None, HAS_L2G=l2g is not None, **shape, **common, **_stages())
    _launch.launch(launchers()["fwd_chunk_kernel"], (n_chunks * sub, batch * heads), args, kwargs)


def backward_local(q, k, v, grad_out, lse, delta, dq, dk, dv, strides, local_bias, g2l, l2g,
                   problem: AttentionProblem, common: dict, qk_scale: float, table_grad: bool):
    """dq, dk, dv of the local tokens (written into ``dq``, ``dk``, ``dv``) and the local table's gradient
    (or None when ``table_grad`` is off)."""
    batch, heads = q.shape[:2]
    height, width = problem.map_hw
    (nb_y, nb_x), shape, n_chunks, sub = _shape(problem)
    has_lb = local_bias is not None
    tiles = tiles_t = lse
    if has_lb:
        by_pair = bias_tiles(local_bias, problem)
        tiles, tiles_t = _flat_with_empty(by_pair), _flat_with_empty(by_pair.transpose(-1, -2))
    sizes = (heads, problem.num_global, height, width, qk_scale, 1.0 / problem.scale, problem.scale, nb_y, nb_x)
    flags = dict(HAS_LB=has_lb, **shape, **common, **_stages())
    grid = (n_chunks * sub, batch * heads)
    _launch.launch(launchers()["bwd_chunk_dq_kernel"], grid,
                   (q, k, v, grad_out, lse, delta, dq, tiles, lse if l2g is None else l2g, *strides, *sizes),
                   dict(HAS_L2G=l2g is not None, **flags))
    _launch.launch(launchers()["bwd_chunk_dkdv_kernel"], grid,
                   (q, k, v, grad_out, lse, delta, dk, dv, tiles_t, lse if g2l is None else g2l, *strides, *sizes),
                   dict(HAS_G2L=g2l is not None, **flags))
    if not (has_lb and table_grad):
        return None
    neighbours = _neighbours(problem)
    per_group = -(-n_chunks // (INTERPRETER_BIAS_GROUPS if _kernels().INTERPRETED else BIAS_GROUPS))
    groups = -(-n_chunks // per_group)
    parts = torch.empty((heads, len(neighbours), groups, sub, sub, BLOCK, BLOCK), dtype=torch.float32,
                        device=q.device)
    bias_flags = {key: value for key, value in flags.items() if key not in ("HAS_LB", "BLOCK_G")}
    _launch.launch(launchers()["bwd_chunk_bias_kernel"], (groups * sub, len(neighbours) * sub, heads),
                   (q, k, v, grad_out, lse, delta, tiles, parts, *strides, batch, heads, problem.num_global, height,
                    width, qk_scale, nb_y, nb_x, per_group), bias_flags)
    return table_gradient(parts.sum(2), problem).to(local_bias.dtype)
