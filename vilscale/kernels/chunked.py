"""ViL attention in plain PyTorch with memory linear in the number of tokens.

The local map is zero-padded right/bottom to a multiple of the window ``w`` and cut into ``w x w``
chunks. Every chunk gathers the keys and values of the chunks it may see (its 3x3 neighbourhood,
``9 w^2`` tokens, or fewer with a ``neighbour``) and the global tokens, so the local scores are
``(B, heads, chunks, w^2, G + 9 w^2)``: O(N * w^2), never N x N.

Both window modes use the same gather, because the exact window ``|dy|, |dx| <= w`` of a query
always lies inside the 3x3 chunks around it; the modes differ only in the mask:
- ``chunk``: every key of the neighbourhood that lies inside the map is visible;
- ``exact``: additionally ``|dy| <= w`` and ``|dx| <= w``.
Keys in the padding or outside the map are masked, never shifted, exactly as in
``vilscale.kernels.reference``. Global queries attend to all real tokens with dense ``(G, N)``
scores, which are linear in N too.

Forward and backward are written by hand (one autograd function), because autograd over the plain
formulation kept two ``9 w^2``-wide copies of the keys and values alive, sliced them back with one
zero-filled buffer per neighbour, and passed over the scores several times more than needed. Here:
- keys and values are laid out once as a flat row of chunks with a zero chunk row above and below
  the map (and one zero chunk at each end), so the chunk at offset ``(oy, ox)`` of every chunk is one
  contiguous slice of that row: gathering a neighbour is one copy, and scattering its gradient back
  is one in-place add, with no per-neighbour buffers. A left or right neighbour that wraps onto the
  previous or next chunk row lies outside the map and is masked like any outside key;
- the forward saves only the probabilities (fp32, what the official implementation keeps too), the
  input ``q``, ``k``, ``v`` and the small global-query probabilities; the chunk layouts and the
  gathered keys and values are rebuilt in backward, which costs copies of ``O(N * d)`` each instead of
  keeping them;
- biases and masks are added in one pass per kind of chunk (interior, first/last rows and columns),
  and the softmax gradient is one fused call.

Softmax runs in fp32 whatever the input dtype (the local matrix products run in the input dtype, as
autocast would; the few global queries run wholly in fp32); gradients reach q, k, v and all four
bias tables.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vilscale.kernels.reference import OWN_CHUNK, neighbour_offset, validate_problem


@dataclass(frozen=True)
class _Geometry:
    """What a chunk sees, for one (map, window, mode, neighbour)."""

    chunks_y: int
    chunks_x: int
    offsets: tuple[tuple[int, int], ...]
    """Chunk offsets (dy, dx) whose keys a chunk gathers, in key order."""
    starts: tuple[int, ...]
    """Per offset: index, in the flat padded chunk row, of that neighbour of chunk 0."""
    table_index: torch.Tensor
    """(w^2, K) index into the local bias table for every (query cell, gathered key); K = len(offsets) w^2."""
    rects: tuple[tuple[int, int, int, int, torch.Tensor | None], ...]
    """(row start, row stop, column start, column stop, visible) for each rectangle of chunks that see
    alike: visible is (K,) or, in exact mode, (w^2, K) bool, or None where every gathered key is visible."""


def _key_offsets(neighbour: int | None) -> tuple[tuple[int, int], ...]:
    if neighbour is None:
        return tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    if neighbour == OWN_CHUNK:
        return ((0, 0),)
    return (0, 0), neighbour_offset(neighbour)


def _runs(valid: torch.Tensor) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """Group consecutive equal rows of a (n, K) bool tensor: (start, stop, row)."""
    runs, start = [], 0
    for index in range(1, valid.shape[0] + 1):
        if index == valid.shape[0] or not torch.equal(valid[index], valid[start]):
            runs.append((start, index, valid[start]))
            start = index
    return tuple(runs)


@functools.lru_cache(maxsize=128)
def _geometry(height: int, width: int, window: int, mode: str, neighbour: int | None, device: torch.device):
    """Built on the CPU (it compares rows) and moved to ``device`` (which may be ``meta``)."""
    w = window
    chunks_y, chunks_x = -(-height // w), -(-width // w)
    offsets = _key_offsets(neighbour)
    cell = torch.arange(w * w)
    cell_y, cell_x = cell // w, cell % w
    key_y = torch.cat([dy * w + cell_y for dy, _ in offsets])  # (K,) relative to the chunk origin
    key_x = torch.cat([dx * w + cell_x for _, dx in offsets])
    dy = key_y[None, :] - cell_y[:, None]  # (w^2, K): key - query
    dx = key_x[None, :] - cell_x[:, None]
    span = 2 * w - 1
    table_index = (dy + span) * (2 * span + 1) + (dx + span)
    absolute_y = torch.arange(chunks_y)[:, None] * w + key_y[None, :]  # (mh, K)
    absolute_x = torch.arange(chunks_x)[:, None] * w + key_x[None, :]  # (mw, K)
    rects = []
    for row_start, row_stop, row_valid in _runs((absolute_y >= 0) & (absolute_y < height)):
        for col_start, col_stop, col_valid in _runs((absolute_x >= 0) & (absolute_x < width)):
            visible = row_valid & col_valid
            if mode == "exact":
                visible = visible & (dy.abs() <= w) & (dx.abs() <= w)
            rects.append((row_start, row_stop, col_start, col_stop, None if visible.all() else visible.to(device)))
    # flat row: [1 zero chunk][a zero chunk row][mh chunk rows][a zero chunk row][1 zero chunk];
    # chunk (my, mx) sits at 1 + (my + 1) * mw + mx, so its neighbour (dy, dx) at c + 1 + (dy + 1) * mw + dx.
    starts = tuple(1 + (oy + 1) * chunks_x + ox for oy, ox in offsets)
    return _Geometry(chunks_y, chunks_x, offsets, starts, table_index.to(device), tuple(rects))


def _flat_size(geometry: _Geometry) -> int:
    return 2 + (geometry.chunks_y + 2) * geometry.chunks_x


def _chunk_view(buffer: torch.Tensor, batch: int, heads: int, geometry: _Geometry, window: int) -> torch.Tensor:
    """A (batch*heads, chunks, w^2, d) contiguous buffer seen as the padded map (B, h, mh, w, mw, w, d)."""
    return buffer.view(batch, heads, geometry.chunks_y, geometry.chunks_x, window, window,
                       buffer.shape[-1]).permute(0, 1, 2, 4, 3, 5, 6)


def _write_chunks(buffer: torch.Tensor, tokens: torch.Tensor, map_hw, geometry: _Geometry, window: int,
                  scale: float | None = None) -> None:
    """buffer (B*h, chunks, w^2, d) <- local tokens (B, h, H*W, d), zero-padded, times ``scale``."""
    batch, heads, _, dim = tokens.shape
    height, width = map_hw
    image = tokens.reshape(batch, heads, height, width, dim)
    padded_h, padded_w = geometry.chunks_y * window, geometry.chunks_x * window
    if (padded_h, padded_w) != (height, width):
        image = F.pad(image, (0, 0, 0, padded_w - width, 0, padded_h - height))
    image = image.reshape(batch, heads, geometry.chunks_y, window, geometry.chunks_x, window, dim)
    target = _chunk_view(buffer, batch, heads, geometry, window)
    if scale is None:
        target.copy_(image)
    else:
        torch.mul(image, scale, out=target)


def _read_chunks(buffer: torch.Tensor, out: torch.Tensor, map_hw, geometry: _Geometry, window: int) -> None:
    """out (B, h, H*W, d) <- buffer (B*h, chunks, w^2, d), padding dropped."""
    batch, heads, _, dim = out.shape
    height, width = map_hw
    chunks = _chunk_view(buffer, batch, heads, geometry, window)
    padded_h, padded_w = geometry.chunks_y * window, geometry.chunks_x * window
    if (padded_h, padded_w) == (height, width):
        out.view(batch, heads, geometry.chunks_y, window, geometry.chunks_x, window, dim).copy_(chunks)
        return
    image = chunks.reshape(batch, heads, padded_h, padded_w, dim)
    out.view(batch, heads, height, width, dim).copy_(image[:, :, :height, :width])


def _flat_chunks(tokens, map_hw, geometry, window, batch_heads) -> torch.Tensor:
    """(B*h, flat, w^2, d): the local tokens in chunks, in the flat padded row of ``_geometry``."""
    flat = tokens.new_empty(batch_heads, _flat_size(geometry), window * window, tokens.shape[-1])
    first, n_chunks = 1 + geometry.chunks_x, geometry.chunks_y * geometry.chunks_x
    flat[:, :first].zero_()
    flat[:, first + n_chunks:].zero_()
    _write_chunks(flat[:, first:first + n_chunks], tokens, map_hw, geometry, window)
    return flat


def _gather(flat: torch.Tensor, global_tokens: torch.Tensor, geometry: _Geometry, window: int) -> torch.Tensor:
    """(B*h, chunks, G + K, d): for every chunk, the global tokens, then its neighbours' tokens."""
    batch_heads, _, w2, dim = flat.shape
    n_chunks, g = geometry.chunks_y * geometry.chunks_x, global_tokens.shape[1]
    near = flat.new_empty(batch_heads, n_chunks, g + len(geometry.offsets) * w2, dim)
    if g:
        near[:, :, :g] = global_tokens[:, None]
    for index, start in enumerate(geometry.starts):
        near[:, :, g + index * w2:g + (index + 1) * w2] = flat[:, start:start + n_chunks]
    return near


def _scatter(near_grad: torch.Tensor, geometry: _Geometry, num_global: int, window: int):
    """Inverse of ``_gather`` for gradients: (flat gradient (B*h, flat, w^2, d), global gradient (B*h, G, d))."""
    batch_heads, n_chunks, _, dim = near_grad.shape
    w2, g = window * window, num_global
    flat = near_grad.new_zeros(batch_heads, _flat_size(geometry), w2, dim)
    for index, start in enumerate(geometry.starts):
        flat[:, start:start + n_chunks] += near_grad[:, :, g + index * w2:g + (index + 1) * w2]
    return flat, near_grad[:, :, :g].sum(1)


def _add_bias_and_mask(scores: torch.Tensor, geometry: _Geometry, bias: torch.Tensor | None, batch: int,
                       heads: int, num_global: int) -> None:
    """scores (B*h, chunks, w^2, G + K) += biases, and -inf where a key is not visible: one pass over
    each rectangle of alike chunks (they differ only at the borders of the chunk grid)."""
    w2, width = scores.shape[2], scores.shape[3]
    grid = scores.view(batch, heads, geometry.chunks_y, geometry.chunks_x, w2, width)
    for row_start, row_stop, col_start, col_stop, visible in geometry.rects:
        if visible is None:
            if bias is None:
                continue
            addend = bias
        else:
            mask = torch.zeros(visible.shape, dtype=scores.dtype, device=scores.device).masked_fill_(
                ~visible, float("-inf"))
            mask = F.pad(mask.expand(w2, -1), (num_global, 0))
            addend = mask if bias is None else bias + mask
        grid[:, :, row_start:row_stop, col_start:col_stop] += addend.view(-1, 1, 1, w2, width)[None]


def _local_bias(local_bias, l2g_bias, geometry: _Geometry, heads: int, num_global: int, w2: int):
    """(heads, w^2, G + K) fp32 bias of every (query cell, gathered key), or None without tables."""
    if local_bias is None and l2g_bias is None:
        return None
    n_keys = geometry.table_index.shape[1]
    device = (local_bias if local_bias is not None else l2g_bias).device
    bias = torch.zeros(heads, w2, num_global + n_keys, dtype=torch.float32, device=device)
    if local_bias is not None:
        bias[:, :, num_global:] = local_bias.float()[:, geometry.table_index]
    if l2g_bias is not None and num_global:
        bias[:, :, :num_global] = l2g_bias.float()[:, None, :]
    return bias


@dataclass(frozen=True)
class _Problem:
    map_hw: tuple[int, int]
    num_global: int
    window: int
    mode: str
    neighbour: int | None
    scale: float


def _no_autocast(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device of count_flops


class _ChunkedAttention(torch.autograd.Function):
    """``apply(q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, problem) -> (B, h, N, d)``."""

    @staticmethod
    def forward(ctx, q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, problem: _Problem):
        with _no_autocast(q.device):  # dtypes are handled explicitly below
            out, probs, global_probs = _forward(q, k, v, (local_bias, g2l_bias, l2g_bias, g2g_bias), problem)
        ctx.save_for_backward(q, k, v, probs, global_probs, local_bias, l2g_bias)
        ctx.problem = problem
        ctx.table_shapes = [None if t is None else (t.shape, t.dtype) for t in (g2l_bias, g2g_bias)]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, global_probs, local_bias, l2g_bias = ctx.saved_tensors
        with _no_autocast(q.device):
            grads = _backward(grad_out, q, k, v, probs, global_probs, local_bias, l2g_bias, ctx.table_shapes,
                              ctx.problem, ctx.needs_input_grad)
        return (*grads, None)


def _forward(q, k, v, tables, problem: _Problem):
    local_bias, g2l_bias, l2g_bias, g2g_bias = tables
    batch, heads, n_tokens, dim = q.shape
    g, w = problem.num_global, problem.window
    w2 = w * w
    geometry = _geometry(*problem.map_hw, w, problem.mode, problem.neighbour, q.device)
    batch_heads, n_chunks = batch * heads, geometry.chunks_y * geometry.chunks_x

    # Local queries: one softmax over [global keys, gathered neighbourhood keys].
    q_chunks = q.new_empty(batch_heads, n_chunks, w2, dim)
    _write_chunks(q_chunks, q[:, :, g:], problem.map_hw, geometry, w, problem.scale)
    k_global = k[:, :, :g].reshape(batch_heads, g, dim)
    k_near = _gather(_flat_chunks(k[:, :, g:], problem.map_hw, geometry, w, batch_heads), k_global, geometry, w)
    scores = torch.matmul(q_chunks, k_near.transpose(-1, -2))  # (B*h, chunks, w^2, G + K)
    del k_near, q_chunks
    scores = scores.float()
    _add_bias_and_mask(scores, geometry, _local_bias(local_bias, l2g_bias, geometry, heads, g, w2), batch, heads, g)
    probs = torch.softmax(scores, dim=-1)
    del scores
    v_global = v[:, :, :g].reshape(batch_heads, g, dim)
    v_near = _gather(_flat_chunks(v[:, :, g:], problem.map_hw, geometry, w, batch_heads), v_global, geometry, w)
    local_out = torch.matmul(probs.to(v.dtype), v_near)  # (B*h, chunks, w^2, d)
    del v_near
    out = q.new_empty(batch, heads, n_tokens, dim)
    _read_chunks(local_out, out[:, :, g:], problem.map_hw, geometry, w)
    global_probs = None
    if g:
        # Global queries: dense over all real tokens, (B, h, G, N), in fp32 whatever the input dtype: it
        # is O(G * N * d) work, and the g2l/g2g gradients are sums over every key that nearly cancel.
        global_scores = torch.matmul(q[:, :, :g].float() * problem.scale, k.float().transpose(-1, -2))
        if g2g_bias is not None:
            global_scores[:, :, :, :g] += g2g_bias.float()
        if g2l_bias is not None:
            global_scores[:, :, :, g:] += g2l_bias.float()[:, :, None]
        global_probs = torch.softmax(global_scores, dim=-1)
        out[:, :, :g] = torch.matmul(global_probs, v.float())
    return out, probs, global_probs


def _backward(grad_out, q, k, v, probs, global_probs, local_bias, l2g_bias, table_shapes, problem: _Problem,
              needs_grad):
    batch, heads, n_tokens, dim = q.shape
    g, w = problem.num_global, problem.window
    w2 = w * w
    geometry = _geometry(*problem.map_hw, w, problem.mode, problem.neighbour, q.device)
    batch_heads, n_chunks = batch * heads, geometry.chunks_y * geometry.chunks_x
    grad_out = grad_out.to(q.dtype)

    grad_chunks = q.new_empty(batch_heads, n_chunks, w2, dim)
    _write_chunks(grad_chunks, grad_out[:, :, g:], problem.map_hw, geometry, w)
    v_near = _gather(_flat_chunks(v[:, :, g:], problem.map_hw, geometry, w, batch_heads),
                     v[:, :, :g].reshape(batch_heads, g, dim), geometry, w)
    grad_probs = torch.matmul(grad_chunks, v_near.transpose(-1, -2)).float()  # (B*h, chunks, w^2, G + K)
    del v_near
    v_near_grad = torch.matmul(probs.to(v.dtype).transpose(-1, -2), grad_chunks)  # (B*h, chunks, G + K, d)
    del grad_chunks
    grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
    del grad_probs

    d_local_bias = d_l2g = None
    if needs_grad[3] or needs_grad[5]:
        per_key = grad_scores.view(batch, heads, n_chunks, w2, -1).sum((0, 2))  # (h, w^2, G + K)
        if needs_grad[3]:
            table = torch.zeros(local_bias.shape, dtype=torch.float32, device=q.device)
            table.index_add_(1, geometry.table_index.reshape(-1), per_key[:, :, g:].reshape(heads, -1))
            d_local_bias = table.to(local_bias.dtype)
        if needs_grad[5]:
            d_l2g = per_key[:, :, :g].sum(1).to(l2g_bias.dtype)

    grad_scores = grad_scores.to(q.dtype)
    q_chunks = q.new_empty(batch_heads, n_chunks, w2, dim)
    _write_chunks(q_chunks, q[:, :, g:], problem.map_hw, geometry, w, problem.scale)
    k_near_grad = torch.matmul(grad_scores.transpose(-1, -2), q_chunks)  # (B*h, chunks, G + K, d), scale included
    del q_chunks
    k_near = _gather(_flat_chunks(k[:, :, g:], problem.map_hw, geometry, w, batch_heads),
                     k[:, :, :g].reshape(batch_heads, g, dim), geometry, w)
    q_grad_chunks = torch.matmul(grad_scores, k_near)  # (B*h, chunks, w^2, d), without the scale
    del k_near, grad_scores
    if problem.scale != 1.0:
        q_grad_chunks *= problem.scale

    dq = q.new_empty(batch, heads, n_tokens, dim)
    dk = k.new_empty(batch, heads, n_tokens, dim)
    dv = v.new_empty(batch, heads, n_tokens, dim)
    _read_chunks(q_grad_chunks, dq[:, :, g:], problem.map_hw, geometry, w)
    del q_grad_chunks
    first = 1 + geometry.chunks_x
    for near_grad, grad in ((k_near_grad, dk), (v_near_grad, dv)):
        flat_grad, global_grad = _scatter(near_grad, geometry, g, w)
        _read_chunks(flat_grad[:, first:first + n_chunks], grad[:, :, g:], problem.map_hw, geometry, w)
        grad[:, :, :g] = global_grad.view(batch, heads, g, dim)
    del k_near_grad, v_near_grad

    d_g2l = d_g2g = None
    if g:  # global queries, in fp32 as in the forward
        grad_global = grad_out[:, :, :g].float()  # (B, h, G, d)
        dv += torch.matmul(global_probs.transpose(-1, -2), grad_global).to(v.dtype)
        grad_global_probs = torch.matmul(grad_global, v.float().transpose(-1, -2))
        grad_global_scores = torch._softmax_backward_data(grad_global_probs, global_probs, -1, global_probs.dtype)
        del grad_global_probs
        if needs_grad[4]:
            d_g2l = grad_global_scores[:, :, :, g:].sum((0, 3)).to(table_shapes[0][1])
        if needs_grad[6]:
            d_g2g = grad_global_scores[:, :, :, :g].sum(0).to(table_shapes[1][1])
        grad_global_scores *= problem.scale
        dq[:, :, :g] = torch.matmul(grad_global_scores, k.float())
        dk += torch.matmul(grad_global_scores.transpose(-1, -2), q[:, :, :g].float()).to(k.dtype)
    return dq, dk, dv, d_local_bias, d_g2l, d_l2g, d_g2g


def vil_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, map_hw: tuple[int, int],
                          num_global: int, window: int, mode: str = "chunk", scale: float | None = None,
                          local_bias: torch.Tensor | None = None, g2l_bias: torch.Tensor | None = None,
                          l2g_bias: torch.Tensor | None = None, g2g_bias: torch.Tensor | None = None,
                          neighbour: int | None = None) -> torch.Tensor:
    """ViL attention with O(N * w^2) memory; same arguments and result as the reference."""
    validate_problem(q, k, v, map_hw=map_hw, num_global=num_global, window=window, mode=mode, neighbour=neighbour)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    heads, head_dim = q.shape[1], q.shape[3]
    _check_tables(heads, num_global, window, local_bias, g2l_bias, l2g_bias, g2g_bias)
    if not num_global:  # empty global tables take no part (they still get a zero-size gradient below)
        empty = [t for t in (g2l_bias, l2g_bias, g2g_bias) if t is not None]
        g2l_bias = l2g_bias = g2g_bias = None
    problem = _Problem(map_hw=(int(map_hw[0]), int(map_hw[1])), num_global=int(num_global), window=int(window),
                       mode=mode, neighbour=neighbour, scale=float(head_dim ** -0.5 if scale is None else scale))
    out = _ChunkedAttention.apply(q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, problem)
    if not num_global:
        for table in empty:
            if table.requires_grad:
                out = out + table.sum().to(out.dtype)
    return out


def _check_tables(heads, num_global, window, local_bias, g2l_bias, l2g_bias, g2g_bias) -> None:
    expected = {"local_bias": (heads, (4 * window - 1) ** 2), "g2l_bias": (heads, num_global),
                "l2g_bias": (heads, num_global), "g2g_bias": (heads, num_global, num_global)}
    for name, table in (("local_bias", local_bias), ("g2l_bias", g2l_bias), ("l2g_bias", l2g_bias),
                        ("g2g_bias", g2g_bias)):
        if table is not None and tuple(table.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(table.shape)}")


class _ChunkedBackend:
    name = "chunked"

    def can_run(self, q, *, map_hw, num_global, window, mode) -> str | None:
        if not q.is_floating_point():
            return f"q has dtype {q.dtype}; chunked attention needs a floating point dtype"
        return None

    def forward(self, q, k, v, **problem):
        return vil_attention_chunked(q, k, v, **problem)


BACKEND = _ChunkedBackend()
