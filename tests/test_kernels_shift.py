"""The shift modes of ViL attention against the official ``Long2DSCSelfAttention`` ``mode``.

Officially (microsoft/vision-longformer, ``longformer2d.py`` and ``slidingchunk_2d.py``) a local query
sees its own chunk and neighbouring chunks that ``torch.roll`` brings under it: ``mode`` 0 all 8,
-1 none, and ``mode`` m in 1..8 the one rolled by ``MODE_SHIFTS[m]`` (the official ``mode_dict``)
over the (chunk row, chunk column) axes, with keys of chunks beyond the grid masked (its zero-padding
mask, ``exact=0``). ``official_style_local`` below computes that with rolls, independently of the
reference's dense mask and of the chunked backend's gather; every mode is checked against the
reference with ``neighbour_of_official_mode(mode)``, forward and every gradient.

With ``VILSCALE_OFFICIAL_REPO`` pointing at a checkout of microsoft/vision-longformer, the last test
also runs the official module itself (skipped otherwise; the official code is never copied here).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from vilscale.kernels.reference import (
    OWN_CHUNK,
    neighbour_of_official_mode,
    neighbour_offset,
    validate_problem,
    vil_attention_reference,
)

# The official SlidingChunk2D.mode_dict: mode -> torch.roll shifts over (chunk rows, chunk columns).
MODE_SHIFTS = {1: (1, 1), 2: (1, 0), 3: (1, -1), 4: (0, 1), 5: (0, -1), 6: (-1, 1), 7: (-1, 0), 8: (-1, -1)}
# mode 0 rolls by all nine (the official key order, "-1, -1" first), mode -1 by none.
FULL_SHIFTS = [(1, 1), (1, 0), (1, -1), (0, 1), (0, 0), (0, -1), (-1, 1), (-1, 0), (-1, -1)]


def test_official_modes_map_to_the_neighbour_torch_roll_brings_in():
    chunks_y, chunks_x = 5, 6
    grid = torch.arange(chunks_y * chunks_x).reshape(chunks_y, chunks_x)
    for mode, shift in MODE_SHIFTS.items():
        rolled = torch.roll(grid, shifts=shift, dims=(0, 1))
        offset_y, offset_x = neighbour_offset(neighbour_of_official_mode(mode))
        for y in range(1, chunks_y - 1):  # interior chunks: no wrap-around
            for x in range(1, chunks_x - 1):
                assert rolled[y, x] == grid[y + offset_y, x + offset_x], (mode, y, x)
    assert neighbour_of_official_mode(0) is None and neighbour_of_official_mode(-1) == OWN_CHUNK
    assert sorted(neighbour_of_official_mode(m) for m in range(1, 9)) == [0, 1, 2, 3, 5, 6, 7, 8]
    # the official mask and bias pick block chunk_id = mode if mode > 4 else mode - 1 of the 9
    assert all(neighbour_of_official_mode(m) == (m if m > 4 else m - 1) for m in range(1, 9))
    with pytest.raises(ValueError, match="official mode 9"):
        neighbour_of_official_mode(9)


def _framed_chunks(image: torch.Tensor, window: int, fill) -> torch.Tensor:
    """(B, H, W, ...) -> (B, mh + 2, mw + 2, w^2, ...): zero-padded to whole chunks, with one chunk of
    ``fill`` around the grid, so that a roll by one chunk never wraps real data around."""
    batch, height, width = image.shape[:3]
    rest = image.shape[3:]
    chunks_y, chunks_x = -(-height // window), -(-width // window)
    padded = image.new_full((batch, chunks_y * window, chunks_x * window, *rest), fill)
    padded[:, :height, :width] = image
    chunks = padded.reshape(batch, chunks_y, window, chunks_x, window, *rest).transpose(2, 3)
    chunks = chunks.reshape(batch, chunks_y, chunks_x, window * window, *rest)
    framed = image.new_full((batch, chunks_y + 2, chunks_x + 2, window * window, *rest), fill)
    framed[:, 1:-1, 1:-1] = chunks
    return framed


def official_style_local(q, k, v, *, map_hw, num_global, window, mode, official_table=None, l2g_bias=None):
    """(B, h, H*W, d) output of the local queries, as the official module computes it in ``mode``."""
    batch, heads, _, dim = q.shape
    height, width = map_hw
    g, w = num_global, window
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([rows, cols], -1)[None].float()  # (1, H, W, 2) absolute positions
    real = torch.ones(1, height, width, dtype=torch.bool)
    framed_q, framed_k, framed_v = (_framed_chunks(t[:, :, g:].reshape(batch * heads, height, width, dim), w, 0.0)
                                    for t in (q, k, v))
    framed_coords = _framed_chunks(coords, w, -1000.0)  # (1, mh+2, mw+2, w^2, 2)
    framed_real = _framed_chunks(real, w, False)
    chunks_y, chunks_x = framed_q.shape[1] - 2, framed_q.shape[2] - 2

    def centre(t):
        return t[:, 1:-1, 1:-1]

    shifts = FULL_SHIFTS if mode == 0 else [(0, 0)] if mode == -1 else [(0, 0), MODE_SHIFTS[mode]]
    query = centre(framed_q) * dim ** -0.5  # (Bh, mh, mw, w^2, d)
    query_coords = centre(framed_coords)
    scores, values = [], []
    for shift in shifts:
        key, value, key_coords, key_real = (centre(torch.roll(t, shifts=shift, dims=(1, 2)))
                                            for t in (framed_k, framed_v, framed_coords, framed_real))
        block = torch.einsum("bmnld,bmntd->bmnlt", query, key)
        if official_table is not None:  # official index: query - key, table (entries, heads)
            rel = (query_coords[:, :, :, :, None] - key_coords[:, :, :, None, :]).long() + 2 * w - 1
            index = (rel[..., 0] * (4 * w - 1) + rel[..., 1]).clamp(0, official_table.shape[0] - 1)
            bias = official_table[index[0]].permute(4, 0, 1, 2, 3)  # (h, mh, mw, w^2, w^2)
            block = (block.view(batch, heads, *block.shape[1:]) + bias).view_as(block)
        scores.append(block.masked_fill(~key_real[:, :, :, None, :], float("-inf")))
        values.append(value)
    k_global = k[:, :, :g].reshape(batch * heads, g, dim)
    global_scores = torch.einsum("bmnld,btd->bmnlt", query, k_global)
    if l2g_bias is not None and g:
        global_scores = (global_scores.view(batch, heads, *global_scores.shape[1:])
                         + l2g_bias[None, :, None, None, None, :]).view_as(global_scores)
    probs = torch.cat([global_scores, *scores], dim=-1).softmax(-1)
    out = torch.einsum("bmnlt,btd->bmnld", probs[..., :g], v[:, :, :g].reshape(batch * heads, g, dim))
    for index, value in enumerate(values):
        out = out + torch.einsum("bmnlt,bmntd->bmnld", probs[..., g + index * w * w:g + (index + 1) * w * w], value)
    image = out.reshape(batch * heads, chunks_y, chunks_x, w, w, dim).transpose(2, 3)
    image = image.reshape(batch, heads, chunks_y * w, chunks_x * w, dim)[:, :, :height, :width]
    return image.reshape(batch, heads, height * width, dim)


def _leaves(map_hw, window, num_global, seed=0, heads=2, head_dim=6):
    generator = torch.Generator().manual_seed(seed)
    tokens = num_global + map_hw[0] * map_hw[1]
    qkv = [torch.randn(2, heads, tokens, head_dim, generator=generator).requires_grad_() for _ in range(3)]
    local = torch.randn(heads, (4 * window - 1) ** 2, generator=generator).requires_grad_()
    l2g = torch.randn(heads, num_global, generator=generator).requires_grad_()
    return qkv, local, l2g


@pytest.mark.parametrize("mode", [0, -1, 1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("map_hw,window,num_global", [((7, 10), 3, 1), ((6, 6), 2, 0), ((5, 8), 2, 2)])
def test_reference_matches_the_official_algorithm_forward_and_gradients(mode, map_hw, window, num_global):
    qkv, local, l2g = _leaves(map_hw, window, num_global, seed=mode + 10)
    neighbour = neighbour_of_official_mode(mode)
    ours = vil_attention_reference(*qkv, map_hw=map_hw, num_global=num_global, window=window, neighbour=neighbour,
                                   local_bias=local, l2g_bias=l2g)[:, :, num_global:]
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    ours_grads = torch.autograd.grad(ours, [*qkv, local, l2g], grad, allow_unused=True)
    # the official table is ours reversed and transposed (see vilscale.model.official)
    theirs = official_style_local(*qkv, map_hw=map_hw, num_global=num_global, window=window, mode=mode,
                                  official_table=local.flip(1).t(), l2g_bias=l2g)
    theirs_grads = torch.autograd.grad(theirs, [*qkv, local, l2g], grad, allow_unused=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for name, mine, official in zip(["q", "k", "v", "local_bias", "l2g_bias"], ours_grads, theirs_grads):
        if official is None:
            assert mine is None or not mine.any(), name
            continue
        scale = official.abs().max().item()  # sums of many fp32 terms: error relative to the largest
        torch.testing.assert_close(mine, official, rtol=1e-5, atol=1e-6 * scale, msg=f"gradient of {name}, mode {mode}")


def test_a_neighbour_changes_what_a_border_query_sees_and_only_in_chunk_mode():
    # Chunk 0 of a 2x2 grid: neighbour 8 (down-right) adds keys, neighbour 0 (up-left) is off the grid.
    qkv, _, _ = _leaves((4, 4), 2, 0)
    problem = dict(map_hw=(4, 4), num_global=0, window=2)
    own = vil_attention_reference(*qkv, **problem, neighbour=OWN_CHUNK)
    up_left = vil_attention_reference(*qkv, **problem, neighbour=0)
    down_right = vil_attention_reference(*qkv, **problem, neighbour=8)
    full = vil_attention_reference(*qkv, **problem)
    torch.testing.assert_close(up_left[:, :, 0], own[:, :, 0])
    assert not torch.allclose(down_right[:, :, 0], own[:, :, 0])
    assert not torch.allclose(full[:, :, 0], down_right[:, :, 0])
    with pytest.raises(ValueError, match="mode='chunk'"):
        validate_problem(*qkv, **problem, mode="exact", neighbour=3)
    with pytest.raises(ValueError, match="0..8"):
        validate_problem(*qkv, **problem, mode="chunk", neighbour=9)


OFFICIAL_REPO = os.environ.get("VILSCALE_OFFICIAL_REPO")


@pytest.mark.skipif(not OFFICIAL_REPO, reason="set VILSCALE_OFFICIAL_REPO to a microsoft/vision-longformer checkout")
@pytest.mark.parametrize("mode", [0, -1, 3, 5, 8])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_vil_attention_module_matches_the_official_module(mode, backend, monkeypatch):
    """ViLAttention in random shift mode, with the draw fixed to ``mode``, against the official
    Long2DSCSelfAttention in training with ``random.randrange`` fixed to ``mode``: output and the
    gradients of the input and of every weight."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from model import official_msvit  # noqa: E402  (imports the official package from the checkout)

    from vilscale.model.attention import ViLAttention

    official_msvit(OFFICIAL_REPO)
    longformer2d = sys.modules["vil_official.layers.longformer2d"]
    dim, heads, window, side, num_global = 32, 2, 3, 8, 1
    shift_mode = {0: "full", -1: "own"}.get(mode, "random")
    ours = ViLAttention(dim, heads, num_global=num_global, window=window, window_mode="chunk", rpe=True,
                        backend=backend, shift_mode=shift_mode)
    official = longformer2d.Long2DSCSelfAttention(dim, num_heads=heads, qkv_bias=True, w=window, sharew=True,
                                                  nglo=num_global, rpe=True, mode=mode if mode <= 0 else 1)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0, 0.3)
        official.query.weight.copy_(ours.qkv.weight[:dim])
        official.query.bias.copy_(ours.qkv.bias[:dim])
        official.kv.weight.copy_(ours.qkv.weight[dim:])
        official.kv.bias.copy_(ours.qkv.bias[dim:])
        official.proj.load_state_dict(ours.proj.state_dict())
        official.local_relative_position_bias_table.copy_(ours.rel_bias_local.flip(1).t())
        official.g2l_relative_position_bias.copy_(torch.stack([ours.rel_bias_g2l, ours.rel_bias_l2g]))
        official.g2g_relative_position_bias.copy_(ours.rel_bias_g2g)
    monkeypatch.setattr(longformer2d.random, "randrange", lambda start, stop: mode)  # the official draw
    if shift_mode == "random":
        monkeypatch.setattr(ours, "neighbour", lambda: neighbour_of_official_mode(mode))  # ours
    ours.train(), official.train()
    x = torch.randn(2, num_global + side * side, dim, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x_ours, x_official = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_official = ours(x_ours, (side, side)), official(x_official, side, side)
    def close(mine, official, what):
        scale = official.abs().max().item()  # fp32 sums of many terms: error relative to the largest
        torch.testing.assert_close(mine, official, rtol=1e-4, atol=1e-5 * scale, msg=f"{what}, mode {mode}")

    close(out_ours, out_official, "output")
    (out_ours * grad).sum().backward()
    (out_official * grad).sum().backward()
    close(x_ours.grad, x_official.grad, "input gradient")
    close(ours.qkv.weight.grad, torch.cat([official.query.weight.grad, official.kv.weight.grad]), "qkv weight")
    close(ours.qkv.bias.grad, torch.cat([official.query.bias.grad, official.kv.bias.grad]), "qkv bias")
    close(ours.proj.weight.grad, official.proj.weight.grad, "proj weight")
    close(ours.rel_bias_local.grad, official.local_relative_position_bias_table.grad.t().flip(1), "local table")
    close(torch.stack([ours.rel_bias_g2l.grad, ours.rel_bias_l2g.grad]), official.g2l_relative_position_bias.grad,
          "g2l/l2g tables")
    close(ours.rel_bias_g2g.grad, official.g2g_relative_position_bias.grad, "g2g table")
