"""Triton kernels of ViL attention (forward and backward). Launched by ``triton_attention``.

Layout and semantics are those of ``vilscale.kernels.reference``: tokens ``(B, heads, G + H*W, d)``
with the ``G`` global tokens first. Scores live in the log2 domain inside the kernels
(``s2 = (q.k * scale + bias) * log2(e)``), so the saved log-sum-exp ``lse`` is base 2 as well.

Local work is tiled over the map: a program owns a ``TILE_Y x TILE_X`` tile of local queries (or,
for dk/dv, of local keys) and walks the rows of the small rectangle of the map its tile can see,
one map row segment of ``KEY_W`` tokens per step, plus the global tokens. With all 9 chunks
(``ALL_NB``) or exact windows visibility is symmetric, so a key tile walks the query rectangle a
query tile would; with one neighbour at chunk offset ``(nb_y, nb_x)`` (the random-shift and
own-chunk modes, where ``(0, 0)`` is the own chunk), a query tile walks its chunks and the ones at
``+(nb_y, nb_x)``, a key tile its chunks and the ones at ``-(nb_y, nb_x)``.
Global queries and global keys see every token; their kernels split the local tokens into
``split`` ranges whose partial results the host reduces in a fixed order (deterministic). They
compute in fp32 whatever the input dtype: their work is only O(G * N * d), and the gradients of the
global rows need it. The g2l gradient (the sum of ds over every local key, which nearly cancels) is
taken as minus the sum over the global keys instead.

Importing this module does not touch CUDA. ``TRITON_INTERPRET`` is read by ``triton.jit`` when this
module is imported: with it set, the kernels run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
LOG2E = 1.4426950408889634


def _inline(fn):
    """Device helpers are jit functions when compiled; under the interpreter they stay plain Python
    functions, because Triton 3.9's interpreter re-patches ``triton.language`` (about 1 ms) on every
    call of a nested jit function, which made the CPU tests twice as slow. Same code either way."""
    return fn if INTERPRETED else triton.jit(fn)


@_inline
def _mma(a, b, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST works around Triton 3.9's interpreter, whose tl.dot multiplies the raw bits of bf16
    # operands; the operands are already rounded to their dtype, so the product is unchanged.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif PRECISE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@_inline
def _span(lo, hi, size, shift, WINDOW: tl.constexpr, CHUNK: tl.constexpr, ALL_NB: tl.constexpr):
    """Map rows (or columns) [start, stop) seen by the tokens lo..hi (inclusive) of one axis. With
    chunks and one neighbour (not ALL_NB), the other side lies in the own chunk or ``shift`` chunks away."""
    if CHUNK:
        if ALL_NB:
            start = tl.maximum((lo // WINDOW - 1) * WINDOW, 0)
            stop = tl.minimum((hi // WINDOW + 2) * WINDOW, size)
        else:
            start = tl.maximum((lo // WINDOW + tl.minimum(shift, 0)) * WINDOW, 0)
            stop = tl.minimum((hi // WINDOW + 1 + tl.maximum(shift, 0)) * WINDOW, size)
    else:
        start = tl.maximum(lo - WINDOW, 0)
        stop = tl.minimum(hi + WINDOW + 1, size)
    return start, stop


@_inline
def _visible(qy, qx, ky, kx, nb_y, nb_x, WINDOW: tl.constexpr, CHUNK: tl.constexpr, ALL_NB: tl.constexpr):
    """Whether local query (qy, qx) sees local key (ky, kx); coordinates are >= 0. Chunk windows see
    the 3x3 chunks around the query's (ALL_NB), or its own chunk and the one at chunk offset (nb_y, nb_x)."""
    if CHUNK:
        dy = ky // WINDOW - qy // WINDOW
        dx = kx // WINDOW - qx // WINDOW
        if ALL_NB:
            seen = (dy <= 1) & (dy >= -1) & (dx <= 1) & (dx >= -1)
        else:
            seen = ((dy == 0) & (dx == 0)) | ((dy == nb_y) & (dx == nb_x))
    else:
        dy = ky - qy
        dx = kx - qx
        seen = (dy <= WINDOW) & (dy >= -WINDOW) & (dx <= WINDOW) & (dx >= -WINDOW)
    return seen


@_inline
def _local_bias(LB, h, qy, qx, ky, kx, seen, WINDOW: tl.constexpr):
    """The local table entry for (key - query), fp32, 0 where not seen."""
    span: tl.constexpr = 2 * WINDOW - 1
    width: tl.constexpr = 4 * WINDOW - 1
    index = (ky - qy + span) * width + (kx - qx + span)
    return tl.load(LB + h * width * width + index, mask=seen, other=0.0).to(tl.float32)


@_inline
def _tile_origin(tile, W, TILE_Y: tl.constexpr, TILE_X: tl.constexpr):
    tiles_x = tl.cdiv(W, TILE_X)
    return (tile // tiles_x) * TILE_Y, (tile % tiles_x) * TILE_X


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@triton.jit
def fwd_local_kernel(Q, K, V, OUT, LSE, LB, L2G,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     heads, G, H, W, qk_scale, nb_y, nb_x,
                     WINDOW: tl.constexpr, CHUNK: tl.constexpr, ALL_NB: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, HAS_LB: tl.constexpr,
                     HAS_L2G: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
                     TILE_Y: tl.constexpr, TILE_X: tl.constexpr, KEY_W: tl.constexpr):
    """One program: a TILE_Y x TILE_X tile of local queries of one (batch, head)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    n_tokens = G + H * W
    y0, x0 = _tile_origin(tile, W, TILE_Y, TILE_X)

    m = tl.arange(0, TILE_Y * TILE_X)
    qy = y0 + m // TILE_X
    qx = x0 + m % TILE_X
    q_ok = (qy < H) & (qx < W)
    q_tok = G + qy * W + qx
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + q_tok[:, None] * sqn + d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([TILE_Y * TILE_X], -1.0e30, tl.float32)
    l_i = tl.zeros([TILE_Y * TILE_X], tl.float32)
    acc = tl.zeros([TILE_Y * TILE_X, BLOCK_D], tl.float32)

    # global keys
    for g0 in range(0, G, BLOCK_G):
        j = g0 + tl.arange(0, BLOCK_G)
        j_ok = j < G
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + j[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) * qk_scale
        if HAS_L2G:
            s += tl.load(L2G + h * G + j, mask=j_ok, other=0.0).to(tl.float32)[None, :] * 1.4426950408889634
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PRECISE, UPCAST)
        m_i = m_new

    # local keys: the rows of the rectangle the tile sees, one row segment at a time
    ky_start, ky_stop = _span(y0, tl.minimum(y0 + TILE_Y, H) - 1, H, nb_y, WINDOW, CHUNK, ALL_NB)
    kx_start, kx_stop = _span(x0, tl.minimum(x0 + TILE_X, W) - 1, W, nb_x, WINDOW, CHUNK, ALL_NB)
    n = tl.arange(0, KEY_W)
    kx = kx_start + n
    kx_ok = kx < kx_stop
    for ky in range(ky_start, ky_stop):
        k_tok = G + ky * W + kx
        kv_mask = kx_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_tok[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + k_tok[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) * qk_scale
        seen = _visible(qy[:, None], qx[:, None], ky, kx[None, :], nb_y, nb_x, WINDOW, CHUNK, ALL_NB)
        seen = seen & q_ok[:, None] & kx_ok[None, :]
        if HAS_LB:
            s += _local_bias(LB, h, qy[:, None], qx[:, None], ky, kx[None, :], seen, WINDOW) * 1.4426950408889634
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PRECISE, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_rows = bh * n_tokens + q_tok
    tl.store(OUT + o_rows[:, None] * HEAD_DIM + d[None, :], out.to(OUT.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + o_rows, m_i + tl.log2(l_safe), mask=q_ok)


@triton.jit
def fwd_global_kernel(Q, K, V, PO, PM, PL, G2L, G2G,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                      heads, G, n_local, split_tokens, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_N: tl.constexpr, HAS_G2L: tl.constexpr, HAS_G2G: tl.constexpr,
                      PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BLOCK_G global queries against one split of the local tokens (the first split
    also takes the global keys). Writes the unnormalised partial output and its (max, sum)."""
    split = tl.program_id(0)
    gblock = tl.program_id(1)
    bh = tl.program_id(2)
    n_bh = tl.num_programs(2)
    b = bh // heads
    h = bh % heads
    i = gblock * BLOCK_G + tl.arange(0, BLOCK_G)
    i_ok = i < G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + i[:, None] * sqn + d[None, :], mask=i_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    g_stop = tl.where(split == 0, G, 0)
    for g0 in range(0, g_stop, BLOCK_G):
        j = g0 + tl.arange(0, BLOCK_G)
        j_ok = j < G
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + j[:, None] * svn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) * qk_scale
        if HAS_G2G:
            s += tl.load(G2G + (h * G + i[:, None]) * G + j[None, :], mask=i_ok[:, None] & j_ok[None, :],
                         other=0.0).to(tl.float32) * 1.4426950408889634
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PRECISE, UPCAST)
        m_i = m_new

    row_bias = tl.zeros([BLOCK_G], tl.float32)
    if HAS_G2L:
        row_bias = tl.load(G2L + h * G + i, mask=i_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    start = split * split_tokens
    stop = tl.minimum(start + split_tokens, n_local)
    for n0 in range(start, stop, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        t_ok = t < stop
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + (G + t)[:, None] * skn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + (G + t)[:, None] * svn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) * qk_scale + row_bias[:, None]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PRECISE, UPCAST)
        m_i = m_new

    rows = (split * n_bh + bh) * G + i
    tl.store(PO + rows[:, None] * HEAD_DIM + d[None, :], acc, mask=i_ok[:, None] & d_ok[None, :])
    tl.store(PM + rows, m_i, mask=i_ok)
    tl.store(PL + rows, l_i, mask=i_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

@triton.jit
def bwd_local_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, LB, L2G, PLB,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                        heads, G, H, W, qk_scale, scale, nb_y, nb_x,
                        WINDOW: tl.constexpr, CHUNK: tl.constexpr, ALL_NB: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, HAS_LB: tl.constexpr,
                        HAS_L2G: tl.constexpr, LB_GRAD: tl.constexpr, RADIUS: tl.constexpr,
                        OFFSETS: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
                        TILE_Y: tl.constexpr, TILE_X: tl.constexpr, KEY_W: tl.constexpr):
    """dq of a tile of local queries, and this tile's partial gradient of the local table:
    an OFFSETS x OFFSETS grid indexed by (dy + RADIUS, dx + RADIUS), RADIUS the largest visible |offset|."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    n_tiles = tl.num_programs(0)
    b = bh // heads
    h = bh % heads
    n_tokens = G + H * W
    y0, x0 = _tile_origin(tile, W, TILE_Y, TILE_X)

    m = tl.arange(0, TILE_Y * TILE_X)
    qy = y0 + m // TILE_X
    qx = x0 + m % TILE_X
    q_ok = (qy < H) & (qx < W)
    q_tok = G + qy * W + qx
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + q_tok[:, None] * sqn + d[None, :], mask=q_mask, other=0.0)
    rows = bh * n_tokens + q_tok
    do = tl.load(DO + rows[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + rows, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + rows, mask=q_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([TILE_Y * TILE_X, BLOCK_D], tl.float32)

    for g0 in range(0, G, BLOCK_G):
        j = g0 + tl.arange(0, BLOCK_G)
        j_ok = j < G
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + j[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) * qk_scale
        if HAS_L2G:
            s += tl.load(L2G + h * G + j, mask=j_ok, other=0.0).to(tl.float32)[None, :] * 1.4426950408889634
        p = tl.where(j_ok[None, :] & q_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dp = _mma(do, tl.trans(v), PRECISE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, PRECISE, UPCAST)

    ky_start, ky_stop = _span(y0, tl.minimum(y0 + TILE_Y, H) - 1, H, nb_y, WINDOW, CHUNK, ALL_NB)
    kx_start, kx_stop = _span(x0, tl.minimum(x0 + TILE_X, W) - 1, W, nb_x, WINDOW, CHUNK, ALL_NB)
    n = tl.arange(0, KEY_W)
    kx = kx_start + n
    kx_ok = kx < kx_stop
    if LB_GRAD:
        # ds[m, n] belongs to dx = kx_start + n - qx[m]; gathering column n = dx + qx - kx_start for
        # dx = j - RADIUS lines the row segment up by offset, the same shift for every key row.
        j_off = tl.arange(0, OFFSETS)
        col = j_off[None, :] - RADIUS + qx[:, None] - kx_start
        col_ok = (col >= 0) & (col < KEY_W)
        col = tl.minimum(tl.maximum(col, 0), KEY_W - 1)
        i_off = tl.arange(0, OFFSETS)
        lb_acc = tl.zeros([OFFSETS, OFFSETS], tl.float32)
    for ky in range(ky_start, ky_stop):
        k_tok = G + ky * W + kx
        kv_mask = kx_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_tok[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + k_tok[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) * qk_scale
        seen = _visible(qy[:, None], qx[:, None], ky, kx[None, :], nb_y, nb_x, WINDOW, CHUNK, ALL_NB)
        seen = seen & q_ok[:, None] & kx_ok[None, :]
        if HAS_LB:
            s += _local_bias(LB, h, qy[:, None], qx[:, None], ky, kx[None, :], seen, WINDOW) * 1.4426950408889634
        p = tl.where(seen, tl.exp2(s - lse[:, None]), 0.0)
        dp = _mma(do, tl.trans(v), PRECISE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, PRECISE, UPCAST)
        if LB_GRAD:
            by_dx = tl.where(col_ok, tl.gather(ds, col, axis=1), 0.0)  # (M, OFFSETS): [m, dx + RADIUS]
            by_row = tl.sum(tl.reshape(by_dx, (TILE_Y, TILE_X, OFFSETS)), axis=1)  # (TILE_Y, OFFSETS)
            # query row ty has dy = ky - y0 - ty, i.e. grid row i = dy + RADIUS comes from ty = ky - y0 + RADIUS - i
            ty = (ky - y0 + RADIUS) - i_off[:, None] + tl.zeros([OFFSETS, OFFSETS], tl.int32)
            ty_ok = (ty >= 0) & (ty < TILE_Y)
            ty = tl.minimum(tl.maximum(ty, 0), TILE_Y - 1)
            lb_acc += tl.where(ty_ok, tl.gather(by_row, ty, axis=0), 0.0)

    tl.store(DQ + rows[:, None] * HEAD_DIM + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)
    if LB_GRAD:
        slot = bh * n_tiles + tile
        r = tl.arange(0, OFFSETS)
        tl.store(PLB + (slot * OFFSETS + r[:, None]) * OFFSETS + r[None, :], lb_acc)


@triton.jit
def bwd_local_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, LB, G2L,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                          heads, G, H, W, qk_scale, scale, nb_y, nb_x,
                          WINDOW: tl.constexpr, CHUNK: tl.constexpr, ALL_NB: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, HAS_LB: tl.constexpr,
                          HAS_G2L: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr,
                          TILE_Y: tl.constexpr, TILE_X: tl.constexpr, KEY_W: tl.constexpr):
    """dk, dv of a tile of local keys: every global query and the local queries that see it."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    n_tokens = G + H * W
    y0, x0 = _tile_origin(tile, W, TILE_Y, TILE_X)

    m = tl.arange(0, TILE_Y * TILE_X)
    ky = y0 + m // TILE_X
    kx = x0 + m % TILE_X
    k_ok = (ky < H) & (kx < W)
    k_tok = G + ky * W + kx
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    k_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + k_tok[:, None] * skn + d[None, :], mask=k_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + k_tok[:, None] * svn + d[None, :], mask=k_mask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    row_base = bh * n_tokens
    dk = tl.zeros([TILE_Y * TILE_X, BLOCK_D], tl.float32)
    dv = tl.zeros([TILE_Y * TILE_X, BLOCK_D], tl.float32)

    for g0 in range(0, G, BLOCK_G):
        i = g0 + tl.arange(0, BLOCK_G)
        i_ok = i < G
        q_mask = i_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + i[:, None] * sqn + d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + (row_base + i)[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + row_base + i, mask=i_ok, other=0.0)
        delta = tl.load(DELTA + row_base + i, mask=i_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), PRECISE, UPCAST) * qk_scale  # (keys, queries)
        if HAS_G2L:
            s_t += tl.load(G2L + h * G + i, mask=i_ok, other=0.0).to(tl.float32)[None, :] * 1.4426950408889634
        p_t = tl.where(k_ok[:, None] & i_ok[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += _mma(p_t.to(do.dtype), do, PRECISE, UPCAST)
        dp_t = _mma(v, tl.trans(do), PRECISE, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mma(ds_t.to(q.dtype), q, PRECISE, UPCAST)

    # the queries that see this key tile lie in its chunks or -(nb_y, nb_x) chunks away
    qy_start, qy_stop = _span(y0, tl.minimum(y0 + TILE_Y, H) - 1, H, 0 - nb_y, WINDOW, CHUNK, ALL_NB)
    qx_start, qx_stop = _span(x0, tl.minimum(x0 + TILE_X, W) - 1, W, 0 - nb_x, WINDOW, CHUNK, ALL_NB)
    n = tl.arange(0, KEY_W)
    qx = qx_start + n
    qx_ok = qx < qx_stop
    for qy in range(qy_start, qy_stop):
        q_tok = G + qy * W + qx
        q_mask = qx_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + q_tok[:, None] * sqn + d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + (row_base + q_tok)[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + row_base + q_tok, mask=qx_ok, other=0.0)
        delta = tl.load(DELTA + row_base + q_tok, mask=qx_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), PRECISE, UPCAST) * qk_scale
        seen = _visible(qy, qx[None, :], ky[:, None], kx[:, None], nb_y, nb_x, WINDOW, CHUNK, ALL_NB)
        seen = seen & k_ok[:, None] & qx_ok[None, :]
        if HAS_LB:
            s_t += _local_bias(LB, h, qy, qx[None, :], ky[:, None], kx[:, None], seen, WINDOW) * 1.4426950408889634
        p_t = tl.where(seen, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += _mma(p_t.to(do.dtype), do, PRECISE, UPCAST)
        dp_t = _mma(v, tl.trans(do), PRECISE, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mma(ds_t.to(q.dtype), q, PRECISE, UPCAST)

    out_rows = row_base + k_tok
    tl.store(DK + out_rows[:, None] * HEAD_DIM + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + out_rows[:, None] * HEAD_DIM + d[None, :], dv.to(DV.dtype.element_ty), mask=k_mask)


@triton.jit
def bwd_global_dq_kernel(Q, K, V, DO, LSE, DELTA, PDQ, PGG, G2L, G2G,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                         heads, G, n_local, split_tokens, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_G2L: tl.constexpr, HAS_G2G: tl.constexpr,
                         KEEP_GG: tl.constexpr, PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """Partial dq of BLOCK_G global queries over one split of the keys; split 0 also stores ds of every
    (global query, global key) pair when KEEP_GG: the g2g gradient, and the g2l gradient by the identity
    sum over all keys of ds = 0 (the sum over the local keys is minus the sum over the global ones; summed
    directly, thousands of terms that nearly cancel lose most of fp32's digits)."""
    split = tl.program_id(0)
    gblock = tl.program_id(1)
    bh = tl.program_id(2)
    n_bh = tl.num_programs(2)
    b = bh // heads
    h = bh % heads
    n_tokens = G + n_local
    i = gblock * BLOCK_G + tl.arange(0, BLOCK_G)
    i_ok = i < G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_mask = i_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + i[:, None] * sqn + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    rows = bh * n_tokens + i
    do = tl.load(DO + rows[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + rows, mask=i_ok, other=0.0)
    delta = tl.load(DELTA + rows, mask=i_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    g_stop = tl.where(split == 0, G, 0)
    for g0 in range(0, g_stop, BLOCK_G):
        j = g0 + tl.arange(0, BLOCK_G)
        j_ok = j < G
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + j[:, None] * svn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) * qk_scale
        pair_ok = i_ok[:, None] & j_ok[None, :]
        if HAS_G2G:
            s += tl.load(G2G + (h * G + i[:, None]) * G + j[None, :], mask=pair_ok,
                         other=0.0).to(tl.float32) * 1.4426950408889634
        p = tl.where(pair_ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = _mma(do, tl.trans(v), PRECISE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, PRECISE, UPCAST)
        if KEEP_GG:
            tl.store(PGG + (bh * G + i[:, None]) * G + j[None, :], ds, mask=pair_ok)

    row_bias = tl.zeros([BLOCK_G], tl.float32)
    if HAS_G2L:
        row_bias = tl.load(G2L + h * G + i, mask=i_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    start = split * split_tokens
    stop = tl.minimum(start + split_tokens, n_local)
    for n0 in range(start, stop, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        t_ok = t < stop
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + (G + t)[:, None] * skn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + (G + t)[:, None] * svn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = _mma(q, tl.trans(k), PRECISE, UPCAST) * qk_scale + row_bias[:, None]
        p = tl.where(i_ok[:, None] & t_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _mma(do, tl.trans(v), PRECISE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, PRECISE, UPCAST)

    out_rows = (split * n_bh + bh) * G + i
    tl.store(PDQ + out_rows[:, None] * HEAD_DIM + d[None, :], dq, mask=q_mask)


@triton.jit
def bwd_global_dkdv_kernel(Q, K, V, DO, LSE, DELTA, PDK, PDV, PL2G, L2G, G2G,
                           sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                           heads, G, n_local, split_tokens, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                           BLOCK_N: tl.constexpr, HAS_L2G: tl.constexpr, HAS_G2G: tl.constexpr,
                           PRECISE: tl.constexpr, UPCAST: tl.constexpr):
    """Partial dk, dv of BLOCK_G global keys over one split of the queries (split 0 also takes the
    global queries), with the partial gradient of l2g (sums over local queries)."""
    split = tl.program_id(0)
    gblock = tl.program_id(1)
    bh = tl.program_id(2)
    n_bh = tl.num_programs(2)
    b = bh // heads
    h = bh % heads
    n_tokens = G + n_local
    j = gblock * BLOCK_G + tl.arange(0, BLOCK_G)
    j_ok = j < G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    k_mask = j_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + j[:, None] * skn + d[None, :], mask=k_mask, other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + h * svh + j[:, None] * svn + d[None, :], mask=k_mask, other=0.0).to(tl.float32)
    q_base = Q + b * sqb + h * sqh
    row_base = bh * n_tokens
    dk = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    g_stop = tl.where(split == 0, G, 0)
    for g0 in range(0, g_stop, BLOCK_G):
        i = g0 + tl.arange(0, BLOCK_G)
        i_ok = i < G
        q_mask = i_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + i[:, None] * sqn + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + (row_base + i)[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + row_base + i, mask=i_ok, other=0.0)
        delta = tl.load(DELTA + row_base + i, mask=i_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), PRECISE, UPCAST) * qk_scale  # (keys j, queries i)
        pair_ok = j_ok[:, None] & i_ok[None, :]
        if HAS_G2G:
            s_t += tl.load(G2G + (h * G + i[None, :]) * G + j[:, None], mask=pair_ok,
                           other=0.0).to(tl.float32) * 1.4426950408889634
        p_t = tl.where(pair_ok, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += _mma(p_t.to(do.dtype), do, PRECISE, UPCAST)
        dp_t = _mma(v, tl.trans(do), PRECISE, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mma(ds_t.to(q.dtype), q, PRECISE, UPCAST)

    col_bias = tl.zeros([BLOCK_G], tl.float32)
    if HAS_L2G:
        col_bias = tl.load(L2G + h * G + j, mask=j_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    l2g_acc = tl.zeros([BLOCK_G], tl.float32)
    start = split * split_tokens
    stop = tl.minimum(start + split_tokens, n_local)
    for n0 in range(start, stop, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        t_ok = t < stop
        q_mask = t_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + (G + t)[:, None] * sqn + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + (row_base + G + t)[:, None] * HEAD_DIM + d[None, :], mask=q_mask,
                     other=0.0).to(tl.float32)
        lse = tl.load(LSE + row_base + G + t, mask=t_ok, other=0.0)
        delta = tl.load(DELTA + row_base + G + t, mask=t_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), PRECISE, UPCAST) * qk_scale + col_bias[:, None]
        p_t = tl.where(j_ok[:, None] & t_ok[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += _mma(p_t.to(do.dtype), do, PRECISE, UPCAST)
        dp_t = _mma(v, tl.trans(do), PRECISE, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mma(ds_t.to(q.dtype), q, PRECISE, UPCAST)
        l2g_acc += tl.sum(ds_t, 1)

    out_rows = (split * n_bh + bh) * G + j
    tl.store(PDK + out_rows[:, None] * HEAD_DIM + d[None, :], dk, mask=k_mask)
    tl.store(PDV + out_rows[:, None] * HEAD_DIM + d[None, :], dv, mask=k_mask)
    tl.store(PL2G + out_rows, l2g_acc, mask=j_ok)
