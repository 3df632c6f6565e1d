"""ViL attention in plain PyTorch with memory linear in the number of tokens.

The local map is zero-padded right/bottom to a multiple of the window ``w`` and cut into ``w x w``
chunks. Every chunk gathers the keys and values of its 3x3 neighbourhood of chunks (``9 w^2``
tokens), so the local scores are ``(B, heads, chunks, w^2, G + 9 w^2)``: O(N * w^2), never N x N.

Both window modes use the same gather, because the exact window ``|dy|, |dx| <= w`` of a query
always lies inside the 3x3 chunks around it; the modes differ only in the mask:
- ``chunk``: every key of the neighbourhood that lies inside the map is visible;
- ``exact``: additionally ``|dy| <= w`` and ``|dx| <= w``.
Keys in the padding or outside the map are masked, never shifted, exactly as in
``vilscale.kernels.reference``. Global queries attend to all real tokens with dense ``(G, N)``
scores, which are linear in N too.

Softmax runs in fp32 whatever the input dtype; gradients flow through autograd to q, k, v and all
four bias tables.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=64)
def _window_geometry(height: int, width: int, window: int, mode: str, device: torch.device):
    """Index of the local bias table for every (query in chunk, neighbourhood key) pair, and which
    of those keys each chunk may see.

    Returns ``table_index`` (w^2, 9 w^2) and ``visible`` (mh, mw, w^2, 9 w^2) bool, where the key
    axis runs over the 9 neighbour chunks (row-major, offsets -1..1) and then the chunk's w^2 cells.
    """
    w = window
    chunks_y, chunks_x = -(-height // w), -(-width // w)
    cell = torch.arange(w * w, device=device)
    cell_y, cell_x = cell // w, cell % w
    neighbour = torch.arange(9, device=device)
    key_y = ((neighbour // 3 - 1)[:, None] * w + cell_y[None, :]).reshape(-1)  # (9w^2,) relative to chunk origin
    key_x = ((neighbour % 3 - 1)[:, None] * w + cell_x[None, :]).reshape(-1)
    dy = key_y[None, :] - cell_y[:, None]  # (w^2, 9w^2): key - query
    dx = key_x[None, :] - cell_x[:, None]
    span = 2 * w - 1
    table_index = (dy + span) * (2 * span + 1) + (dx + span)

    origin_y = torch.arange(chunks_y, device=device) * w
    origin_x = torch.arange(chunks_x, device=device) * w
    abs_y = origin_y[:, None] + key_y[None, :]  # (mh, 9w^2)
    abs_x = origin_x[:, None] + key_x[None, :]  # (mw, 9w^2)
    inside_y = (abs_y >= 0) & (abs_y < height)
    inside_x = (abs_x >= 0) & (abs_x < width)
    visible = (inside_y[:, None, None, :] & inside_x[None, :, None, :]).expand(chunks_y, chunks_x, w * w, 9 * w * w)
    if mode == "exact":
        visible = visible & ((dy.abs() <= w) & (dx.abs() <= w))[None, None]
    return table_index, visible.contiguous()


def _to_chunks(tokens: torch.Tensor, map_hw: tuple[int, int], window: int) -> torch.Tensor:
    """(B, h, H*W, d) local tokens -> (B, h, mh, mw, w^2, d), zero-padded right/bottom."""
    batch, heads, _, dim = tokens.shape
    height, width = map_hw
    w = window
    chunks_y, chunks_x = -(-height // w), -(-width // w)
    image = tokens.reshape(batch, heads, height, width, dim)
    image = F.pad(image, (0, 0, 0, chunks_x * w - width, 0, chunks_y * w - height))
    image = image.reshape(batch, heads, chunks_y, w, chunks_x, w, dim).permute(0, 1, 2, 4, 3, 5, 6)
    return image.reshape(batch, heads, chunks_y, chunks_x, w * w, dim)


def _from_chunks(chunks: torch.Tensor, map_hw: tuple[int, int], window: int) -> torch.Tensor:
    """Inverse of ``_to_chunks``: (B, h, mh, mw, w^2, d) -> (B, h, H*W, d), padding dropped."""
    batch, heads, chunks_y, chunks_x, _, dim = chunks.shape
    w = window
    image = chunks.reshape(batch, heads, chunks_y, chunks_x, w, w, dim).permute(0, 1, 2, 4, 3, 5, 6)
    image = image.reshape(batch, heads, chunks_y * w, chunks_x * w, dim)
    height, width = map_hw
    return image[:, :, :height, :width].reshape(batch, heads, height * width, dim)


def _neighbourhood(chunks: torch.Tensor) -> torch.Tensor:
    """(B, h, mh, mw, w^2, d) -> (B, h, mh, mw, 9 w^2, d): the 3x3 chunks around each chunk
    (zeros beyond the chunk grid; those keys are masked)."""
    chunks_y, chunks_x = chunks.shape[2], chunks.shape[3]
    padded = F.pad(chunks, (0, 0, 0, 0, 1, 1, 1, 1))
    return torch.cat([padded[:, :, oy:oy + chunks_y, ox:ox + chunks_x] for oy in range(3) for ox in range(3)], dim=4)


def vil_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, map_hw: tuple[int, int],
                          num_global: int, window: int, mode: str = "chunk", scale: float | None = None,
                          local_bias: torch.Tensor | None = None, g2l_bias: torch.Tensor | None = None,
                          l2g_bias: torch.Tensor | None = None, g2g_bias: torch.Tensor | None = None) -> torch.Tensor:
    """ViL attention with O(N * w^2) memory; same arguments and result as the reference."""
    heads, head_dim = q.shape[1], q.shape[3]
    scale = head_dim ** -0.5 if scale is None else scale
    g = num_global
    _check_tables(heads, g, window, local_bias, g2l_bias, l2g_bias, g2g_bias)
    table_index, visible = _window_geometry(map_hw[0], map_hw[1], window, mode, q.device)

    # Local queries: one softmax over [global keys, 3x3 neighbourhood keys].
    q_chunks = _to_chunks(q[:, :, g:], map_hw, window)  # (B, h, mh, mw, w^2, d)
    k_near = _neighbourhood(_to_chunks(k[:, :, g:], map_hw, window))  # (B, h, mh, mw, 9w^2, d)
    v_near = _neighbourhood(_to_chunks(v[:, :, g:], map_hw, window))
    local_scores = torch.matmul(q_chunks, k_near.transpose(-1, -2)).float() * scale  # (B, h, mh, mw, w^2, 9w^2)
    if local_bias is not None:
        local_scores = local_scores + local_bias.float()[:, table_index][None, :, None, None]
    local_scores = local_scores.masked_fill(~visible, float("-inf"))
    if g:
        k_global = k[:, :, None, None, :g]  # (B, h, 1, 1, G, d)
        global_scores = torch.matmul(q_chunks, k_global.transpose(-1, -2)).float() * scale  # (B, h, mh, mw, w^2, G)
        if l2g_bias is not None:
            global_scores = global_scores + l2g_bias.float()[None, :, None, None, None, :]
        local_scores = torch.cat([global_scores, local_scores], dim=-1)
    probs = local_scores.softmax(dim=-1).to(v.dtype)
    local_out = torch.matmul(probs[..., g:], v_near)
    if g:
        local_out = local_out + torch.matmul(probs[..., :g], v[:, :, None, None, :g])
    local_out = _from_chunks(local_out, map_hw, window)  # (B, h, H*W, d)
    if not g:
        return local_out.to(q.dtype)

    # Global queries: dense over all real tokens, (B, h, G, N).
    scores = torch.matmul(q[:, :, :g], k.transpose(-1, -2)).float() * scale
    if g2g_bias is not None or g2l_bias is not None:
        n_local = q.shape[2] - g
        g2g = g2g_bias.float() if g2g_bias is not None else scores.new_zeros(heads, g, g)
        g2l = (g2l_bias.float()[:, :, None] if g2l_bias is not None else scores.new_zeros(heads, g, 1))
        scores = scores + torch.cat([g2g, g2l.expand(heads, g, n_local)], dim=-1)[None]
    global_out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
    return torch.cat([global_out, local_out], dim=2).to(q.dtype)


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
