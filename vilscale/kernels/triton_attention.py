"""Fused Triton ViL attention: one pass per tile of the map, forward and backward.

Semantics and layout are those of ``vilscale.kernels.reference`` (tokens ``(B, heads, G + H*W, d)``,
global tokens first, ``chunk``/``exact`` windows, four bias tables, ``neighbour`` for the shift modes).

Two sets of kernels take the local queries and keys:
- ``chunks`` (``_triton_chunks``, host side in ``triton_chunks``; chunk mode, windows up to 11): a
  program per chunk of queries, padded to 64 rows, walks the chunks it sees as 64-row key blocks
  (tensor-core products, Hopper's wgmma; no per-score visibility test, the relative-position bias as
  dense tiles). The default wherever it applies.
- ``tiles`` (``_triton_vil``; both window modes): a program per tile of local queries (4x8 to 16x8)
  walks the map rows its tile can see, testing every score's visibility. Exact windows always use it;
  ``kernel="tiles"`` (or ``VILSCALE_TRITON_KERNEL=tiles``) selects it for chunk mode too, so the
  two can be timed side by side on one card.
The chunk kernels have passed the interpreter tests and compile for sm_90 (benchmarks/kernel_static.py)
but have not yet run on a GPU.

Forward: the local kernel runs one online softmax per local query over the global keys and the keys
its window sees; global queries run a split-K flash attention over all tokens, whose partial results
are merged on the host. Saved for backward: q, k, v, the output
and the per-row log-sum-exp (no tokens x window tensor), plus the fp32 output of the few global
rows (G x d per batch and head).

Backward recomputes the scores: dq per block of local queries, dk and dv per block of local keys, the
local table's gradient (per tile of queries with ``tiles``, in a kernel of its own with ``chunks``), and
two split kernels for global queries and global keys. Every partial sum lands in its own slot of a buffer that torch
reduces afterwards, so all gradients, bias tables included, are deterministic: no atomics at all.

Kernels are compiled for CUDA tensors; with ``TRITON_INTERPRET=1`` in the environment before this
module is first imported, they run on CPU tensors through Triton's interpreter (slow, for tests).
Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import functools
import os

import torch

from vilscale.kernels import _launch, triton_chunks
from vilscale.kernels.reference import WINDOW_MODES, AttentionProblem, neighbour_offset, validate_problem

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MAX_HEAD_DIM = 128
MAX_WINDOW = 32
MAX_GRID_Y = 65535  # CUDA limit on the batch x heads grid axis
# Launch configurations (TILE_Y, TILE_X, num_warps) autotuned on GPU; the interpreter uses one fixed tile.
# Chosen from Triton 3.6's sm_90 compile (ptxas -v, bf16/fp16/fp32, head dims 16-128): the dq kernel's
# tl.gather does not lower with fewer than 8 query rows per warp ("GatherLoweringHelper(op).isWarpLocal()"),
# so (4, 8) runs with 4 warps only; (8, 8), (8, 16) and (16, 8) with 4 warps spill (up to 1.6 KiB per
# thread in bf16 at head dim 64, more in fp32), with 8 warps they spill little or nothing. Every
# configuration costs a compile per new shape, so the list is kept to what can win.
GPU_CONFIGS = ((4, 8, 4), (8, 8, 8), (8, 16, 8), (16, 8, 8))
GPU_TILES = tuple(sorted({(ty, tx) for ty, tx, _ in GPU_CONFIGS}))
INTERPRETER_TILE = (4, 8)
# VILSCALE_TRITON_CONFIG=TYxTXxWARPS (e.g. 8x8x4) runs every tiled kernel at that one configuration, without
# the autotuning sweep: for test runs on a GPU, where each new shape would otherwise compile every configuration.
FIXED_CONFIG_ENV = "VILSCALE_TRITON_CONFIG"
# Global queries/keys see every token; their kernels cut the local tokens into splits of this many
# tokens (one program each) whose partial results are reduced on the host.
GLOBAL_SPLIT_TOKENS = 1024
BLOCK_G = 16
# Which kernels take the local queries and keys (see the module docstring); the default follows
# VILSCALE_TRITON_KERNEL (unset: tiles; the chunk kernels only when chosen, until they have run on a GPU).
KERNELS = ("chunks", "tiles")
KERNEL_ENV = "VILSCALE_TRITON_KERNEL"


def default_kernel() -> str:
    value = os.environ.get(KERNEL_ENV, "").strip() or "tiles"
    if value not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={value!r} is not one of {KERNELS}")
    return value


def local_kernel(problem: AttentionProblem, requested: str | None, head_dim: int) -> str:
    """The kernels that run ``problem``'s local part: ``requested`` (None: ``default_kernel()``) unless the
    chunk kernels refuse the problem (exact windows, windows above 11, head dims above 64)."""
    requested = requested or default_kernel()
    if requested not in KERNELS:
        raise ValueError(f"kernel {requested!r} is not one of {KERNELS}")
    if requested == "chunks" and triton_chunks.refusal(problem, head_dim) is None:
        return "chunks"
    return "tiles"


def _next_pow2(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


@functools.lru_cache(maxsize=1)
def _kernels():
    """The kernel module (imported on first use; raises ImportError when triton is missing)."""
    from vilscale.kernels import _triton_vil

    return _triton_vil


# The dq kernel gathers along rows of MIN_ROW columns or more: Triton 3.6's sm_90 lowering of tl.gather
# fails ("GatherLoweringHelper(op).isWarpLocal()") for 16-column operands at 4 and 8 warps (compile sweep
# over windows 2-12, both window modes and every configuration).
MIN_ROW = 32


def key_width(tile_x: int, window: int, chunk: bool, width: int) -> int:
    """Length (a power of two, >= MIN_ROW) of the map row segment a tile of ``tile_x`` columns can see."""
    if chunk:
        chunks_spanned = -(-(tile_x - 1) // window) + 1
        needed = (chunks_spanned + 2) * window
    else:
        needed = tile_x + 2 * window
    return max(MIN_ROW, _next_pow2(min(needed, width)))


def _heuristic_key_width(args) -> int:
    return key_width(args["TILE_X"], args["WINDOW"], args["CHUNK"], args["W"])


def fixed_config() -> tuple[int, int, int] | None:
    """The configuration named by VILSCALE_TRITON_CONFIG, or None (autotune)."""
    value = os.environ.get(FIXED_CONFIG_ENV, "").strip()
    if not value:
        return None
    try:
        config = tuple(int(part) for part in value.lower().split("x"))
    except ValueError:
        config = ()
    if config not in GPU_CONFIGS:
        valid = ", ".join("x".join(map(str, c)) for c in GPU_CONFIGS)
        raise ValueError(f"{FIXED_CONFIG_ENV}={value!r} is not a known configuration; valid: {valid}")
    return config


@functools.lru_cache(maxsize=1)
def _local_launchers():
    """The three tiled kernels, autotuned over GPU_CONFIGS on GPU, fixed under the interpreter."""
    import triton

    kernels = _kernels()
    wrapped = {}
    chosen = fixed_config()
    for name in ("fwd_local_kernel", "bwd_local_dq_kernel", "bwd_local_dkdv_kernel"):
        kernel = triton.heuristics({"KEY_W": _heuristic_key_width})(getattr(kernels, name))
        if not kernels.INTERPRETED:
            configs = [triton.Config({"TILE_Y": ty, "TILE_X": tx}, num_warps=warps)
                       for ty, tx, warps in ([chosen] if chosen else GPU_CONFIGS)]
            kernel = triton.autotune(configs, key=["H", "W", "G", "WINDOW", "CHUNK", "ALL_NB", "HEAD_DIM"])(kernel)
        wrapped[name] = kernel
    return wrapped


def _launch_local(name: str, grid_bh: int, height: int, width: int, *args, **kwargs) -> tuple[int, int]:
    """Launch a tiled kernel; returns the tile shape it ran with."""
    kernel = _local_launchers()[name]

    def grid(meta):
        return (triton_cdiv(height, meta["TILE_Y"]) * triton_cdiv(width, meta["TILE_X"]), grid_bh)

    if _kernels().INTERPRETED:
        tile_y, tile_x = INTERPRETER_TILE
        _launch.launch(kernel, grid, args, {**kwargs, "TILE_Y": tile_y, "TILE_X": tile_x})
        return tile_y, tile_x
    _launch.launch(kernel, grid, args, kwargs)
    if _launch.recording():  # nothing ran: the static check sizes buffers for the largest tile count
        return GPU_TILES[0]
    best = kernel.best_config.kwargs
    return best["TILE_Y"], best["TILE_X"]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _max_tiles(height: int, width: int) -> int:
    tiles = [INTERPRETER_TILE] if _kernels().INTERPRETED else GPU_TILES
    return max(triton_cdiv(height, ty) * triton_cdiv(width, tx) for ty, tx in tiles)


def _neighbour_args(problem: AttentionProblem) -> dict:
    """Kernel arguments for the chunks a local query sees: all 9, or its own and one at (nb_y, nb_x)."""
    if problem.neighbour is None:
        return dict(nb_y=0, nb_x=0, ALL_NB=True)
    nb_y, nb_x = neighbour_offset(problem.neighbour)
    return dict(nb_y=nb_y, nb_x=nb_x, ALL_NB=False)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q: torch.Tensor, problem: AttentionProblem) -> dict:
    kernels = _kernels()
    head_dim = q.shape[3]
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, _next_pow2(head_dim)), BLOCK_G=BLOCK_G,
                PRECISE=q.dtype == torch.float32,
                UPCAST=kernels.INTERPRETED and q.dtype == torch.bfloat16)


def _global_common(common: dict) -> dict:
    """The global kernels upcast their operands and multiply in full fp32 (see _triton_vil)."""
    return {**common, "PRECISE": True, "UPCAST": False}


def _global_split(n_local: int) -> tuple[int, int, int]:
    """(block of tokens, tokens per split, number of splits) for the global kernels."""
    block_n = 16 if _kernels().INTERPRETED else 64
    split = max(block_n, triton_cdiv(GLOBAL_SPLIT_TOKENS, block_n) * block_n)
    return block_n, split, triton_cdiv(n_local, split)


def _forward(q, k, v, tables, problem: AttentionProblem, kernel: str):
    kernels = _kernels()
    local_bias, g2l, l2g, g2g = tables
    batch, heads, n_tokens, head_dim = q.shape
    height, width = problem.map_hw
    n_global = problem.num_global
    n_local = height * width
    qk_scale = problem.scale * kernels.LOG2E
    common = _common(q, problem)
    out = torch.empty((batch, heads, n_tokens, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch * heads, n_tokens), dtype=torch.float32, device=q.device)
    strides = (*_strides(q), *_strides(k), *_strides(v))
    dummy = lse  # stands in for absent tables; never read (the HAS_* flags are off)

    if kernel == "chunks":
        triton_chunks.forward_local(q, k, v, out, lse, strides, local_bias, l2g, problem, common, qk_scale)
    else:
        _launch_local("fwd_local_kernel", batch * heads, height, width,
                      q, k, v, out, lse, _or(local_bias, dummy), _or(l2g, dummy), *strides,
                      heads, n_global, height, width, qk_scale,
                      WINDOW=problem.window, CHUNK=problem.mode == "chunk",
                      HAS_LB=local_bias is not None, HAS_L2G=l2g is not None, **_neighbour_args(problem), **common)
    if n_global:
        block_n, split, n_splits = _global_split(n_local)
        part_o = torch.empty((n_splits, batch * heads, n_global, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((n_splits, batch * heads, n_global), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        grid = (n_splits, triton_cdiv(n_global, BLOCK_G), batch * heads)
        _launch.launch(kernels.fwd_global_kernel, grid,
                       (q, k, v, part_o, part_m, part_l, _or(g2l, dummy), _or(g2g, dummy), *strides,
                        heads, n_global, n_local, split, qk_scale),
                       dict(BLOCK_N=block_n, HAS_G2L=g2l is not None, HAS_G2G=g2g is not None,
                            **_global_common(common)))
        row_max = part_m.amax(0)
        weight = torch.exp2(part_m - row_max)
        total = (part_l * weight).sum(0)
        merged = (part_o * weight[..., None]).sum(0) / total[..., None]
        out[:, :, :n_global] = merged.view(batch, heads, n_global, head_dim).to(q.dtype)
        lse[:, :n_global] = row_max + torch.log2(total)
        return out, lse, merged
    return out, lse, None


def _or(table, dummy):
    return dummy if table is None else table


def _backward(grad_out, q, k, v, out, lse, global_out, tables, problem: AttentionProblem, kernel: str,
              needs_table_grad):
    kernels = _kernels()
    local_bias, g2l, l2g, g2g = tables
    batch, heads, n_tokens, head_dim = q.shape
    height, width = problem.map_hw
    n_global = problem.num_global
    n_local = height * width
    qk_scale = problem.scale * kernels.LOG2E
    common = _common(q, problem)
    device = q.device
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, heads, N): rowsum(dO * O)
    if global_out is not None:
        # The g2l gradient of a global query sums ds over all its local keys, and that sum nearly
        # cancels (sum_k ds_k = 0 over all keys); delta from the fp32 output keeps bf16/fp16 exact there.
        delta[:, :, :n_global] = (grad_out[:, :, :n_global].float() * global_out.view_as(
            grad_out[:, :, :n_global])).sum(-1)
    dq = torch.empty((batch, heads, n_tokens, head_dim), dtype=q.dtype, device=device)
    dk = torch.empty_like(dq, dtype=k.dtype)
    dv = torch.empty_like(dq, dtype=v.dtype)
    strides = (*_strides(q), *_strides(k), *_strides(v))
    dummy = lse

    d_g2l = d_l2g = d_g2g = None
    if kernel == "chunks":
        d_local_bias = triton_chunks.backward_local(
            q, k, v, grad_out, lse, delta, dq, dk, dv, strides, local_bias, g2l, l2g, problem, common, qk_scale,
            table_grad=needs_table_grad[0])
    else:
        d_local_bias = _backward_local_tiles(q, k, v, grad_out, lse, delta, dq, dk, dv, strides, tables, problem,
                                             common, qk_scale, needs_table_grad[0])

    if n_global:
        block_n, split, n_splits = _global_split(n_local)
        bh = batch * heads
        grid = (n_splits, triton_cdiv(n_global, BLOCK_G), bh)
        part_dq = torch.empty((n_splits, bh, n_global, head_dim), dtype=torch.float32, device=device)
        keep_gg = (g2l is not None and needs_table_grad[1]) or (g2g is not None and needs_table_grad[3])
        part_gg = torch.empty((bh, n_global, n_global), dtype=torch.float32, device=device) if keep_gg else dummy
        _launch.launch(kernels.bwd_global_dq_kernel, grid,
                       (q, k, v, grad_out, lse, delta, part_dq, part_gg, _or(g2l, dummy), _or(g2g, dummy),
                        *strides, heads, n_global, n_local, split, qk_scale),
                       dict(BLOCK_N=block_n, HAS_G2L=g2l is not None, HAS_G2G=g2g is not None, KEEP_GG=keep_gg,
                            **_global_common(common)))
        part_dk = torch.empty((n_splits, bh, n_global, head_dim), dtype=torch.float32, device=device)
        part_dv = torch.empty_like(part_dk)
        part_l2g = torch.empty((n_splits, bh, n_global), dtype=torch.float32, device=device)
        _launch.launch(kernels.bwd_global_dkdv_kernel, grid,
                       (q, k, v, grad_out, lse, delta, part_dk, part_dv, part_l2g, _or(l2g, dummy), _or(g2g, dummy),
                        *strides, heads, n_global, n_local, split, qk_scale),
                       dict(BLOCK_N=block_n, HAS_L2G=l2g is not None, HAS_G2G=g2g is not None,
                            **_global_common(common)))
        dq[:, :, :n_global] = (part_dq.sum(0) * problem.scale).view(batch, heads, n_global, head_dim)
        dk[:, :, :n_global] = (part_dk.sum(0) * problem.scale).view(batch, heads, n_global, head_dim)
        dv[:, :, :n_global] = part_dv.sum(0).view(batch, heads, n_global, head_dim)
        if keep_gg:
            global_ds = part_gg.view(batch, heads, n_global, n_global)  # ds of (global query, global key)
            if g2l is not None:
                # every row of ds sums to 0 over all keys: the local keys' share is minus the global keys'
                d_g2l = (-global_ds.sum(-1)).sum(0).to(g2l.dtype)
            if g2g is not None:
                d_g2g = global_ds.sum(0).to(g2g.dtype)
        if l2g is not None:
            d_l2g = part_l2g.sum(0).view(batch, heads, n_global).sum(0).to(l2g.dtype)
    return dq, dk, dv, d_local_bias, d_g2l, d_l2g, d_g2g


def _backward_local_tiles(q, k, v, grad_out, lse, delta, dq, dk, dv, strides, tables, problem: AttentionProblem,
                          common: dict, qk_scale: float, table_grad: bool):
    """The ``tiles`` kernels' local backward: dq (and each tile's partial local-table gradient), dk, dv."""
    local_bias, g2l, l2g, _ = tables
    batch, heads = q.shape[:2]
    height, width = problem.map_hw
    n_global = problem.num_global
    window = problem.window
    chunk = problem.mode == "chunk"
    device = q.device
    dummy = lse
    radius = 2 * window - 1 if chunk else window
    offsets = max(MIN_ROW, _next_pow2(2 * radius + 1))
    lb_grad = local_bias is not None and table_grad
    if lb_grad:
        lb_parts = torch.empty((batch * heads * _max_tiles(height, width), offsets, offsets),
                               dtype=torch.float32, device=device)
    else:
        lb_parts = dummy
    tile_y, tile_x = _launch_local(
        "bwd_local_dq_kernel", batch * heads, height, width,
        q, k, v, grad_out, lse, delta, dq, _or(local_bias, dummy), _or(l2g, dummy), lb_parts, *strides,
        heads, n_global, height, width, qk_scale, problem.scale,
        WINDOW=window, CHUNK=chunk, HAS_LB=local_bias is not None, HAS_L2G=l2g is not None,
        LB_GRAD=lb_grad, RADIUS=radius, OFFSETS=offsets, **_neighbour_args(problem), **common)
    _launch_local(
        "bwd_local_dkdv_kernel", batch * heads, height, width,
        q, k, v, grad_out, lse, delta, dk, dv, _or(local_bias, dummy), _or(g2l, dummy), *strides,
        heads, n_global, height, width, qk_scale, problem.scale,
        WINDOW=window, CHUNK=chunk, HAS_LB=local_bias is not None, HAS_G2L=g2l is not None,
        **_neighbour_args(problem), **common)

    d_local_bias = None
    if lb_grad:
        n_tiles = triton_cdiv(height, tile_y) * triton_cdiv(width, tile_x)
        grid_sum = lb_parts[:batch * heads * n_tiles].view(batch, heads, n_tiles, offsets, offsets).sum((0, 2))
        side = 4 * window - 1
        start = 2 * window - 1 - radius
        table = torch.zeros((heads, side, side), dtype=torch.float32, device=device)
        table[:, start:start + 2 * radius + 1, start:start + 2 * radius + 1] = \
            grid_sum[:, :2 * radius + 1, :2 * radius + 1]
        d_local_bias = table.view(heads, side * side).to(local_bias.dtype)
    return d_local_bias


class ViLAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, problem, kernel)``,
    ``kernel`` one of KERNELS (see ``local_kernel``)."""

    @staticmethod
    def forward(ctx, q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, problem: AttentionProblem, kernel: str):
        tables = (local_bias, g2l_bias, l2g_bias, g2g_bias)
        out, lse, global_out = _forward(q, k, v, tables, problem, kernel)
        ctx.save_for_backward(q, k, v, out, lse, global_out, *tables)
        ctx.problem = problem
        ctx.kernel = kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, global_out, *tables = ctx.saved_tensors
        grads = _backward(grad_out, q, k, v, out, lse, global_out, tables, ctx.problem, ctx.kernel,
                          ctx.needs_input_grad[3:7])
        return (*grads, None, None)


def _table(table, name, shape, device):
    """The table as a contiguous tensor on the device of q, or None when absent or empty."""
    if table is None:
        return None
    if tuple(table.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(table.shape)}")
    if table.device != device:
        raise ValueError(f"{name} is on {table.device} but q is on {device}; move the tables to q's device")
    if table.numel() == 0:
        return None
    return table.contiguous()


def vil_attention_triton(q, k, v, *, map_hw, num_global, window, mode="chunk", scale=None, local_bias=None,
                         g2l_bias=None, l2g_bias=None, g2g_bias=None, neighbour=None, kernel=None) -> torch.Tensor:
    """ViL attention through the fused kernels; differentiable w.r.t. q, k, v and every table. ``kernel``
    (``chunks`` or ``tiles``; default ``VILSCALE_TRITON_KERNEL``, else ``chunks``) picks the local kernels
    where both apply (see ``local_kernel``)."""
    validate_problem(q, k, v, map_hw=map_hw, num_global=num_global, window=window, mode=mode, neighbour=neighbour)
    reason = BACKEND.can_run(q, map_hw=map_hw, num_global=num_global, window=window, mode=mode)
    if reason is not None:
        raise ValueError(f"the triton backend cannot run this problem: {reason}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    heads, head_dim = q.shape[1], q.shape[3]
    side = (4 * window - 1) ** 2
    tables = (_table(local_bias, "local_bias", (heads, side), q.device),
              _table(g2l_bias, "g2l_bias", (heads, num_global), q.device),
              _table(l2g_bias, "l2g_bias", (heads, num_global), q.device),
              _table(g2g_bias, "g2g_bias", (heads, num_global, num_global), q.device))
    problem = AttentionProblem.of(head_dim, map_hw=map_hw, num_global=num_global, window=window, mode=mode,
                                  neighbour=neighbour, scale=scale)
    out = ViLAttentionFunction.apply(q, k, v, *tables, problem, local_kernel(problem, kernel, head_dim))
    # Empty tables (no global tokens) still get a (zero-size) gradient through this no-op.
    for table in (g2l_bias, l2g_bias, g2g_bias):
        if table is not None and table.numel() == 0 and table.requires_grad:
            out = out + table.sum().to(out.dtype)
    return out


class _TritonBackend:
    name = "triton"

    def can_run(self, q, *, map_hw, num_global, window, mode) -> str | None:
        try:
            kernels = _kernels()
        except ImportError as error:
            return f"triton is not importable ({error}); install it with `pip install triton`"
        if q.dtype not in DTYPE_NAMES:
            return f"dtype {q.dtype} is not supported; use one of {list(DTYPE_NAMES)}"
        head_dim = q.shape[-1]
        if head_dim % 16 or not 16 <= head_dim <= MAX_HEAD_DIM:
            return f"head dim {head_dim} is not supported; it must be a multiple of 16 up to {MAX_HEAD_DIM}"
        if mode not in WINDOW_MODES:
            return f"window mode {mode!r} is not one of {WINDOW_MODES}"
        if not 1 <= window <= MAX_WINDOW:
            return f"window {window} is outside the supported range 1..{MAX_WINDOW}"
        extent = sum((size - 1) * stride for size, stride in zip(q.shape, q.stride())) + 1
        if extent >= 2**31 or q.numel() >= 2**31:  # offsets into q, k, v, o, dq, dk, dv are int32
            return f"q spans {extent} elements, beyond the kernels' int32 offsets: split the batch"
        if q.shape[0] * q.shape[1] > MAX_GRID_Y:
            return f"batch x heads = {q.shape[0] * q.shape[1]} exceeds {MAX_GRID_Y} (CUDA grid limit)"
        if q.device.type == "cuda":
            if kernels.INTERPRETED:
                return None
            major, minor = torch.cuda.get_device_capability(q.device)
            if major < 7:
                return f"CUDA capability {major}.{minor} is too old for Triton; it needs 7.0 or newer"
            if q.dtype == torch.bfloat16 and major < 8:
                return f"bf16 needs CUDA capability 8.0 or newer, this device has {major}.{minor}; use fp16"
            return None
        if q.device.type == "cpu":
            if kernels.INTERPRETED:
                return None
            return ("q is on the CPU and Triton's interpreter is off: use a CUDA device, or set "
                    "TRITON_INTERPRET=1 before the process starts to run the kernels (slowly) on CPU")
        return f"device type {q.device.type!r} is not supported; use CUDA (or CPU with TRITON_INTERPRET=1)"

    def forward(self, q, k, v, *, map_hw, num_global, window, mode, scale=None, local_bias=None, g2l_bias=None,
                l2g_bias=None, g2g_bias=None, neighbour=None):
        return vil_attention_triton(q, k, v, map_hw=map_hw, num_global=num_global, window=window, mode=mode,
                                    scale=scale, local_bias=local_bias, g2l_bias=g2l_bias, l2g_bias=l2g_bias,
                                    g2g_bias=g2g_bias, neighbour=neighbour)


BACKEND = _TritonBackend()

__all__ = ["BACKEND", "KERNELS", "ViLAttentionFunction", "key_width", "local_kernel", "vil_attention_triton"]
