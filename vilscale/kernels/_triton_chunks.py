"""Chunk-tiled Triton kernels of ViL attention in ``chunk`` mode. Launched by ``triton_chunks``.

In chunk mode every query of a ``w x w`` chunk sees the same keys: the global tokens and the chunks
around its own (all 9, or in the shift modes its own and one neighbour). So a program owns one
chunk of queries, padded to ``BLOCK`` (64) rows, and walks the chunks it sees as ``BLOCK``-row key
blocks: every product is ``64 x 64 x d`` and lowers to Hopper's ``wgmma``, and no score needs a
visibility test. Chunks with more than ``BLOCK`` tokens (``w > 8``) are cut into ``SUB``
sub-blocks of ``BLOCK`` rows each, on both sides.

Tokens stay where the model keeps them (``(B, heads, G + H*W, d)``, the map row-major): a block's
rows are addressed through their token index (``_chunk_rows``), ``w`` map-row segments of ``w``
tokens, so no chunk-major copy is made. Rows past the chunk's ``w * w`` tokens, or past the map's
right and bottom edges, are loaded as zeros.

The local relative-position bias arrives as dense tiles, one per (head, neighbour, key-chunk class,
query sub-block, key sub-block), built by the host from the table (``triton_chunks.bias_tiles``):
``bias / scale`` where the key is a real token and ``-inf`` where it is not (the rows padding a
chunk to ``BLOCK``, and keys past the map's edges: the class says whether the key chunk is cut by
the bottom and/or right edge). A tile is the initial accumulator of the ``q . k`` product, so the
bias and the mask cost no instruction per score: scores are kept in "raw" units ``s = q.k + bias /
scale`` and the softmax runs on ``exp2(s * qk_scale - m * qk_scale)`` with ``qk_scale = scale *
log2(e)``, one fused multiply-add and one ``exp2`` per score. The saved log-sum-exp ``lse`` is base 2
of the natural scores, as in ``_triton_vil`` (whose global kernels read it).

Backward is deterministic: dq per query block (``bwd_chunk_dq_kernel``), dk and dv per key block
over the query chunks that see it (``bwd_chunk_dkdv_kernel``, which reads the tiles transposed),
and the local table's gradient per (head, neighbour, group of query chunks) summed over the group and
the batch in a fixed order (``bwd_chunk_bias_kernel``); the host sums those slots in a fixed order
too. No atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vilscale.kernels._triton_vil import INTERPRETED, _inline, _mma

__all__ = ["BLOCK", "BLOCKS_PER_STEP", "INTERPRETED", "bwd_chunk_bias_kernel", "bwd_chunk_dkdv_kernel",
           "bwd_chunk_dq_kernel", "fwd_chunk_kernel"]

# Rows of a query or key block: 64 rows per warpgroup is what wgmma needs.
BLOCK = 64
# Blocks of BLOCK rows each kernel's loop takes per iteration (benchmarks/kernel_static.py counts its scores).
BLOCKS_PER_STEP = {"fwd_chunk_kernel": 2, "bwd_chunk_dq_kernel": 2, "bwd_chunk_dkdv_kernel": 1,
                   "bwd_chunk_bias_kernel": 1}


@_inline
def _mma_into(a, b, acc, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (see ``_triton_vil._mma`` for UPCAST)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif PRECISE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@_inline
def _grid(H, W, WINDOW: tl.constexpr):
    """(chunk rows, chunk columns, the chunk row cut by the bottom edge or -1, the chunk column cut by the right
    edge or -1)."""
    chunks_y = (H + WINDOW - 1) // WINDOW
    chunks_x = (W + WINDOW - 1) // WINDOW
    cut_y = tl.where(H % WINDOW != 0, chunks_y - 1, -1)
    cut_x = tl.where(W % WINDOW != 0, chunks_x - 1, -1)
    return chunks_y, chunks_x, cut_y, cut_x


@_inline
def _cells(sub, W, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    """For the BLOCK rows of sub-block ``sub`` of a chunk: the row and column within the chunk, whether the row
    is one of its w * w tokens, and the token offset from the chunk's origin (row-major map)."""
    r = sub * BLOCK + tl.arange(0, BLOCK)
    ry = r // WINDOW
    rx = r % WINDOW
    return ry, rx, r < WINDOW * WINDOW, ry * W + rx


@_inline
def _rows(cy, cx, ry, rx, real, H, W, WINDOW: tl.constexpr):
    """Which rows of a block of chunk (cy, cx) are tokens of the map, and the local token index of the chunk's
    origin (add ``_cells``' offsets for each row's)."""
    y0 = cy * WINDOW
    x0 = cx * WINDOW
    return real & (ry < H - y0) & (rx < W - x0), y0 * W + x0


@_inline
def _walk(cy, cx, chunks_y, chunks_x, nb_y, nb_x, SIGN: tl.constexpr, ALL_NB: tl.constexpr):
    """Start of a walk over the chunks a chunk's queries see (SIGN = 1), or whose queries see a chunk's keys
    (SIGN = -1): all 9 around it clipped to the grid (ALL_NB; symmetric), or its own and the one at
    SIGN * (nb_y, nb_x) when that lies on the grid and is not the own chunk. Returns (first chunk row,
    first column, last column, chunks to walk)."""
    if ALL_NB:
        y_first = tl.maximum(cy - 1, 0)
        x_first = tl.maximum(cx - 1, 0)
        x_last = tl.minimum(cx + 1, chunks_x - 1)
        count = (tl.minimum(cy + 1, chunks_y - 1) - y_first + 1) * (x_last - x_first + 1)
    else:
        oy = cy + SIGN * nb_y
        ox = cx + SIGN * nb_x
        other = (oy >= 0) & (oy < chunks_y) & (ox >= 0) & (ox < chunks_x) & ((nb_y != 0) | (nb_x != 0))
        y_first = cy
        x_first = cx
        x_last = cx
        count = 1 + other.to(tl.int32)
    return y_first, x_first, x_last, count


@_inline
def _walk_next(ky, kx, x_first, x_last):
    """The chunk after (ky, kx) in a walk over all 9 chunks begun by ``_walk`` (no division)."""
    row_done = kx == x_last
    return tl.where(row_done, ky + 1, ky), tl.where(row_done, x_first, kx + 1)


# A walk goes two blocks of BLOCK rows per step: block a is sub-block 0 of a chunk; block b is its sub-block 1
# (SUB = 2), or sub-block 0 of the next chunk (SUB = 1), absent past the walk's end (it then names chunk a
# again, and its tile is the all -inf one). Over all 9 chunks the walk carries its chunk from step to step
# (``_step_all``); over one or two (the shift modes) each step's chunks follow from the step's index
# (``_step_one``): carried there, Triton's loop scheduler (3.6 and 3.8) fails on the loop-invariant values.

@_inline
def _step_all(ky, kx, step, count, x_first, x_last, SUB: tl.constexpr):
    """Block b's chunk row, column, whether it is there, and the chunk of the next step; block a is (ky, kx)."""
    if SUB == 1:
        by, bx = _walk_next(ky, kx, x_first, x_last)
        has_b = step * 2 + 1 < count
        next_y, next_x = _walk_next(by, bx, x_first, x_last)
        by = tl.where(has_b, by, ky)
        bx = tl.where(has_b, bx, kx)
    else:
        by = ky
        bx = kx
        has_b = step >= 0
        next_y, next_x = _walk_next(ky, kx, x_first, x_last)
    return by, bx, has_b, next_y, next_x


@_inline
def _step_one(cy, cx, step, count, nb_y, nb_x, SIGN: tl.constexpr, SUB: tl.constexpr):
    """Blocks a and b of step ``step`` over the own chunk (cy, cx) and, when ``count`` is 2, the one at
    SIGN * (nb_y, nb_x): (a's chunk row, column, b's chunk row, column, whether b is there)."""
    if SUB == 1:
        has_b = count > 1
        ay = cy
        ax = cx
        by = tl.where(has_b, cy + SIGN * nb_y, cy)
        bx = tl.where(has_b, cx + SIGN * nb_x, cx)
    else:
        ay = cy + step * (SIGN * nb_y)
        ax = cx + step * (SIGN * nb_x)
        by = ay
        bx = ax
        has_b = step >= 0
    return ay, ax, by, bx, has_b


@_inline
def _tokens(cy, cx, rel, G, H, W, WINDOW: tl.constexpr):
    """Token index (global tokens first) of the rows of a block of chunk (cy, cx), clamped into the map: a row
    that is no token (padding, or past the map's right or bottom edge) reads some token's data, which the
    bias tile's -inf (or the mask of ``_rows``) keeps out of every result."""
    return G + tl.minimum(cy * (WINDOW * W) + cx * WINDOW + rel, H * W - 1)


@_inline
def _load_d(ptrs, d_ok, MASK_D: tl.constexpr):
    """Load a block whose head dim is padded (MASK_D) or not."""
    if MASK_D:
        out = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        out = tl.load(ptrs)
    return out


@_inline
def _tile(TILES, h, qy, qx, ky, kx, qs, ks, cut_y, cut_x, SUB: tl.constexpr, BLOCK: tl.constexpr):
    """Pointer to the bias tile of head h from query chunk (qy, qx), sub-block qs, to key chunk (ky, kx),
    sub-block ks, in the table (heads, 9 neighbours, 4 classes, SUB, SUB, BLOCK, BLOCK): the class says
    whether the key chunk is cut by the bottom edge (2) and/or the right edge (1). An all -inf tile follows
    the table (``_empty_tile``)."""
    neighbour = (ky - qy) * 3 + (kx - qx) + 4
    cut = (ky == cut_y).to(tl.int32) * 2 + (kx == cut_x).to(tl.int32)
    return TILES + ((((h * 9 + neighbour) * 4 + cut) * SUB + qs) * SUB + ks) * (BLOCK * BLOCK)


@_inline
def _empty_tile(TILES, heads, SUB: tl.constexpr, BLOCK: tl.constexpr):
    return TILES + heads * (36 * SUB * SUB * BLOCK * BLOCK)


@_inline
def _softmax_step(s, v, m_i, l_i, acc, qk_scale, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over raw scores ``s`` (masked with -inf) and their values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2((m_i - m_new) * qk_scale)
    p = tl.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mma_into(p.to(v.dtype), v, acc * alpha[:, None], PRECISE, UPCAST)
    return m_new, l_i, acc


@_inline
def _softmax_pair(s_a, s_b, v_a, v_b, m_i, l_i, acc, qk_scale, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over two blocks of raw scores at once (one rescale of the accumulator)."""
    m_new = tl.maximum(m_i, tl.maximum(tl.max(s_a, 1), tl.max(s_b, 1)))
    m_scaled = m_new * qk_scale
    alpha = tl.exp2(m_i * qk_scale - m_scaled)
    p_a = tl.exp2(s_a * qk_scale - m_scaled[:, None])
    p_b = tl.exp2(s_b * qk_scale - m_scaled[:, None])
    l_i = l_i * alpha + tl.sum(p_a, 1) + tl.sum(p_b, 1)
    acc = _mma_into(p_a.to(v_a.dtype), v_a, acc * alpha[:, None], PRECISE, UPCAST)
    acc = _mma_into(p_b.to(v_b.dtype), v_b, acc, PRECISE, UPCAST)
    return m_new, l_i, acc


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@triton.jit
def fwd_chunk_kernel(Q, K, V, OUT, LSE, TILES, L2G,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     heads, G, H, W, qk_scale, inv_scale, nb_y, nb_x,
                     WINDOW: tl.constexpr, ALL_NB: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, HAS_LB: tl.constexpr,
                     HAS_L2G: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
    """One program: one query block (a chunk, or a sub-block of it) of one (batch, head)."""
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    chunks_y, chunks_x, cut_y, cut_x = _grid(H, W, WINDOW)
    cy = tl.program_id(0) // SUB // chunks_x
    cx = tl.program_id(0) // SUB % chunks_x
    qs = tl.program_id(0) % SUB
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    ry, rx, real, rel = _cells(qs, W, WINDOW, BLOCK)
    q_ok, q_origin = _rows(cy, cx, ry, rx, real, H, W, WINDOW)
    q_tok = q_origin + rel
    q = tl.load(Q + b * sqb + h * sqh + (G + q_tok)[:, None] * sqn + d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([BLOCK], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)

    for g0 in range(0, G, BLOCK_G):
        j = g0 + tl.arange(0, BLOCK_G)
        j_ok = j < G
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + j[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
        col = tl.where(j_ok, 0.0, float("-inf"))
        if HAS_L2G:
            col += tl.load(L2G + h * G + j, mask=j_ok, other=0.0).to(tl.float32) * inv_scale
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) + col[None, :]
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, qk_scale, PRECISE, UPCAST)

    # the key blocks, two per step (see _step)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    ky, x_first, x_last, count = _walk(cy, cx, chunks_y, chunks_x, nb_y, nb_x, 1, ALL_NB)
    kx = x_first
    ry_a, rx_a, real_a, rel_a = _cells(0, W, WINDOW, BLOCK)
    ry_b, rx_b, real_b, rel_b = _cells(SUB - 1, W, WINDOW, BLOCK)
    tile_offsets = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    empty = _empty_tile(TILES, heads, SUB, BLOCK)
    for step in tl.range(0, (count * SUB + 1) // 2, num_stages=NUM_STAGES):
        if ALL_NB:
            ay = ky
            ax = kx
            by, bx, has_b, ky, kx = _step_all(ky, kx, step, count, x_first, x_last, SUB)
        else:
            ay, ax, by, bx, has_b = _step_one(cy, cx, step, count, nb_y, nb_x, 1, SUB)
        tok_a = _tokens(ay, ax, rel_a, G, H, W, WINDOW)
        tok_b = _tokens(by, bx, rel_b, G, H, W, WINDOW)
        k_a = _load_d(k_base + tok_a[:, None] * skn + d[None, :], d_ok, MASK_D)
        k_b = _load_d(k_base + tok_b[:, None] * skn + d[None, :], d_ok, MASK_D)
        v_a = _load_d(v_base + tok_a[:, None] * svn + d[None, :], d_ok, MASK_D)
        v_b = _load_d(v_base + tok_b[:, None] * svn + d[None, :], d_ok, MASK_D)
        if HAS_LB:
            tile_a = _tile(TILES, h, cy, cx, ay, ax, qs, 0, cut_y, cut_x, SUB, BLOCK)
            tile_b = tl.where(has_b, _tile(TILES, h, cy, cx, by, bx, qs, SUB - 1, cut_y, cut_x, SUB, BLOCK), empty)
            s_a = _mma_into(q, tl.trans(k_a), tl.load(tile_a + tile_offsets), PRECISE, UPCAST)
            s_b = _mma_into(q, tl.trans(k_b), tl.load(tile_b + tile_offsets), PRECISE, UPCAST)
        else:
            ok_a, _ = _rows(ay, ax, ry_a, rx_a, real_a, H, W, WINDOW)
            ok_b, _ = _rows(by, bx, ry_b, rx_b, real_b, H, W, WINDOW)
            s_a = tl.where(ok_a[None, :], _mma(q, tl.trans(k_a), PRECISE, UPCAST), float("-inf"))
            s_b = tl.where((ok_b & has_b)[None, :], _mma(q, tl.trans(k_b), PRECISE, UPCAST), float("-inf"))
        m_i, l_i, acc = _softmax_pair(s_a, s_b, v_a, v_b, m_i, l_i, acc, qk_scale, PRECISE, UPCAST)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    rows = bh * (G + H * W) + G + q_tok
    tl.store(OUT + rows[:, None] * HEAD_DIM + d[None, :], (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + rows, m_i * qk_scale + tl.log2(l_safe), mask=q_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

@_inline
def _dq_block(q, do, lse, delta, k, v, s, dq, qk_scale, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """dq + ds @ k for one block of keys whose raw scores (bias and mask included) are ``s``."""
    p = tl.exp2(s * qk_scale - lse[:, None])
    ds = p * (_mma(do, tl.trans(v), PRECISE, UPCAST) - delta[:, None])
    return _mma_into(ds.to(k.dtype), k, dq, PRECISE, UPCAST)


@triton.jit
def bwd_chunk_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, TILES, L2G,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                        heads, G, H, W, qk_scale, inv_scale, scale, nb_y, nb_x,
                        WINDOW: tl.constexpr, ALL_NB: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, HAS_LB: tl.constexpr,
                        HAS_L2G: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
                        NUM_STAGES: tl.constexpr):
    """dq of one query block: the global keys and the key blocks the forward walked, recomputed."""
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    chunks_y, chunks_x, cut_y, cut_x = _grid(H, W, WINDOW)
    cy = tl.program_id(0) // SUB // chunks_x
    cx = tl.program_id(0) // SUB % chunks_x
    qs = tl.program_id(0) % SUB
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    ry, rx, real, rel = _cells(qs, W, WINDOW, BLOCK)
    q_ok, q_origin = _rows(cy, cx, ry, rx, real, H, W, WINDOW)
    q_tok = q_origin + rel
    q_mask = q_ok[:, None] & d_ok[None, :]
    rows = bh * (G + H * W) + G + q_tok
    q = tl.load(Q + b * sqb + h * sqh + (G + q_tok)[:, None] * sqn + d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + rows, mask=q_ok, other=float("inf"))  # rows that are no token get p = 0
    delta = tl.load(DELTA + rows, mask=q_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)

    for g0 in range(0, G, BLOCK_G):
        j = g0 + tl.arange(0, BLOCK_G)
        j_ok = j < G
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + j[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
        col = tl.where(j_ok, 0.0, float("-inf"))
        if HAS_L2G:
            col += tl.load(L2G + h * G + j, mask=j_ok, other=0.0).to(tl.float32) * inv_scale
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) + col[None, :]
        dq = _dq_block(q, do, lse, delta, k, v, s, dq, qk_scale, PRECISE, UPCAST)

    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    ky, x_first, x_last, count = _walk(cy, cx, chunks_y, chunks_x, nb_y, nb_x, 1, ALL_NB)
    kx = x_first
    ry_a, rx_a, real_a, rel_a = _cells(0, W, WINDOW, BLOCK)
    ry_b, rx_b, real_b, rel_b = _cells(SUB - 1, W, WINDOW, BLOCK)
    tile_offsets = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    empty = _empty_tile(TILES, heads, SUB, BLOCK)
    for step in tl.range(0, (count * SUB + 1) // 2, num_stages=NUM_STAGES):
        if ALL_NB:
            ay = ky
            ax = kx
            by, bx, has_b, ky, kx = _step_all(ky, kx, step, count, x_first, x_last, SUB)
        else:
            ay, ax, by, bx, has_b = _step_one(cy, cx, step, count, nb_y, nb_x, 1, SUB)
        tok_a = _tokens(ay, ax, rel_a, G, H, W, WINDOW)
        tok_b = _tokens(by, bx, rel_b, G, H, W, WINDOW)
        k_a = _load_d(k_base + tok_a[:, None] * skn + d[None, :], d_ok, MASK_D)
        k_b = _load_d(k_base + tok_b[:, None] * skn + d[None, :], d_ok, MASK_D)
        v_a = _load_d(v_base + tok_a[:, None] * svn + d[None, :], d_ok, MASK_D)
        v_b = _load_d(v_base + tok_b[:, None] * svn + d[None, :], d_ok, MASK_D)
        if HAS_LB:
            tile_a = _tile(TILES, h, cy, cx, ay, ax, qs, 0, cut_y, cut_x, SUB, BLOCK)
            tile_b = tl.where(has_b, _tile(TILES, h, cy, cx, by, bx, qs, SUB - 1, cut_y, cut_x, SUB, BLOCK), empty)
            s_a = _mma_into(q, tl.trans(k_a), tl.load(tile_a + tile_offsets), PRECISE, UPCAST)
            s_b = _mma_into(q, tl.trans(k_b), tl.load(tile_b + tile_offsets), PRECISE, UPCAST)
        else:
            ok_a, _ = _rows(ay, ax, ry_a, rx_a, real_a, H, W, WINDOW)
            ok_b, _ = _rows(by, bx, ry_b, rx_b, real_b, H, W, WINDOW)
            s_a = tl.where(ok_a[None, :], _mma(q, tl.trans(k_a), PRECISE, UPCAST), float("-inf"))
            s_b = tl.where((ok_b & has_b)[None, :], _mma(q, tl.trans(k_b), PRECISE, UPCAST), float("-inf"))
        dq = _dq_block(q, do, lse, delta, k_a, v_a, s_a, dq, qk_scale, PRECISE, UPCAST)
        dq = _dq_block(q, do, lse, delta, k_b, v_b, s_b, dq, qk_scale, PRECISE, UPCAST)

    tl.store(DQ + rows[:, None] * HEAD_DIM + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@_inline
def _dkdv_block(k, v, q, do, lse, delta, s_t, dk, dv, qk_scale, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """dk, dv plus one block of queries' share, from the transposed raw scores ``s_t`` (keys x queries)."""
    p_t = tl.exp2(s_t * qk_scale - lse[None, :])
    dv = _mma_into(p_t.to(do.dtype), do, dv, PRECISE, UPCAST)
    ds_t = p_t * (_mma(v, tl.trans(do), PRECISE, UPCAST) - delta[None, :])
    dk = _mma_into(ds_t.to(q.dtype), q, dk, PRECISE, UPCAST)
    return dk, dv


@triton.jit
def bwd_chunk_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TILES_T, G2L,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                          heads, G, H, W, qk_scale, inv_scale, scale, nb_y, nb_x,
                          WINDOW: tl.constexpr, ALL_NB: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                          HAS_LB: tl.constexpr, HAS_G2L: tl.constexpr, PRECISE: tl.constexpr,
                          UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr):
    """dk, dv of one key block: every global query and the query blocks that see it. Scores are kept
    transposed (keys x queries), so the products for dk and dv need no transposed operand; TILES_T holds
    each bias tile transposed."""
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    chunks_y, chunks_x, cut_y, cut_x = _grid(H, W, WINDOW)
    cy = tl.program_id(0) // SUB // chunks_x
    cx = tl.program_id(0) // SUB % chunks_x
    ks = tl.program_id(0) % SUB
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    ry, rx, real, rel = _cells(ks, W, WINDOW, BLOCK)
    k_ok, k_origin = _rows(cy, cx, ry, rx, real, H, W, WINDOW)
    k_tok = k_origin + rel
    k_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + (G + k_tok)[:, None] * skn + d[None, :], mask=k_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + (G + k_tok)[:, None] * svn + d[None, :], mask=k_mask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    row_base = bh * (G + H * W)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)

    for g0 in range(0, G, BLOCK_G):
        i = g0 + tl.arange(0, BLOCK_G)
        i_ok = i < G
        q_mask = i_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + i[:, None] * sqn + d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + (row_base + i)[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + row_base + i, mask=i_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + i, mask=i_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), PRECISE, UPCAST)  # (keys, queries)
        if HAS_G2L:
            s_t += tl.load(G2L + h * G + i, mask=i_ok, other=0.0).to(tl.float32)[None, :] * inv_scale
        dk, dv = _dkdv_block(k, v, q, do, lse, delta, s_t, dk, dv, qk_scale, PRECISE, UPCAST)

    # the query blocks, one per step (two per step need more than 255 registers); over all 9 chunks the walk
    # carries its chunk and sub-block, over one or two they follow from the step's index (see _step_one)
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    qy, x_first, x_last, count = _walk(cy, cx, chunks_y, chunks_x, nb_y, nb_x, -1, ALL_NB)
    qx = x_first
    qs = cy * 0
    ry, rx, real, rel = _cells(0, W, WINDOW, BLOCK)
    tile_offsets = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    for t in tl.range(0, count * SUB, num_stages=NUM_STAGES):
        if ALL_NB:
            ay = qy
            ax = qx
            a_sub = qs
            if SUB > 1:
                chunk_done = qs == SUB - 1
                next_y, next_x = _walk_next(qy, qx, x_first, x_last)
                qy = tl.where(chunk_done, next_y, qy)
                qx = tl.where(chunk_done, next_x, qx)
                qs = tl.where(chunk_done, 0, qs + 1)
            else:
                qy, qx = _walk_next(qy, qx, x_first, x_last)
        else:
            ay = cy - (t // SUB) * nb_y
            ax = cx - (t // SUB) * nb_x
            a_sub = t % SUB
        if SUB > 1:
            ry, rx, real, rel = _cells(a_sub, W, WINDOW, BLOCK)
        tok = _tokens(ay, ax, rel, G, H, W, WINDOW)
        q_ok, _ = _rows(ay, ax, ry, rx, real, H, W, WINDOW)
        q = _load_d(q_base + tok[:, None] * sqn + d[None, :], d_ok, MASK_D)
        do = _load_d(DO + (row_base + tok)[:, None] * HEAD_DIM + d[None, :], d_ok, MASK_D)
        lse = tl.load(LSE + row_base + tok, mask=q_ok, other=float("inf"))  # no token: p = 0
        delta = tl.load(DELTA + row_base + tok)
        if HAS_LB:
            tile = _tile(TILES_T, h, ay, ax, cy, cx, a_sub, ks, cut_y, cut_x, SUB, BLOCK)
            s_t = _mma_into(k, tl.trans(q), tl.load(tile + tile_offsets), PRECISE, UPCAST)
        else:
            s_t = tl.where(k_ok[:, None], _mma(k, tl.trans(q), PRECISE, UPCAST), float("-inf"))
        dk, dv = _dkdv_block(k, v, q, do, lse, delta, s_t, dk, dv, qk_scale, PRECISE, UPCAST)

    out_rows = row_base + G + k_tok
    tl.store(DK + out_rows[:, None] * HEAD_DIM + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + out_rows[:, None] * HEAD_DIM + d[None, :], dv.to(DV.dtype.element_ty), mask=k_mask)


@triton.jit
def bwd_chunk_bias_kernel(Q, K, V, DO, LSE, DELTA, TILES, PART,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                          batch, heads, G, H, W, qk_scale, nb_y, nb_x, per_group,
                          WINDOW: tl.constexpr, ALL_NB: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, PRECISE: tl.constexpr,
                          UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr):
    """The gradient of the bias tiles of one head, neighbour and pair of sub-blocks, summed over a group of
    ``per_group`` query chunks and the whole batch in a fixed order (the batch innermost): ds recomputed
    (q k^T and dO v^T) and stored into the program's own slot of PART (heads, neighbours, groups, SUB, SUB,
    BLOCK, BLOCK). Neighbours are the 9 around a chunk (ALL_NB) or the own chunk and the one at
    (nb_y, nb_x); a neighbour's groups cut the query chunks for which it lies on the grid (a rectangle of
    the chunk grid) in row-major order."""
    group = tl.program_id(0) // SUB
    qs = tl.program_id(0) % SUB
    neighbour = tl.program_id(1) // SUB
    ks = tl.program_id(1) % SUB
    h = tl.program_id(2)
    n_groups = tl.num_programs(0) // SUB
    n_neighbours = tl.num_programs(1) // SUB
    if ALL_NB:
        dy = neighbour // 3 - 1
        dx = neighbour % 3 - 1
    else:
        dy = neighbour * nb_y
        dx = neighbour * nb_x
    chunks_y, chunks_x, cut_y, cut_x = _grid(H, W, WINDOW)
    y_lo = tl.maximum(0 - dy, 0)
    x_lo = tl.maximum(0 - dx, 0)
    x_hi = tl.minimum(chunks_x, chunks_x - dx) - 1
    cols = tl.maximum(x_hi - x_lo + 1, 1)
    n_valid = (tl.minimum(chunks_y, chunks_y - dy) - y_lo) * (x_hi - x_lo + 1)
    first = group * per_group
    steps = tl.minimum(tl.maximum(n_valid - first, 0), per_group) * batch
    cy = y_lo + first // cols
    cx = x_lo + first % cols
    b = cy * 0
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_ry, q_rx, q_real, q_rel = _cells(qs, W, WINDOW, BLOCK)
    k_ry, k_rx, k_real, k_rel = _cells(ks, W, WINDOW, BLOCK)
    tile_offsets = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    n_tokens = G + H * W
    grad = tl.zeros([BLOCK, BLOCK], tl.float32)
    for _ in tl.range(0, steps, num_stages=NUM_STAGES):
        q_ok, q_origin = _rows(cy, cx, q_ry, q_rx, q_real, H, W, WINDOW)
        k_ok, k_origin = _rows(cy + dy, cx + dx, k_ry, k_rx, k_real, H, W, WINDOW)
        q_mask = q_ok[:, None] & d_ok[None, :]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        q_start = G + q_origin
        rows = (b * heads + h) * n_tokens + q_start + q_rel
        q = tl.load(Q + b * sqb + h * sqh + q_start * sqn + (q_rel[:, None] * sqn + d[None, :]), mask=q_mask,
                    other=0.0)
        do = tl.load(DO + rows[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + rows, mask=q_ok, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=q_ok, other=0.0)
        k = tl.load(K + b * skb + h * skh + (G + k_origin) * skn + (k_rel[:, None] * skn + d[None, :]),
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + (G + k_origin) * svn + (k_rel[:, None] * svn + d[None, :]),
                    mask=kv_mask, other=0.0)
        tile = _tile(TILES, h, cy, cx, cy + dy, cx + dx, qs, ks, cut_y, cut_x, SUB, BLOCK)
        s = _mma_into(q, tl.trans(k), tl.load(tile + tile_offsets), PRECISE, UPCAST)
        p = tl.exp2(s * qk_scale - lse[:, None])
        grad += p * (_mma(do, tl.trans(v), PRECISE, UPCAST) - delta[:, None])
        # next: the batch innermost, then the query chunks of the rectangle row by row
        chunk_done = b == batch - 1
        row_done = cx == x_hi
        b = tl.where(chunk_done, 0, b + 1)
        cy = tl.where(chunk_done & row_done, cy + 1, cy)
        cx = tl.where(chunk_done, tl.where(row_done, x_lo, cx + 1), cx)
    slot = (((h * n_neighbours + neighbour) * n_groups + group) * SUB + qs) * SUB + ks
    tl.store(PART + slot * (BLOCK * BLOCK) + tile_offsets, grad)
