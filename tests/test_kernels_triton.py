"""The fused Triton backend against the dense reference, on CPU through Triton's interpreter.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel module is imported, and the interpreter
patches ``triton.language`` while it runs, so the kernels run in ONE child process started with
``TRITON_INTERPRET=1`` (this file run as a script): it computes every case below and reports the
errors as JSON, which the tests of this process then judge. Other test files in the same pytest
process never see the interpreter. (If pytest itself runs with TRITON_INTERPRET=1, the cases run
in-process.)

Shapes are small and awkward: maps that are not multiples of the window or of the tile, windows
larger than the map, 0/1/3 global tokens, head dims 16/32/48/64, fp32/bf16/fp16, strided q/k/v.
Chunk-mode cases name the local kernels they run (``kernel``): the chunk kernels (``chunks``, one
or two 64-row blocks per chunk) or the query-tile kernels (``tiles``); exact windows always run
``tiles``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vilscale.kernels.reference import AttentionProblem, vil_attention_reference

REPO = Path(__file__).resolve().parents[1]

# Largest error allowed, relative to the largest magnitude of the reference tensor. The reference
# runs in fp32 on the same (rounded) inputs; the kernels round p and ds to the input dtype before
# their matmuls, as flash attention does, which is what bf16/fp16 pay for. The l2g gradient sums ds
# over every local query, each with delta = rowsum(dO * O) from the rounded output, hence the looser
# table tolerance in bf16. (Largest errors seen: fp32 6e-6, fp16 6e-4, bf16 1e-2 tensors and
# 2.4e-2 tables.)
TOLERANCE = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 2e-2}
TABLE_TOLERANCE = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 5e-2}
TABLES = ("local_bias", "g2l_bias", "l2g_bias", "g2g_bias")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUTS = ("out", "dq", "dk", "dv", "local_bias", "g2l_bias", "l2g_bias", "g2g_bias")

# name: problem; "kernel" the local kernels of a chunk-mode case, "tile" overrides the interpreter's tile
# of the tiles kernels, "bias_groups" the groups of query chunks of the chunk kernels' table gradient,
# "split" the tokens per split of the global kernels, "strided" makes q, k, v views of one packed qkv
# tensor (as the model produces).
CASES = {
    "chunk_g1_d32_fp32_strided": dict(batch=2, heads=2, map_hw=(7, 10), num_global=1, window=3, mode="chunk",
                                      head_dim=32, dtype="fp32", strided=True, kernel="tiles"),
    "exact_g1_d32_fp32": dict(batch=1, heads=2, map_hw=(7, 10), num_global=1, window=2, mode="exact",
                              head_dim=32, dtype="fp32"),
    "chunk_g0_d48_fp32": dict(batch=1, heads=2, map_hw=(5, 9), num_global=0, window=2, mode="chunk",
                              head_dim=48, dtype="fp32", kernel="tiles"),
    "exact_g3_d48_fp32": dict(batch=1, heads=2, map_hw=(6, 7), num_global=3, window=2, mode="exact",
                              head_dim=48, dtype="fp32"),
    "chunk_g3_d16_bf16": dict(batch=1, heads=2, map_hw=(6, 9), num_global=3, window=2, mode="chunk",
                              head_dim=16, dtype="bf16", kernel="tiles"),
    "exact_g1_d64_bf16": dict(batch=1, heads=1, map_hw=(5, 11), num_global=1, window=3, mode="exact",
                              head_dim=64, dtype="bf16"),
    "chunk_g1_d32_fp16": dict(batch=1, heads=2, map_hw=(7, 6), num_global=1, window=3, mode="chunk",
                              head_dim=32, dtype="fp16", kernel="tiles"),
    "exact_g0_d48_fp16": dict(batch=1, heads=1, map_hw=(6, 9), num_global=0, window=2, mode="exact",
                              head_dim=48, dtype="fp16"),
    "window_exceeds_map": dict(batch=1, heads=1, map_hw=(3, 5), num_global=1, window=4, mode="chunk",
                               head_dim=32, dtype="fp32", kernel="tiles"),
    "single_token_map": dict(batch=1, heads=2, map_hw=(1, 1), num_global=3, window=7, mode="exact",
                             head_dim=32, dtype="fp32"),
    "many_splits_g2": dict(batch=1, heads=1, map_hw=(9, 9), num_global=2, window=2, mode="exact",
                           head_dim=32, dtype="fp32", split=16),
    "gpu_tile_8x16_chunk": dict(batch=1, heads=1, map_hw=(10, 19), num_global=1, window=3, mode="chunk",
                                head_dim=32, dtype="fp32", tile=(8, 16), kernel="tiles"),
    "gpu_tile_16x8_exact": dict(batch=1, heads=1, map_hw=(19, 10), num_global=1, window=3, mode="exact",
                                head_dim=32, dtype="bf16", tile=(16, 8)),
    "window7_tile_8x8_fp16": dict(batch=1, heads=1, map_hw=(16, 17), num_global=3, window=7, mode="chunk",
                                  head_dim=32, dtype="fp16", tile=(8, 8), kernel="tiles"),
    "no_bias_tables": dict(batch=1, heads=2, map_hw=(6, 10), num_global=1, window=2, mode="chunk",
                           head_dim=32, dtype="fp32", biases=False, kernel="tiles"),
    # shift modes: the own chunk plus neighbour n (row-major 3x3, 4 = own chunk only); tiles that span
    # several chunks, maps not divisible by the window, neighbours off the grid at the borders
    "neighbour0_up_left_fp32": dict(batch=2, heads=2, map_hw=(7, 10), num_global=1, window=2, mode="chunk",
                                    head_dim=32, dtype="fp32", neighbour=0, strided=True, kernel="tiles"),
    "neighbour5_right_g0_fp32": dict(batch=1, heads=2, map_hw=(9, 11), num_global=0, window=3, mode="chunk",
                                     head_dim=32, dtype="fp32", neighbour=5, kernel="tiles"),
    "neighbour7_down_tile_8x16_bf16": dict(batch=1, heads=2, map_hw=(10, 19), num_global=2, window=3,
                                           mode="chunk", head_dim=32, dtype="bf16", neighbour=7, tile=(8, 16),
                                           kernel="tiles"),
    "own_chunk_g3_fp32": dict(batch=1, heads=2, map_hw=(6, 9), num_global=3, window=2, mode="chunk",
                              head_dim=16, dtype="fp32", neighbour=4, kernel="tiles"),
    # the chunk kernels: maps cut by the window on both edges, 1 and 2 blocks per chunk, every neighbour mode
    "chunks_g1_d32_fp32_strided": dict(batch=2, heads=2, map_hw=(7, 10), num_global=1, window=4, mode="chunk",
                                       head_dim=32, dtype="fp32", strided=True, kernel="chunks", bias_groups=2),
    "chunks_g3_d16_bf16": dict(batch=1, heads=2, map_hw=(6, 9), num_global=3, window=3, mode="chunk",
                               head_dim=16, dtype="bf16", kernel="chunks"),
    "chunks_g1_d48_fp16": dict(batch=1, heads=2, map_hw=(7, 6), num_global=1, window=3, mode="chunk",
                               head_dim=48, dtype="fp16", kernel="chunks"),
    "chunks_two_blocks_w9_fp32": dict(batch=1, heads=1, map_hw=(10, 12), num_global=1, window=9, mode="chunk",
                                      head_dim=32, dtype="fp32", kernel="chunks"),
    "chunks_window_exceeds_map": dict(batch=1, heads=1, map_hw=(3, 5), num_global=1, window=4, mode="chunk",
                                      head_dim=32, dtype="fp32", kernel="chunks"),
    "chunks_no_bias_tables_g0_bf16": dict(batch=1, heads=2, map_hw=(6, 10), num_global=0, window=3, mode="chunk",
                                          head_dim=32, dtype="bf16", biases=False, kernel="chunks"),
    "chunks_neighbour0_up_left_fp32": dict(batch=2, heads=1, map_hw=(7, 10), num_global=1, window=3,
                                           mode="chunk", head_dim=32, dtype="fp32", neighbour=0, strided=True,
                                           kernel="chunks"),
    "chunks_neighbour5_right_g0_bf16": dict(batch=1, heads=2, map_hw=(9, 11), num_global=0, window=3,
                                            mode="chunk", head_dim=32, dtype="bf16", neighbour=5, kernel="chunks"),
    "chunks_neighbour7_down_w9_fp32": dict(batch=1, heads=1, map_hw=(12, 10), num_global=2, window=9,
                                           mode="chunk", head_dim=16, dtype="fp32", neighbour=7, kernel="chunks"),
    "chunks_own_chunk_g3_fp32": dict(batch=1, heads=2, map_hw=(6, 9), num_global=3, window=2, mode="chunk",
                                     head_dim=16, dtype="fp32", neighbour=4, kernel="chunks"),
}
DETERMINISM_CASES = ("chunk_g1_d32_fp32_strided", "chunks_g1_d32_fp32_strided")


# ----------------------------------------------------------------------------------------------
# the child process: runs every case under the interpreter
# ----------------------------------------------------------------------------------------------

def _make_inputs(spec: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, head_dim = spec["batch"], spec["heads"], spec["head_dim"]
    height, width = spec["map_hw"]
    n_global, window = spec["num_global"], spec["window"]
    n_tokens = n_global + height * width
    dtype = DTYPES[spec["dtype"]]
    if spec.get("strided"):
        packed = torch.randn(batch, n_tokens, 3, heads, head_dim, generator=gen).to(dtype)
        q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))  # (B, h, N, d) views, strided
    else:
        q, k, v = (torch.randn(batch, heads, n_tokens, head_dim, generator=gen).to(dtype) for _ in range(3))
    tables = {}
    if spec.get("biases", True):
        tables = {"local_bias": torch.randn(heads, (4 * window - 1) ** 2, generator=gen),
                  "g2l_bias": torch.randn(heads, n_global, generator=gen),
                  "l2g_bias": torch.randn(heads, n_global, generator=gen),
                  "g2g_bias": torch.randn(heads, n_global, n_global, generator=gen)}
    grad_out = torch.randn(batch, heads, n_tokens, head_dim, generator=gen).to(dtype)
    return (q, k, v), tables, grad_out


def _run(fn, qkv, tables, grad_out, problem, *, upcast: bool):
    leaves = [t.detach().float() if upcast else t.detach() for t in qkv]
    leaves = [t.requires_grad_() for t in leaves]
    table_leaves = {name: t.detach().clone().requires_grad_() for name, t in tables.items()}
    out = fn(*leaves, **problem, **table_leaves)
    out.backward(grad_out.float() if upcast else grad_out)
    results = {"out": out, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    for name, table in table_leaves.items():
        results[name] = table.grad
    return results


def _compute_case(name: str, spec: dict) -> dict:
    from vilscale.kernels import triton_attention, triton_chunks

    triton_attention.INTERPRETER_TILE = tuple(spec.get("tile", (4, 8)))
    triton_attention.GLOBAL_SPLIT_TOKENS = spec.get("split", 1024)
    triton_chunks.INTERPRETER_BIAS_GROUPS = spec.get("bias_groups", 1)
    vil_attention_triton = functools.partial(triton_attention.vil_attention_triton, kernel=spec.get("kernel"))
    qkv, tables, grad_out = _make_inputs(spec, seed=len(name))
    problem = dict(map_hw=tuple(spec["map_hw"]), num_global=spec["num_global"], window=spec["window"],
                   mode=spec["mode"], neighbour=spec.get("neighbour"))
    start = time.perf_counter()
    got = _run(vil_attention_triton, qkv, tables, grad_out, problem, upcast=False)
    seconds = time.perf_counter() - start
    want = _run(vil_attention_reference, qkv, tables, grad_out, problem, upcast=True)
    report = {"seconds": seconds, "errors": {}, "dtypes": {}}
    for key in OUTPUTS:
        if key not in want:
            continue
        reference = want[key]
        result = got[key]
        if reference is None:  # a table with no entries (no global tokens) gets no gradient in the reference
            report["errors"][key] = 0.0 if result is None or result.numel() == 0 else float("inf")
            continue
        scale = reference.abs().max().item() or 1.0
        report["errors"][key] = (result.float() - reference.float()).abs().max().item() / scale
        report["dtypes"][key] = str(result.dtype)
    report["kernel"] = triton_attention.local_kernel(
        AttentionProblem.of(spec["head_dim"], **problem, scale=None), spec.get("kernel"), spec["head_dim"])
    if name in DETERMINISM_CASES:
        again = _run(vil_attention_triton, qkv, tables, grad_out, problem, upcast=False)
        report["bitwise_identical"] = {key: bool(torch.equal(got[key], again[key])) for key in got}
    return report


def _dispatch_checks() -> dict:
    """What the dispatcher does with CPU tensors under the interpreter."""
    from vilscale.kernels import select_backend, vil_attention

    q = torch.randn(1, 1, 1 + 12, 32)
    problem = dict(map_hw=(3, 4), num_global=1, window=2, mode="chunk")
    auto = select_backend("auto", q, **problem)
    out = vil_attention(q, q, q, **problem, backend="triton")
    reference = vil_attention_reference(q, q, q, **problem)
    return {"auto": auto, "error": (out - reference).abs().max().item()}


def compute_all(names=None) -> dict:
    torch.set_num_threads(1)
    results = {"cases": {}, "dispatch": _dispatch_checks()}
    for name, spec in CASES.items():
        if names is None or name in names:
            results["cases"][name] = _compute_case(name, spec)
    return results


# ----------------------------------------------------------------------------------------------
# the tests (main pytest process)
# ----------------------------------------------------------------------------------------------

def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    if _interpreter_on():
        return compute_all()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=800)
    if proc.returncode != 0:
        raise AssertionError(f"the interpreter run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_forward_and_every_gradient(interpreted, case):
    spec = CASES[case]
    report = interpreted["cases"][case]
    expected = ["out", "dq", "dk", "dv"]
    if spec.get("biases", True):
        expected += list(TABLES)
    assert sorted(report["errors"]) == sorted(expected)
    too_far = {}
    for key, error in report["errors"].items():
        tolerance = (TABLE_TOLERANCE if key in TABLES else TOLERANCE)[spec["dtype"]]
        if not error <= tolerance:
            too_far[key] = (error, tolerance)
    assert not too_far, f"{case}: (relative error, tolerance) out of bounds: {too_far}; all: {report['errors']}"
    dtype = str(DTYPES[spec["dtype"]])
    assert all(report["dtypes"][key] == dtype for key in ("out", "dq", "dk", "dv")), report["dtypes"]
    assert report["kernel"] == spec.get("kernel", "tiles"), "the case did not run the kernels it names"


@pytest.mark.slow
@pytest.mark.parametrize("case", DETERMINISM_CASES)
def test_gradients_are_bitwise_deterministic(interpreted, case):
    identical = interpreted["cases"][case]["bitwise_identical"]
    assert set(identical) >= {"out", "dq", "dk", "dv", "local_bias", "g2l_bias", "l2g_bias", "g2g_bias"}
    assert all(identical.values()), identical


@pytest.mark.slow
def test_dispatcher_picks_triton_under_the_interpreter(interpreted):
    assert interpreted["dispatch"]["auto"] == "triton"
    assert interpreted["dispatch"]["error"] < 1e-5


def test_can_run_explains_refusals():
    pytest.importorskip("triton")
    from vilscale.kernels.triton_attention import BACKEND

    problem = dict(map_hw=(4, 4), num_global=1, window=2, mode="chunk")
    q = torch.randn(1, 2, 17, 32)
    if not _interpreter_on():
        reason = BACKEND.can_run(q, **problem)
        assert reason is not None and "TRITON_INTERPRET=1" in reason and "CPU" in reason
    assert "dtype" in BACKEND.can_run(q.double(), **problem)
    assert "head dim 40" in BACKEND.can_run(torch.randn(1, 2, 17, 40), **problem)
    assert "head dim 144" in BACKEND.can_run(torch.randn(1, 2, 17, 144), **problem)
    assert "window 40" in BACKEND.can_run(q, **{**problem, "window": 40})


def test_auto_does_not_pick_triton_for_cpu_tensors_without_the_interpreter():
    if _interpreter_on():
        pytest.skip("this process runs Triton's interpreter")
    from vilscale.kernels import refusals

    q = torch.randn(1, 2, 17, 32)
    reasons = refusals(q, map_hw=(4, 4), num_global=1, window=2, mode="chunk")
    assert reasons["triton"] is not None


def test_key_width_covers_every_visible_column():
    from vilscale.kernels.triton_attention import key_width

    for window in (1, 2, 3, 7, 12):
        for tile_x in (4, 8, 16):
            for chunk in (False, True):
                width = key_width(tile_x, window, chunk, 10_000)
                for x0 in range(0, 200, tile_x):
                    x1 = x0 + tile_x - 1
                    if chunk:
                        start, stop = max((x0 // window - 1) * window, 0), (x1 // window + 2) * window
                    else:
                        start, stop = max(x0 - window, 0), x1 + window + 1
                    assert stop - start <= width, (window, tile_x, chunk, x0)


@pytest.mark.slow
def test_kernels_compile_for_an_h100_without_a_gpu():
    """Every kernel goes through Triton's whole CUDA pipeline (TTIR, TTGIR, LLVM, PTX, ptxas cubin)
    for sm_90: catches what the interpreter cannot, e.g. tl.dot shapes, gather/reshape lowering."""
    triton = pytest.importorskip("triton")
    if _interpreter_on():
        pytest.skip("this process runs Triton's interpreter; the kernels are not compilable objects here")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vilscale.kernels import _triton_vil as kernels
    from vilscale.kernels.triton_attention import key_width

    head_dim, window = 48, 7  # 48 exercises the padded head dim
    common = dict(HEAD_DIM=head_dim, BLOCK_D=64, BLOCK_G=16, PRECISE=False, UPCAST=False)
    tiled = dict(WINDOW=window, CHUNK=True, TILE_Y=8, TILE_X=8, KEY_W=key_width(8, window, True, 56), **common)
    split = dict(BLOCK_N=64, **{**common, "PRECISE": True})
    fp32_buffers = {"LSE", "DELTA", "LB", "L2G", "G2L", "G2G", "PLB", "PO", "PM", "PL", "PDQ", "PG2L", "PG2G",
                    "PDK", "PDV", "PL2G", "PGG"}
    launches = []
    for all_neighbours in (True, False):  # full attention, and the shift modes' own chunk + one neighbour
        launches += [
            (kernels.fwd_local_kernel, dict(HAS_LB=True, HAS_L2G=True, ALL_NB=all_neighbours, **tiled)),
            (kernels.bwd_local_dq_kernel, dict(HAS_LB=True, HAS_L2G=True, LB_GRAD=True, RADIUS=2 * window - 1,
                                               OFFSETS=32, ALL_NB=all_neighbours, **tiled)),
            (kernels.bwd_local_dkdv_kernel, dict(HAS_LB=True, HAS_G2L=True, ALL_NB=all_neighbours, **tiled)),
        ]
    launches += [
        (kernels.fwd_global_kernel, dict(HAS_G2L=True, HAS_G2G=True, **split)),
        (kernels.bwd_global_dq_kernel, dict(HAS_G2L=True, HAS_G2G=True, KEEP_GG=True, **split)),
        (kernels.bwd_global_dkdv_kernel, dict(HAS_L2G=True, HAS_G2G=True, **split)),
    ]
    for kernel, constexprs in launches:
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("qk_scale", "scale"):
                signature[name] = "fp32"
            elif name in ("heads", "G", "H", "W", "n_local", "split_tokens") or name.islower():
                signature[name] = "i32"  # sizes and strides
            elif name in fp32_buffers:
                signature[name] = "*fp32"
            else:
                signature[name] = "*bf16"  # q, k, v, do and the outputs
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert compiled.asm["cubin"], kernel.fn.__name__


if __name__ == "__main__":  # optional case names: compute only those (for development)
    print(json.dumps(compute_all(sys.argv[1:] or None)))
