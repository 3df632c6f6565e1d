"""ViL attention backends side by side: forward and forward+backward time and peak memory.

    python benchmarks/attention.py                      # on a GPU: writes benchmarks/results/attention-<gpu>.json
    python benchmarks/attention.py --quick --out /tmp/attention.json   # small shapes, runs on CPU too

Backends: ``triton`` (fused kernels: in chunk mode the chunk kernels, one 64-row chunk per program),
``triton_tiles`` (the same backend with the query-tile kernels it used before, for old against new on one
card; each triton row says which local kernels ran under ``"kernel"``), ``chunked`` (PyTorch, O(N w^2)
memory), ``reference`` (dense,
where its N x N scores fit), ``flex`` (torch FlexAttention with the same mask as a ``mask_mod`` and
the same four bias tables as a ``score_mod``, tokens padded to its block size) and ``natten`` when
installed (it has neither global tokens nor relative-position bias: its rows time the local map
alone without bias, and ``triton`` is measured in that bias-free form too, under ``"bias": false``).
A backend that cannot run a case is skipped with the reason printed.

Times are medians over ``--repeats`` runs after warm-up; ``fwd_ms`` is one forward with inputs that
require grad (as in training), ``fwdbwd_ms`` forward plus backward to q, k, v and every table.
``peak_mem_bytes`` is the peak CUDA memory allocated during forward+backward above what was
allocated before it (inputs excluded); it is null on CPU. On CUDA the script also prints the
memory-traffic lower bound of the forward (q, k, v read once, output and log-sum-exp written once,
at the copy bandwidth measured on this device) next to the triton forward time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from provenance import commit  # noqa: E402

from vilscale.kernels.reference import vil_attention_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("triton", "triton_tiles", "chunked", "reference", "flex", "natten")
FLEX_BLOCK = 128


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    map_hw: tuple[int, int]
    heads: int
    head_dim: int
    num_global: int
    window: int = 7
    mode: str = "chunk"

    @property
    def tokens(self) -> int:
        return self.num_global + self.map_hw[0] * self.map_hw[1]


CASES = (
    Case("vil_small_stage1", batch=64, map_hw=(56, 56), heads=3, head_dim=32, num_global=1),
    Case("vil_small_stage2", batch=64, map_hw=(28, 28), heads=3, head_dim=64, num_global=1),
    Case("backbone1024_stage1", batch=2, map_hw=(256, 256), heads=3, head_dim=32, num_global=1),
)
QUICK_CASES = (
    Case("vil_small_stage1", batch=2, map_hw=(14, 14), heads=3, head_dim=32, num_global=1),
    Case("vil_small_stage2", batch=2, map_hw=(7, 7), heads=3, head_dim=64, num_global=1),
    Case("backbone1024_stage1", batch=1, map_hw=(32, 32), heads=3, head_dim=32, num_global=1),
)


class Skip(Exception):
    """A backend cannot run a case; the message says why."""


# ----------------------------------------------------------------------------------------------
# problem inputs and backends: each returns a closure running one forward
# ----------------------------------------------------------------------------------------------

def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, *, bias: bool = True,
                table_grad: bool = True):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape, dt=dtype, grad=True):
        return torch.randn(*shape, generator=gen).to(device, dt).requires_grad_(grad)

    shape = (case.batch, case.heads, case.tokens, case.head_dim)
    q, k, v = leaf(*shape), leaf(*shape), leaf(*shape)
    tables = {}
    if bias:
        g, h = case.num_global, case.heads
        table = dict(dt=torch.float32, grad=table_grad)
        tables = {"local_bias": leaf(h, (4 * case.window - 1) ** 2, **table), "g2l_bias": leaf(h, g, **table),
                  "l2g_bias": leaf(h, g, **table), "g2g_bias": leaf(h, g, g, **table)}
    return q, k, v, tables


def _problem(case: Case) -> dict:
    return dict(map_hw=case.map_hw, num_global=case.num_global, window=case.window, mode=case.mode)


def backend_from_dispatcher(name: str, case: Case, q):
    from vilscale.kernels import get_backend

    try:
        backend = get_backend(name)
    except ImportError as error:
        raise Skip(f"not importable: {error}") from error
    reason = backend.can_run(q, **_problem(case))
    if reason is not None:
        raise Skip(reason)
    return backend


def run_triton(case, q, k, v, tables):
    backend = backend_from_dispatcher("triton", case, q)
    return lambda: backend.forward(q, k, v, **_problem(case), **tables)


def run_triton_tiles(case, q, k, v, tables):
    backend_from_dispatcher("triton", case, q)
    from vilscale.kernels.triton_attention import vil_attention_triton

    return lambda: vil_attention_triton(q, k, v, **_problem(case), **tables, kernel="tiles")


def triton_kernel(backend: str, case: Case, q) -> str | None:
    """The local kernels a triton row ran (``chunks`` or ``tiles``), or None for other backends."""
    if not backend.startswith("triton"):
        return None
    from vilscale.kernels.reference import AttentionProblem
    from vilscale.kernels.triton_attention import local_kernel

    problem = AttentionProblem.of(case.head_dim, **_problem(case), neighbour=None, scale=None)
    return local_kernel(problem, "tiles" if backend == "triton_tiles" else None, case.head_dim)


def run_chunked(case, q, k, v, tables):
    backend = backend_from_dispatcher("chunked", case, q)
    return lambda: backend.forward(q, k, v, **_problem(case), **tables)


def run_reference(case, q, k, v, tables):
    backend_from_dispatcher("reference", case, q)
    # scores, probabilities, their gradients and the dense bias: about five fp32 (B, h, N, N) tensors
    needed = 5 * case.batch * case.heads * case.tokens ** 2 * 4
    available = torch.cuda.mem_get_info(q.device)[0] if q.is_cuda else 8 * 2**30
    if needed > available:
        raise Skip(f"dense N x N scores need about {needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB free")
    return lambda: vil_attention_reference(q, k, v, **_problem(case), **tables)


def run_flex(case, q, k, v, tables):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise Skip(f"FlexAttention is not available in torch {torch.__version__}: {error}") from error
    if not q.is_cuda:
        raise Skip(f"FlexAttention in torch {torch.__version__} has no backward on CPU")
    g, w = case.num_global, case.window
    height, width = case.map_hw
    n = case.tokens
    padded = -(-n // FLEX_BLOCK) * FLEX_BLOCK
    chunk = case.mode == "chunk"
    span = 2 * w - 1

    def coords(idx):
        local = (idx - g).clamp(min=0)
        return local // width, local % width

    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx = coords(q_idx)
        ky, kx = coords(kv_idx)
        if chunk:
            near = ((qy // w - ky // w).abs() <= 1) & ((qx // w - kx // w).abs() <= 1)
        else:
            near = ((qy - ky).abs() <= w) & ((qx - kx).abs() <= w)
        both_local = (q_idx >= g) & (kv_idx >= g)
        return (q_idx < n) & (kv_idx < n) & (~both_local | near)

    local_bias, g2l, l2g, g2g = (tables.get(key) for key in ("local_bias", "g2l_bias", "l2g_bias", "g2g_bias"))

    def score_mod(score, b, h, q_idx, kv_idx):
        if local_bias is None:
            return score
        qy, qx = coords(q_idx)
        ky, kx = coords(kv_idx)
        index = ((ky - qy).clamp(-span, span) + span) * (2 * span + 1) + ((kx - qx).clamp(-span, span) + span)
        bias = local_bias[h, index]
        if g:
            qg, kg = q_idx.clamp(max=g - 1), kv_idx.clamp(max=g - 1)
            from_global = torch.where(kv_idx < g, g2g[h, qg, kg], g2l[h, qg])
            bias = torch.where(q_idx < g, from_global, torch.where(kv_idx < g, l2g[h, kg], bias))
        return score + bias

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=padded, KV_LEN=padded, device=q.device)
    attend = torch.compile(flex_attention, dynamic=False)

    def forward():
        pad = (0, 0, 0, padded - n)
        qp, kp, vp = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
        return attend(qp, kp, vp, score_mod=score_mod, block_mask=block_mask)[:, :, :n]

    return forward


def run_natten(case, q, k, v, tables):
    try:
        import natten
    except ImportError as error:
        raise Skip("NATTEN is not installed") from error
    if tables:
        raise Skip("NATTEN has no relative-position bias or global tokens; see the bias-free rows")
    height, width = case.map_hw
    g = case.num_global

    def as_map(t):  # (B, h, G + H*W, d) -> (B, H, W, h, d), local tokens only
        return t[:, :, g:].reshape(case.batch, case.heads, height, width, case.head_dim).permute(0, 2, 3, 1, 4)

    kernel = 2 * case.window + 1
    if kernel > min(height, width):
        raise Skip(f"NATTEN needs a map of at least {kernel}x{kernel} for window {case.window}")
    na2d = getattr(natten, "na2d", None) or getattr(getattr(natten, "functional", None), "na2d", None)
    if na2d is None:
        raise Skip(f"NATTEN {getattr(natten, '__version__', '?')} has no na2d")
    return lambda: na2d(as_map(q), as_map(k), as_map(v), kernel_size=kernel)


RUNNERS = {"triton": run_triton, "triton_tiles": run_triton_tiles, "chunked": run_chunked, "reference": run_reference,
           "flex": run_flex, "natten": run_natten}


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, repeats: int, budget_ms: float = 3000.0) -> float:
    """Median of up to ``repeats`` runs; stops early (after at least 3) once ``budget_ms`` is spent, so a
    pathologically slow backend cannot eat a time-boxed run."""
    samples = []
    for _ in range(repeats):
        if len(samples) >= 3 and sum(samples) > budget_ms:
            break
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def measure(forward, leaves, device, repeats: int, warmup: int) -> dict:
    grad = None

    def fwd():
        return forward()

    def fwd_bwd():
        nonlocal grad
        out = forward()
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        for leaf in leaves:
            leaf.grad = None

    for _ in range(warmup):
        fwd_bwd()
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fwd_bwd()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    return {"fwd_ms": _time_ms(fwd, device, repeats), "fwdbwd_ms": _time_ms(fwd_bwd, device, repeats),
            "peak_mem_bytes": peak}


@torch.no_grad()
def error_against_chunked(case: Case, q, k, v, tables, forward) -> float:
    """Largest difference of ``forward``'s output from the chunked backend's on the same inputs, relative to
    the largest magnitude of the chunked output (the kernels checked at the very shape that is timed)."""
    chunked = backend_from_dispatcher("chunked", case, q)
    want = chunked.forward(q, k, v, **_problem(case), **tables).float()
    got = forward().float()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = _time_ms(lambda: dst.copy_(src), device, 20)
    return 2 * src.numel() / (ms / 1e3)


def forward_traffic_bytes(case: Case, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    rows = case.batch * case.heads * case.tokens
    return 4 * rows * case.head_dim * element + rows * 4  # q, k, v read; o written; fp32 lse written


# ----------------------------------------------------------------------------------------------

def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch and maps (CPU-friendly smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma-separated subset of fp32,bf16,fp16")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {BACKENDS}")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default on CUDA: benchmarks/results/attention-<device>.json; "
                             "on CPU nothing is written unless given)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; valid: {list(DTYPES)}")
    for name in backends:
        if name not in BACKENDS:
            raise SystemExit(f"unknown backend {name!r}; valid: {list(BACKENDS)}")
    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        wanted = {name.strip() for name in args.cases.split(",")}
        unknown = wanted - {case.name for case in cases}
        if unknown:
            raise SystemExit(f"unknown case(s) {sorted(unknown)}; valid: {[case.name for case in cases]}")
        cases = tuple(case for case in cases if case.name in wanted)
    repeats = args.repeats or (3 if args.quick or device.type != "cuda" else 20)
    warmup = 1 if args.quick or device.type != "cuda" else 3
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    if bandwidth:
        print(f"{device_name}: measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    results = []
    out = args.out
    if out is None and device.type == "cuda":
        slug = "".join(ch if ch.isalnum() else "-" for ch in device_name.lower()).strip("-")
        out = str(REPO / "benchmarks" / "results" / f"attention-{slug}{'-quick' if args.quick else ''}.json")

    def write_report():
        """Rewritten after every row, so a run stopped midway (a time-boxed device check) keeps what it measured."""
        if not out:
            return
        report = {"device": device_name,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "commit": commit(), "torch": torch.__version__, "triton": _triton_version(),
                  "copy_bandwidth_bytes_per_s": bandwidth, "cases": results}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")

    for case in cases:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for backend in backends:
                # (bias, table_grad): with the bias tables learnt (training), with them frozen (FlexAttention
                # differentiates a gathered table through atomics), and without bias (NATTEN's form)
                variants = [(True, True)]
                if backend in ("triton", "triton_tiles", "flex"):
                    variants.append((True, False))
                if backend in ("triton", "triton_tiles") and "natten" in backends:
                    variants.append((False, True))
                if backend == "natten":
                    variants = [(False, True)]
                for bias, table_grad in variants:
                    label = (f"{case.name:<20} {dtype_name:<4} {backend:<9}{'' if bias else ' (no bias)'}"
                             f"{'' if table_grad else ' (tables frozen)'}")
                    try:
                        q, k, v, tables = make_inputs(case, dtype, device, bias=bias, table_grad=table_grad)
                        forward = RUNNERS[backend](case, q, k, v, tables)
                        row = measure(forward, [q, k, v, *tables.values()], device, repeats, warmup)
                    except Skip as why:
                        print(f"{label} skipped: {why}")
                        continue
                    except torch.cuda.OutOfMemoryError:
                        print(f"{label} skipped: out of memory")
                        torch.cuda.empty_cache()
                        continue
                    except Exception as error:  # a backend that breaks is a result too; the others still run
                        text = str(error).strip()
                        message = f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
                        print(f"{label} FAILED: {message}", flush=True)
                        results.append({"name": case.name, "backend": backend, "dtype": dtype_name, "bias": bias,
                                        "table_grad": table_grad, "error": message})
                        write_report()
                        continue
                    entry = {"name": case.name, "backend": backend, "dtype": dtype_name, "bias": bias,
                             "table_grad": table_grad, **row}
                    if triton_kernel(backend, case, q):
                        entry["kernel"] = triton_kernel(backend, case, q)
                    if backend in ("triton", "triton_tiles", "flex") and bias and table_grad:
                        entry["max_rel_err_vs_chunked"] = error_against_chunked(case, q, k, v, tables, forward)
                    line = (f"{label} fwd {row['fwd_ms']:9.3f} ms   fwd+bwd {row['fwdbwd_ms']:9.3f} ms"
                            + (f"   peak {row['peak_mem_bytes'] / 2**20:9.1f} MiB" if row["peak_mem_bytes"] else ""))
                    if "max_rel_err_vs_chunked" in entry:
                        line += f"   (vs chunked {entry['max_rel_err_vs_chunked']:.1e})"
                    if backend.startswith("triton") and bandwidth and bias and table_grad:
                        bound = forward_traffic_bytes(case, dtype) / bandwidth * 1e3
                        entry["fwd_traffic_bound_ms"] = bound
                        line += f"   (traffic bound {bound:.3f} ms: {row['fwd_ms'] / bound:.2f}x)"
                    print(line, flush=True)
                    results.append(entry)
                    write_report()
                    del q, k, v, tables, forward

    if out:
        write_report()
        print(f"wrote {out}")
    else:
        print("no --out given on CPU: results not written (benchmarks/results/ holds GPU measurements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
