"""ViL attention in plain PyTorch with memory linear in the number of tokens.

The local map is zero-padded right/bottom to a multiple of the window ``w`` and cut into ``w x w``
chunks. Every chunk's queries score the keys of the chunks it may see (its 3x3 neighbourhood,
``9 w^2`` tokens, or fewer with a ``neighbour``) and the global tokens: local scores are
``(B * heads * chunks, w^2, G + 9 w^2)``, O(N * w^2), never N x N.

Both window modes use the same chunks, because the exact window ``|dy|, |dx| <= w`` of a query
always lies inside the 3x3 chunks around it; the modes differ only in the mask:
- ``chunk``: every key of the neighbourhood that lies inside the map is visible;
- ``exact``: additionally ``|dy| <= w`` and ``|dx| <= w``.
Keys in the padding or outside the map are masked, never shifted, exactly as in
``vilscale.kernels.reference``. Global queries attend to all real tokens with dense ``(G, N)``
scores, which are linear in N too.

Forward and backward are written by hand (one autograd function). Autograd over the plain
formulation kept two ``9 w^2``-wide gathered copies of the keys and values alive, sliced their
gradients back with one zero-filled buffer per neighbour, and passed over the scores several times
more than needed. Here:
- keys and values of all (batch, head)s are laid out once as one flat row of chunks (``_flat_chunks``),
  where the run of chunks at offset ``(dy, dx)`` from every chunk is an overlapping strided view, which
  batched matrix products read as fast as a contiguous copy: nothing is gathered, and a neighbour's
  key and value gradients are accumulated straight into the flat gradient;
- the scores of each row of neighbouring chunks (and of the global keys) are separate contiguous
  tensors, because batched products into column slices of one wide tensor fall back to a slow loop;
  biases and masks are added in one pass per kind of chunk (interior, first/last rows and columns),
  and the softmax over them runs in place, writing the probabilities over the scores;
- only the probabilities (fp32, what the official implementation keeps too), q, k, v and the output
  are saved; the chunk layouts are rebuilt in backward (copies of O(N * d)), and the softmax gradient
  uses ``rowsum(dO * O)``, so no second score-sized buffer is needed.

All math runs in fp32 whatever the input dtype (results are cast back); gradients reach q, k, v and
all four bias tables.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vilscale.kernels.dense import no_autocast, softmax_
from vilscale.kernels.reference import OWN_CHUNK, AttentionProblem, neighbour_offset, validate_problem


@dataclass(frozen=True)
class _Geometry:
    """What a chunk sees, for one (map, window, mode, neighbour)."""

    chunks_y: int
    chunks_x: int
    blocks: tuple[tuple[int, int, int], ...]
    """(dy, first dx, count): runs of horizontally adjacent chunks a chunk takes keys from, in key order."""
    table_index: torch.Tensor
    """(w^2, K) index into the local bias table for every (query cell, key); K = w^2 * chunks seen."""
    rects: tuple[tuple[int, int, int, int, tuple[torch.Tensor | None, ...]], ...]
    """(row start, row stop, column start, column stop, visible per block) for each rectangle of chunks
    that see alike: visible is (keys of the block,) or, in exact mode, (w^2, keys) bool, or None where
    every key of the block is visible."""

    @property
    def n_chunks(self) -> int:
        return self.chunks_y * self.chunks_x

    @property
    def pad(self) -> int:
        """Zero chunks before and after the flat row of chunks (see ``_flat_chunks``)."""
        return self.chunks_x + 1


def _key_blocks(neighbour: int | None) -> tuple[tuple[int, int, int], ...]:
    if neighbour is None:
        return (-1, -1, 3), (0, -1, 3), (1, -1, 3)
    if neighbour == OWN_CHUNK:
        return ((0, 0, 1),)
    dy, dx = neighbour_offset(neighbour)
    return (0, 0, 1), (dy, dx, 1)


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
    blocks = _key_blocks(neighbour)
    offsets = [(dy, dx + j) for dy, dx, count in blocks for j in range(count)]
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
    bounds = [0]
    for _, _, count in blocks:
        bounds.append(bounds[-1] + count * w * w)
    rects = []
    for row_start, row_stop, row_valid in _runs((absolute_y >= 0) & (absolute_y < height)):
        for col_start, col_stop, col_valid in _runs((absolute_x >= 0) & (absolute_x < width)):
            visible = row_valid & col_valid
            if mode == "exact":
                visible = visible & (dy.abs() <= w) & (dx.abs() <= w)
            per_block = tuple(None if part.all() else part.to(device)
                              for part in (visible[..., a:b] for a, b in zip(bounds, bounds[1:])))
            rects.append((row_start, row_stop, col_start, col_stop, per_block))
    return _Geometry(chunks_y, chunks_x, blocks, table_index.to(device), tuple(rects))


def _chunk_view(buffer: torch.Tensor, batch: int, heads: int, geometry: _Geometry, window: int) -> torch.Tensor:
    """A (batch*heads*chunks, w^2, d) contiguous buffer seen as the padded map (B, h, mh, w, mw, w, d)."""
    return buffer.view(batch, heads, geometry.chunks_y, geometry.chunks_x, window, window,
                       buffer.shape[-1]).permute(0, 1, 2, 4, 3, 5, 6)


def _write_chunks(buffer: torch.Tensor, tokens: torch.Tensor, map_hw, geometry: _Geometry, window: int,
                  scale: float | None = None) -> None:
    """buffer (B*h*chunks, w^2, d) <- local tokens (B, h, H*W, d), zero-padded, times ``scale``."""
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


def _read_chunks(buffer: torch.Tensor, out: torch.Tensor, map_hw, geometry: _Geometry, window: int,
                 scale: float | None = None) -> None:
    """out (B, h, H*W, d) <- buffer (B*h*chunks, w^2, d) times ``scale``, padding dropped."""
    batch, heads, _, dim = out.shape
    height, width = map_hw
    chunks = _chunk_view(buffer, batch, heads, geometry, window)
    padded_h, padded_w = geometry.chunks_y * window, geometry.chunks_x * window
    if (padded_h, padded_w) == (height, width):
        target = out.view(batch, heads, geometry.chunks_y, window, geometry.chunks_x, window, dim)
    else:
        chunks = chunks.reshape(batch, heads, padded_h, padded_w, dim)[:, :, :height, :width]
        target = out.view(batch, heads, height, width, dim)
    if scale is None:
        target.copy_(chunks)
    else:
        torch.mul(chunks, scale, out=target)


def _flat_chunks(tokens: torch.Tensor, map_hw, geometry: _Geometry, window: int) -> torch.Tensor:
    """(pad + B*h*chunks + pad, w^2, d): the local tokens of every (batch, head) in chunks, one flat row.

    Chunk ``c`` (over all batches and heads) sits at ``pad + c`` and its neighbour at chunk offset
    (dy, dx) at ``pad + c + dy * mw + dx``: the keys of a run of adjacent chunks are one contiguous
    slice, for every chunk at once an overlapping strided view (``_keys``). Where that lands outside the
    (batch, head)'s grid (above, below, or wrapped onto the previous/next chunk row) the keys are outside
    the map and masked; the ``pad = mw + 1`` zero chunks at both ends keep every view in bounds."""
    batch, heads, _, dim = tokens.shape
    total = batch * heads * geometry.n_chunks
    flat = tokens.new_empty(2 * geometry.pad + total, window * window, dim)
    flat[:geometry.pad].zero_()
    flat[geometry.pad + total:].zero_()
    _write_chunks(flat[geometry.pad:geometry.pad + total], tokens, map_hw, geometry, window)
    return flat


def _keys(flat: torch.Tensor, geometry: _Geometry, dy: int, dx: int, count: int, total: int) -> torch.Tensor:
    """(total, count * w^2, d) view: for every chunk, the ``count`` chunks from offset (dy, dx) on."""
    start = geometry.pad + dy * geometry.chunks_x + dx
    w2, dim = flat.shape[1], flat.shape[2]
    return flat.as_strided((total, count * w2, dim), (w2 * dim, dim, 1), flat.storage_offset() + start * w2 * dim)


def _add_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b (batched), in place; written as ``baddbmm(..., out=out)`` because torch's FLOP
    counter (``count_flops``) does not see ``baddbmm_``."""
    torch.baddbmm(out, a, b, out=out)


def _local_bias(local_bias, geometry: _Geometry) -> torch.Tensor | None:
    """(heads, w^2, K) fp32 local bias of every (query cell, key), or None without a table."""
    if local_bias is None:
        return None
    return local_bias.float()[:, geometry.table_index]


def _add_bias_and_mask(scores: list[torch.Tensor], geometry: _Geometry, bias: torch.Tensor | None, batch: int,
                       heads: int, w2: int) -> None:
    """scores[b] (B*h*chunks, w^2, keys of block b) += local biases, and -inf where a key is not visible:
    one pass per rectangle of alike chunks (they differ only at the borders of the chunk grid)."""
    first = 0
    for index, part in enumerate(scores):
        width = part.shape[-1]
        grid = part.view(batch, heads, geometry.chunks_y, geometry.chunks_x, w2, width)
        part_bias = None if bias is None else bias[:, :, first:first + width]
        for row_start, row_stop, col_start, col_stop, visible in geometry.rects:
            visible = visible[index]
            if visible is None:
                if part_bias is None:
                    continue
                addend = part_bias
            else:
                addend = torch.zeros(visible.shape, dtype=part.dtype, device=part.device).masked_fill_(
                    ~visible, float("-inf")).expand(w2, width)
                if part_bias is not None:
                    addend = part_bias + addend
            grid[:, :, row_start:row_stop, col_start:col_stop] += addend.view(-1, 1, 1, w2, width)[None]
        first += width


class _ChunkedAttention(torch.autograd.Function):
    """``apply(q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, problem) -> (B, h, N, d)``."""

    @staticmethod
    def forward(ctx, q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, problem: AttentionProblem):
        with no_autocast(q.device):  # all math in fp32, whatever the input dtype
            out, probs, global_probs = _forward(q.float(), k.float(), v.float(),
                                                (local_bias, g2l_bias, l2g_bias, g2g_bias), problem)
        out_lowp = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, global_probs, local_bias, g2l_bias, l2g_bias, g2g_bias, *probs)
        ctx.problem = problem
        return out_lowp

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, global_probs, local_bias, g2l_bias, l2g_bias, g2g_bias, *probs = ctx.saved_tensors
        with no_autocast(q.device):
            grads = _backward(grad_out.float(), q.float(), k.float(), v.float(), out, probs, global_probs,
                              (local_bias, g2l_bias, l2g_bias, g2g_bias), ctx.problem, ctx.needs_input_grad)
        dq, dk, dv, *tables = grads
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *tables, None)


def _forward(q, k, v, tables, problem: AttentionProblem):
    """fp32 q, k, v (B, h, N, d) -> output (B, h, N, d) fp32, the probabilities of the local queries
    (global keys first, then one tensor per key block) and those of the global queries."""
    local_bias, g2l_bias, l2g_bias, g2g_bias = tables
    batch, heads, n_tokens, dim = q.shape
    g, w = problem.num_global, problem.window
    w2 = w * w
    geometry = _geometry(*problem.map_hw, w, problem.mode, problem.neighbour, q.device)
    total = batch * heads * geometry.n_chunks

    # Local queries: one softmax over [global keys, the keys of each block of chunks].
    q_rows = q.new_empty(total, w2, dim)  # scaled queries, chunk by chunk
    _write_chunks(q_rows, q[:, :, g:], problem.map_hw, geometry, w, problem.scale)
    k_flat = _flat_chunks(k[:, :, g:], problem.map_hw, geometry, w)
    scores = [torch.matmul(q_rows, _keys(k_flat, geometry, dy, dx, count, total).transpose(1, 2))
              for dy, dx, count in geometry.blocks]  # each (B*h*chunks, w^2, count * w^2)
    del k_flat
    _add_bias_and_mask(scores, geometry, _local_bias(local_bias, geometry), batch, heads, w2)
    if g:
        k_global = k[:, :, :g].reshape(batch * heads, g, dim)
        global_scores = torch.matmul(q_rows.view(batch * heads, -1, dim), k_global.transpose(1, 2))
        if l2g_bias is not None:
            global_scores.view(batch, heads, -1, g).add_(l2g_bias.float()[None, :, None, :])
        scores.insert(0, global_scores.view(total, w2, g))
    del q_rows
    softmax_(scores)
    probs = scores

    v_flat = _flat_chunks(v[:, :, g:], problem.map_hw, geometry, w)
    local_out = v.new_zeros(total, w2, dim)
    if g:
        _add_matmul(local_out.view(batch * heads, -1, dim), probs[0].view(batch * heads, -1, g),
                    v[:, :, :g].reshape(batch * heads, g, dim))
    for part, (dy, dx, count) in zip(probs[1 if g else 0:], geometry.blocks):
        _add_matmul(local_out, part, _keys(v_flat, geometry, dy, dx, count, total))
    del v_flat
    out = q.new_empty(batch, heads, n_tokens, dim)
    _read_chunks(local_out, out[:, :, g:], problem.map_hw, geometry, w)
    global_probs = None
    if g:  # global queries: dense over all real tokens, (B, h, G, N)
        global_scores = torch.matmul(q[:, :, :g] * problem.scale, k.transpose(-1, -2))
        if g2g_bias is not None:
            global_scores[:, :, :, :g] += g2g_bias.float()
        if g2l_bias is not None:
            global_scores[:, :, :, g:] += g2l_bias.float()[:, :, None]
        softmax_([global_scores])
        global_probs = global_scores
        out[:, :, :g] = torch.matmul(global_probs, v)
    return out, probs, global_probs


def _backward(grad_out, q, k, v, out, probs, global_probs, tables, problem: AttentionProblem, needs_grad):
    """fp32 everything; returns (dq, dk, dv, d_local_bias, d_g2l, d_l2g, d_g2g)."""
    local_bias, g2l_bias, l2g_bias, g2g_bias = tables
    batch, heads, n_tokens, dim = q.shape
    g, w = problem.num_global, problem.window
    w2 = w * w
    geometry = _geometry(*problem.map_hw, w, problem.mode, problem.neighbour, q.device)
    total = batch * heads * geometry.n_chunks
    local_probs = probs[1:] if g else probs

    # Softmax gradient ds = p * (dp - delta), delta = rowsum(dO * O) per query.
    delta = (grad_out * out).sum(-1, keepdim=True)  # (B, h, N, 1)
    delta_rows = delta.new_empty(total, w2, 1)
    _write_chunks(delta_rows, delta[:, :, g:], problem.map_hw, geometry, w)
    grad_rows = grad_out.new_empty(total, w2, dim)
    _write_chunks(grad_rows, grad_out[:, :, g:], problem.map_hw, geometry, w)
    q_rows = q.new_empty(total, w2, dim)
    _write_chunks(q_rows, q[:, :, g:], problem.map_hw, geometry, w, problem.scale)
    k_flat = _flat_chunks(k[:, :, g:], problem.map_hw, geometry, w)
    v_flat = _flat_chunks(v[:, :, g:], problem.map_hw, geometry, w)
    dk_flat, dv_flat = torch.zeros_like(k_flat), torch.zeros_like(v_flat)
    dq_rows = q.new_zeros(total, w2, dim)  # without the scale
    per_key = []  # bias gradient per block: (h, w^2, keys)
    for part, (dy, dx, count) in zip(local_probs, geometry.blocks):
        keys, values = _keys(k_flat, geometry, dy, dx, count, total), _keys(v_flat, geometry, dy, dx, count, total)
        grad_scores = torch.matmul(grad_rows, values.transpose(1, 2)).sub_(delta_rows).mul_(part)
        if needs_grad[3]:
            # (one axis at a time: torch's CPU reduction over two axes at once was several times slower)
            per_key.append(grad_scores.view(batch, heads, -1, w2 * count * w2).sum(2).sum(0).view(heads, w2, -1))
        _add_matmul(dq_rows, grad_scores, keys)
        for j in range(count):  # each chunk of the block: a contiguous slice of the flat gradients
            start = geometry.pad + dy * geometry.chunks_x + dx + j
            cells = slice(j * w2, (j + 1) * w2)
            _add_matmul(dk_flat[start:start + total], grad_scores[:, :, cells].transpose(1, 2), q_rows)
            _add_matmul(dv_flat[start:start + total], part[:, :, cells].transpose(1, 2), grad_rows)
        del grad_scores
    del k_flat, v_flat
    dq = q.new_empty(batch, heads, n_tokens, dim)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    d_local_bias = d_g2l = d_l2g = d_g2g = None
    if g:  # local queries -> global keys
        part = probs[0].view(batch * heads, -1, g)
        rows = (batch * heads, geometry.n_chunks * w2, dim)
        grad_scores = torch.matmul(grad_rows.view(rows), v[:, :, :g].reshape(batch * heads, g, dim).transpose(1, 2))
        grad_scores.sub_(delta_rows.view(batch * heads, -1, 1)).mul_(part)
        if needs_grad[5]:
            d_l2g = grad_scores.view(batch, heads, -1, g).sum(2).sum(0)
        _add_matmul(dq_rows.view(rows), grad_scores, k[:, :, :g].reshape(batch * heads, g, dim))
        dk[:, :, :g] = torch.matmul(grad_scores.transpose(1, 2), q_rows.view(rows)).view(batch, heads, g, dim)
        dv[:, :, :g] = torch.matmul(part.transpose(1, 2), grad_rows.view(rows)).view(batch, heads, g, dim)
        del grad_scores
    del q_rows, grad_rows
    _read_chunks(dq_rows, dq[:, :, g:], problem.map_hw, geometry, w, problem.scale)
    for flat, grad in ((dk_flat, dk), (dv_flat, dv)):
        _read_chunks(flat[geometry.pad:geometry.pad + total], grad[:, :, g:], problem.map_hw, geometry, w)
    del dq_rows, dk_flat, dv_flat
    if needs_grad[3]:
        d_local_bias = torch.zeros(local_bias.shape, dtype=torch.float32, device=q.device)
        d_local_bias.index_add_(1, geometry.table_index.reshape(-1), torch.cat(per_key, -1).reshape(heads, -1))
        d_local_bias = d_local_bias.to(local_bias.dtype)

    if g:  # global queries
        grad_global = grad_out[:, :, :g]  # (B, h, G, d)
        dv += torch.matmul(global_probs.transpose(-1, -2), grad_global)
        grad_scores = torch.matmul(grad_global, v.transpose(-1, -2))
        grad_scores.sub_(delta[:, :, :g]).mul_(global_probs)
        if needs_grad[4]:
            d_g2l = grad_scores[:, :, :, g:].sum(3).sum(0).to(g2l_bias.dtype)
        if needs_grad[6]:
            d_g2g = grad_scores[:, :, :, :g].sum(0).to(g2g_bias.dtype)
        grad_scores *= problem.scale
        dq[:, :, :g] = torch.matmul(grad_scores, k)
        dk += torch.matmul(grad_scores.transpose(-1, -2), q[:, :, :g])
    if d_l2g is not None:
        d_l2g = d_l2g.to(l2g_bias.dtype)
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
    problem = AttentionProblem.of(head_dim, map_hw=map_hw, num_global=num_global, window=window, mode=mode,
                                  neighbour=neighbour, scale=scale)
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
