"""The chunked backend against the dense reference: outputs and every gradient (q, k, v and the four
bias tables) over awkward shapes, both window modes, every neighbour of the shift modes and two
dtypes; and its memory stays O(N * w^2)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vilscale.kernels import refusals, select_backend, vil_attention
from vilscale.kernels.chunked import vil_attention_chunked
from vilscale.kernels.reference import vil_attention_reference

# Maps not divisible by the window, a single row, a map smaller than the window.
SHAPES = [((5, 7), 2), ((8, 8), 3), ((9, 4), 2), ((1, 6), 2), ((3, 3), 4)]
GLOBALS = [0, 1, 3]
MODES = ["chunk", "exact"]
# Per dtype: tolerance on the output and on gradients, relative to the largest magnitude of the reference.
TOLERANCE = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (3e-2, 6e-2)}


def _problem(map_hw, window, num_global, *, batch=2, heads=2, head_dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = num_global + map_hw[0] * map_hw[1]
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=generator) for _ in range(3))
    tables = dict(local_bias=torch.randn(heads, (4 * window - 1) ** 2, generator=generator),
                  g2l_bias=torch.randn(heads, num_global, generator=generator),
                  l2g_bias=torch.randn(heads, num_global, generator=generator),
                  g2g_bias=torch.randn(heads, num_global, num_global, generator=generator))
    return (q, k, v), tables


def _run(function, qkv, tables, dtype, **problem):
    inputs = [t.detach().to(dtype).clone().requires_grad_() for t in qkv]
    biases = {name: t.clone().requires_grad_() for name, t in tables.items()}
    out = function(*inputs, **problem, **biases)
    grad_out = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype)
    out.backward(grad_out)
    grads = [t.grad.float() for t in inputs]
    for name in sorted(biases):
        grads.append(torch.zeros_like(biases[name]) if biases[name].grad is None else biases[name].grad)
    return out.float(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_global", GLOBALS)
@pytest.mark.parametrize("map_hw,window", SHAPES)
def test_chunked_matches_reference_outputs_and_all_gradients(map_hw, window, num_global, mode, dtype):
    qkv, tables = _problem(map_hw, window, num_global)
    problem = dict(map_hw=map_hw, num_global=num_global, window=window, mode=mode)
    expected, expected_grads = _run(vil_attention_reference, qkv, tables, torch.float32, **problem)
    got, got_grads = _run(vil_attention_chunked, qkv, tables, dtype, **problem)
    out_tol, grad_tol = TOLERANCE[dtype]
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= out_tol * scale
    names = ["q", "k", "v"] + sorted(tables)
    for name, want, have in zip(names, expected_grads, got_grads):
        if want.numel() == 0:
            continue  # the global tables are empty without global tokens
        error = (have - want).abs().max().item()
        assert error <= grad_tol * max(want.abs().max().item(), 1e-3), f"gradient of {name}: error {error}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("neighbour", range(9))  # 4: the own chunk only; others: own + that neighbour
@pytest.mark.parametrize("map_hw,window,num_global", [((5, 7), 2, 1), ((9, 4), 2, 3), ((8, 8), 3, 0), ((1, 6), 2, 1)])
def test_chunked_matches_reference_with_one_neighbour(map_hw, window, num_global, neighbour, dtype):
    qkv, tables = _problem(map_hw, window, num_global, seed=neighbour)
    problem = dict(map_hw=map_hw, num_global=num_global, window=window, mode="chunk", neighbour=neighbour)
    expected, expected_grads = _run(vil_attention_reference, qkv, tables, torch.float32, **problem)
    got, got_grads = _run(vil_attention_chunked, qkv, tables, dtype, **problem)
    out_tol, grad_tol = TOLERANCE[dtype]
    assert (got - expected).abs().max().item() <= out_tol * expected.abs().max().item()
    for name, want, have in zip(["q", "k", "v"] + sorted(tables), expected_grads, got_grads):
        if want.numel() == 0:
            continue
        error = (have - want).abs().max().item()
        assert error <= grad_tol * max(want.abs().max().item(), 1e-3), f"gradient of {name}: error {error}"


def test_chunked_without_bias_tables_and_with_explicit_scale():
    qkv, _ = _problem((6, 5), 2, 1)
    problem = dict(map_hw=(6, 5), num_global=1, window=2, mode="chunk", scale=0.3)
    torch.testing.assert_close(vil_attention_chunked(*qkv, **problem), vil_attention_reference(*qkv, **problem),
                               rtol=1e-5, atol=1e-5)


def test_fp16_runs_with_softmax_in_fp32():
    qkv, tables = _problem((7, 7), 3, 1)
    qkv = [t * 30 for t in qkv]  # scores far beyond fp16's comfortable softmax range
    problem = dict(map_hw=(7, 7), num_global=1, window=3, mode="chunk")
    got = vil_attention_chunked(*(t.half() for t in qkv), **problem, **tables)
    expected = vil_attention_reference(*qkv, **problem, **tables)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_dispatcher_runs_chunked_and_auto_picks_it_on_cpu():
    qkv, tables = _problem((6, 6), 2, 1)
    problem = dict(map_hw=(6, 6), num_global=1, window=2, mode="exact")
    assert refusals(qkv[0], **problem)["chunked"] is None
    assert select_backend("auto", qkv[0], **problem) == "chunked"
    out = vil_attention(*qkv, **problem, **tables, backend="chunked")
    torch.testing.assert_close(out, vil_attention_reference(*qkv, **problem, **tables), rtol=1e-5, atol=1e-5)


def test_bias_table_of_the_wrong_shape_is_refused():
    qkv, tables = _problem((6, 6), 2, 1)
    tables["local_bias"] = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="local_bias"):
        vil_attention_chunked(*qkv, map_hw=(6, 6), num_global=1, window=2, mode="chunk", **tables)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("mode", MODES)
def test_chunked_never_builds_an_n_by_n_tensor(mode):
    map_hw, window, num_global, heads = (32, 32), 2, 1, 1
    qkv, tables = _problem(map_hw, window, num_global, batch=1, heads=heads, head_dim=4)
    tokens = num_global + map_hw[0] * map_hw[1]
    inputs = [t.detach().requires_grad_() for t in qkv]
    with _LargestTensor() as tracker:
        out = vil_attention_chunked(*inputs, map_hw=map_hw, num_global=num_global, window=window, mode=mode, **tables)
        out.sum().backward()
    # Local scores are tokens x (G + 9 w^2) = 1024 x 37; N x N would be ~1.05 M.
    assert tracker.largest <= tokens * (num_global + 9 * window * window) * heads
    assert tracker.largest < tokens * tokens / 10

