"""The fused Triton backend on a CUDA device: the sweep over every variant's stage shapes at 224
and 384, a 1024x1024 backbone input, each dtype and window mode, 0/1/3 global tokens, and every
neighbour of the shift modes.

Tests marked ``gpu`` are skipped on machines without CUDA (tests/conftest.py). The 1024 backbone
map has 65537 tokens, too many for the dense reference, so it is checked against
``reference_rows``: the same definition evaluated for a subset of query rows, itself checked
against ``vil_attention_reference`` on CPU below.
"""

from __future__ import annotations

import pytest
import torch

from vilscale.kernels.reference import vil_attention_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative to the largest magnitude of the reference tensor (see tests/test_kernels_triton.py).
TOLERANCE = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 2e-2}
TABLE_TOLERANCE = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 5e-2}
WINDOW = 7

# (heads, embedding dim) per stage, from DESIGN.md; patch sizes 4, 2, 2, 2; global tokens 1, 1, 1, 0.
VARIANT_STAGES = {
    "vil_tiny": ((1, 48), (3, 96), (3, 192), (6, 384)),
    "vil_small": ((3, 96), (3, 192), (6, 384), (12, 768)),
    "vil_medium_deep": ((3, 96), (3, 192), (6, 384), (12, 768)),
    "vil_medium_wide": ((3, 192), (6, 384), (8, 512), (12, 768)),
    "vil_base_deep": ((3, 96), (3, 192), (6, 384), (12, 768)),
    "vil_base_wide": ((3, 192), (6, 384), (12, 768), (16, 1024)),
}
STRIDES = (4, 8, 16, 32)
GLOBAL_TOKENS = (1, 1, 1, 0)


def _stage_problems():
    """Distinct (map side, heads, head dim, global tokens) over all variants, stages, 224 and 384."""
    problems = {}
    for name, stages in VARIANT_STAGES.items():
        for img in (224, 384):
            for stage, ((heads, dim), stride, n_global) in enumerate(zip(stages, STRIDES, GLOBAL_TOKENS)):
                key = (img // stride, heads, dim // heads, n_global)
                problems.setdefault(key, f"{name}_{img}_s{stage + 1}")
    return {label: key for key, label in problems.items()}


STAGE_PROBLEMS = _stage_problems()


def reference_rows(q, k, v, rows, *, map_hw, num_global, window, mode, scale=None, local_bias=None,
                   g2l_bias=None, l2g_bias=None, g2g_bias=None):
    """The output of the query tokens ``rows`` (R,), by the definition of the dense reference, with
    (B, heads, R, N) scores: usable where the full N x N reference does not fit."""
    height, width = map_hw
    n_tokens = q.shape[2]
    heads = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    device = q.device
    tokens = torch.arange(n_tokens, device=device)
    key_local = tokens >= num_global
    key_y = (tokens - num_global).clamp(min=0) // width
    key_x = (tokens - num_global).clamp(min=0) % width
    query_local = rows >= num_global
    query_y = (rows - num_global).clamp(min=0) // width
    query_x = (rows - num_global).clamp(min=0) % width
    dy = key_y[None, :] - query_y[:, None]  # (R, N)
    dx = key_x[None, :] - query_x[:, None]
    if mode == "exact":
        near = (dy.abs() <= window) & (dx.abs() <= window)
    else:
        near = (((key_y // window)[None, :] - (query_y // window)[:, None]).abs() <= 1) & (
            ((key_x // window)[None, :] - (query_x // window)[:, None]).abs() <= 1)
    both_local = query_local[:, None] & key_local[None, :]
    visible = ~both_local | near

    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    bias = torch.zeros(heads, rows.numel(), n_tokens, device=device, dtype=compute)
    if local_bias is not None:
        span = 2 * window - 1
        index = (dy.clamp(-span, span) + span) * (2 * span + 1) + (dx.clamp(-span, span) + span)
        bias = bias + torch.where(both_local, local_bias.to(compute)[:, index], 0.0)
    if num_global:
        query_global = ~query_local
        qg = rows.clamp(max=num_global - 1)
        kg = tokens.clamp(max=num_global - 1)
        if g2l_bias is not None:
            pair = query_global[:, None] & key_local[None, :]
            bias = bias + torch.where(pair, g2l_bias.to(compute)[:, qg][:, :, None], 0.0)
        if l2g_bias is not None:
            pair = query_local[:, None] & ~key_local[None, :]
            bias = bias + torch.where(pair, l2g_bias.to(compute)[:, kg][:, None, :], 0.0)
        if g2g_bias is not None:
            pair = query_global[:, None] & ~key_local[None, :]
            bias = bias + torch.where(pair, g2g_bias.to(compute)[:, qg][:, :, kg], 0.0)
    scores = torch.einsum("bhrd,bhkd->bhrk", q[:, :, rows].to(compute), k.to(compute)) * scale + bias
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhrk,bhkd->bhrd", probs, v.to(compute))


def _inputs(batch, heads, map_hw, head_dim, n_global, dtype, device, window=WINDOW, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_tokens = n_global + map_hw[0] * map_hw[1]
    q, k, v = (torch.randn(batch, heads, n_tokens, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    tables = {"local_bias": torch.randn(heads, (4 * window - 1) ** 2, generator=gen).to(device),
              "g2l_bias": torch.randn(heads, n_global, generator=gen).to(device),
              "l2g_bias": torch.randn(heads, n_global, generator=gen).to(device),
              "g2g_bias": torch.randn(heads, n_global, n_global, generator=gen).to(device)}
    return (q, k, v), tables


def _forward_backward(fn, qkv, tables, grad_out, problem, *, upcast=None):
    """Output and every gradient of ``fn``; ``upcast`` (a dtype) runs it on copies of the inputs in that dtype."""
    leaves = [(t.detach().to(upcast) if upcast else t.detach()).requires_grad_() for t in qkv]
    table_dtype = torch.float64 if upcast == torch.float64 else None
    table_leaves = {name: t.detach().to(table_dtype or t.dtype).clone().requires_grad_() for name, t in tables.items()}
    out = fn(*leaves, **problem, **table_leaves)
    out.backward(grad_out.to(upcast) if upcast else grad_out)
    grads = {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    grads.update({name: t.grad for name, t in table_leaves.items()})
    return grads


def _assert_close(got, want, dtype_name, context, fp32_reference=None):
    """``got`` within the dtype's tolerance of the fp64 oracle ``want`` (relative to the largest magnitude of
    the oracle's tensor), or within 4x the error of plain PyTorch in fp32 (``fp32_reference``) where that is
    larger: the g2l/l2g gradients are sums over thousands of tokens that nearly cancel, so their rounding
    error is large relative to their own magnitude in any fp32 implementation."""
    for key, reference in want.items():
        if reference is None:
            continue
        tolerance = (TABLE_TOLERANCE if key.endswith("bias") else TOLERANCE)[dtype_name]
        scale = reference.abs().max().item() or 1.0
        error = (got[key].double() - reference.double()).abs().max().item() / scale
        allowed = tolerance
        if fp32_reference is not None:
            torch_error = (fp32_reference[key].double() - reference.double()).abs().max().item() / scale
            allowed = max(tolerance, 4 * torch_error)
        assert error <= allowed, f"{context}: {key} relative error {error:.2e} > {allowed:.2e}"


def _check_against_reference(qkv, tables, grad_out, problem, dtype_name, context, reference=None, kernel=None):
    """The triton backend's output and gradients against the reference in fp64 (and fp32, for its error);
    ``kernel`` names its local kernels (default: the backend's choice)."""
    reference = reference or vil_attention_reference
    got = _forward_backward(_triton(kernel), qkv, tables, grad_out, problem)
    oracle = _forward_backward(reference, qkv, tables, grad_out, problem, upcast=torch.float64)
    fp32 = _forward_backward(reference, qkv, tables, grad_out, problem, upcast=torch.float32)
    _assert_close(got, oracle, dtype_name, context, fp32_reference=fp32)
    return got


def _triton(kernel=None):
    import functools

    from vilscale.kernels.triton_attention import vil_attention_triton

    return functools.partial(vil_attention_triton, kernel=kernel)


# ----------------------------------------------------------------------------------------------
# runs on CPU: the row oracle agrees with the dense reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["chunk", "exact"])
@pytest.mark.parametrize("n_global", [0, 2])
def test_reference_rows_matches_dense_reference(mode, n_global):
    (q, k, v), tables = _inputs(2, 2, (9, 11), 16, n_global, torch.float32, "cpu", window=2)
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()]
    leaves += [t.requires_grad_() for t in tables.values()]
    problem = dict(map_hw=(9, 11), num_global=n_global, window=2, mode=mode)
    rows = torch.tensor(sorted({0, 1, n_global, n_global + 40, q.shape[2] - 1}))
    dense = vil_attention_reference(q, k, v, **problem, **tables)[:, :, rows]
    subset = reference_rows(q, k, v, rows, **problem, **tables)
    torch.testing.assert_close(subset, dense, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(dense)
    grads_dense = torch.autograd.grad((dense * weights).sum(), leaves, allow_unused=True)
    grads_rows = torch.autograd.grad((subset * weights).sum(), leaves, allow_unused=True)
    for a, b in zip(grads_dense, grads_rows):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", ["chunk", "exact"])
@pytest.mark.parametrize("label", list(STAGE_PROBLEMS))
def test_variant_stage_shapes_match_reference(label, mode, dtype_name):
    map_side, heads, head_dim, n_global = STAGE_PROBLEMS[label]
    batch = 1 if map_side > 48 else 2
    qkv, tables = _inputs(batch, heads, (map_side, map_side), head_dim, n_global, DTYPES[dtype_name], "cuda")
    problem = dict(map_hw=(map_side, map_side), num_global=n_global, window=WINDOW, mode=mode)
    grad_out = torch.randn_like(qkv[0])
    _check_against_reference(qkv, tables, grad_out, problem, dtype_name, f"{label} {mode} {dtype_name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", ["chunk", "exact"])
@pytest.mark.parametrize("n_global", [0, 1, 3])
@pytest.mark.parametrize("map_hw", [(23, 30), (57, 41)])
def test_global_tokens_and_ragged_maps(map_hw, n_global, mode, dtype_name):
    (q, k, v), tables = _inputs(2, 3, map_hw, 32, n_global, DTYPES[dtype_name], "cuda")
    problem = dict(map_hw=map_hw, num_global=n_global, window=WINDOW, mode=mode)
    grad_out = torch.randn_like(q)
    _check_against_reference((q, k, v), tables, grad_out, problem, dtype_name,
                             f"{map_hw} G={n_global} {mode} {dtype_name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("neighbour", range(9))
def test_shift_mode_neighbours_on_a_ragged_map(neighbour, dtype_name):
    """The random-shift modes (own chunk + one neighbour; 4 = own chunk only) at the autotuned tiles,
    which span several 7x7 chunks, on a map that is not a multiple of the window."""
    (q, k, v), tables = _inputs(2, 3, (57, 41), 32, 1, DTYPES[dtype_name], "cuda", seed=neighbour)
    problem = dict(map_hw=(57, 41), num_global=1, window=WINDOW, mode="chunk", neighbour=neighbour)
    grad_out = torch.randn_like(q)
    _check_against_reference((q, k, v), tables, grad_out, problem, dtype_name, f"neighbour {neighbour} {dtype_name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("window", [7, 9])
@pytest.mark.parametrize("neighbour", [None, 2, 4])
@pytest.mark.parametrize("kernel", ["chunks", "tiles"])
def test_each_kernel_set_in_chunk_mode(kernel, neighbour, window, dtype_name):
    """The chunk kernels (one or two 64-row blocks per chunk: windows 7 and 9) and the query-tile kernels they
    replace as the default, each named explicitly, on a map cut by the window on both edges."""
    from vilscale.kernels.reference import AttentionProblem
    from vilscale.kernels.triton_attention import local_kernel

    (q, k, v), tables = _inputs(2, 3, (57, 41), 32, 1, DTYPES[dtype_name], "cuda", window=window)
    problem = dict(map_hw=(57, 41), num_global=1, window=window, mode="chunk", neighbour=neighbour)
    assert local_kernel(AttentionProblem.of(32, **problem, scale=None), kernel, 32) == kernel
    _check_against_reference((q, k, v), tables, torch.randn_like(q), problem, dtype_name,
                             f"{kernel} window {window} neighbour {neighbour} {dtype_name}", kernel=kernel)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", ["chunk", "exact"])
def test_backbone_1024_stage1(mode, dtype_name):
    """1024x1024 input, patch 4: a 256x256 map (65537 tokens), ViL-Small stage 1 heads."""
    map_side, heads, head_dim, n_global = 256, 3, 32, 1
    qkv, tables = _inputs(1, heads, (map_side, map_side), head_dim, n_global, DTYPES[dtype_name], "cuda")
    n_tokens = qkv[0].shape[2]
    gen = torch.Generator(device="cpu").manual_seed(1)
    rows = torch.cat([torch.tensor([0, 1, 256, n_tokens - 256, n_tokens - 1]),
                      torch.randint(0, n_tokens, (251,), generator=gen)]).unique().cuda()
    problem = dict(map_hw=(map_side, map_side), num_global=n_global, window=WINDOW, mode=mode)
    weights = torch.randn(1, heads, rows.numel(), head_dim, device="cuda")
    grad_out = torch.zeros_like(qkv[0])
    grad_out[:, :, rows] = weights.to(grad_out.dtype)

    got = _forward_backward(_triton(), qkv, tables, grad_out, problem)
    got["out"] = got["out"][:, :, rows]

    def rows_only(q, k, v, **kwargs):
        return reference_rows(q, k, v, rows, **kwargs)

    oracle = _forward_backward(rows_only, qkv, tables, grad_out[:, :, rows], problem, upcast=torch.float64)
    fp32 = _forward_backward(rows_only, qkv, tables, grad_out[:, :, rows], problem, upcast=torch.float32)
    _assert_close(got, oracle, dtype_name, f"backbone1024 {mode} {dtype_name}", fp32_reference=fp32)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["chunks", "tiles"])
def test_bias_gradients_are_deterministic_on_gpu(kernel):
    qkv, tables = _inputs(4, 3, (56, 56), 32, 1, torch.bfloat16, "cuda")
    problem = dict(map_hw=(56, 56), num_global=1, window=WINDOW, mode="chunk")
    grad_out = torch.randn_like(qkv[0])
    first = _forward_backward(_triton(kernel), qkv, tables, grad_out, problem)
    second = _forward_backward(_triton(kernel), qkv, tables, grad_out, problem)
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between two identical runs"


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda():
    from vilscale.kernels import select_backend

    q = torch.randn(2, 3, 1 + 56 * 56, 32, device="cuda", dtype=torch.bfloat16)
    assert select_backend("auto", q, map_hw=(56, 56), num_global=1, window=WINDOW, mode="chunk") == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_auto_self_check_passes_on_cuda(dtype):
    """The check `auto` runs before training (vilscale.kernels.selfcheck) passes on this GPU for ViL-Small with
    relative position bias in random-shift mode, and leaves the model on triton."""
    from vilscale.kernels.selfcheck import settle_backend
    from vilscale.model import create_model

    model = create_model("vil_small", pos_embed="rpe", shift_mode="random")
    backend, reason = settle_backend(model, "auto", torch.device("cuda"), dtype)
    assert backend == "triton", reason
    assert "checked against chunked on 4 problem(s)" in reason
