"""Static figures of the fused ViL attention kernels, compiled for an H100 (sm_90) on a machine without a GPU.

    python benchmarks/kernel_static.py          # -> benchmarks/results/kernel-static-sm90-triton<version>.json
    python benchmarks/kernel_static.py --out PATH --kernels chunks

What is compiled: the launches the host code makes for one forward and one backward of ViL-Small's
stage 1 at 224 (56x56 map, 3 heads, head dim 32, window 7, 1 global token, bf16, all four relative-position
bias tables learnt, batch 64), with each set of local kernels (``tiles``: 4x8..16x8 query tiles, mma.sync;
``chunks``: one 64-row chunk per program). The launches are recorded, not run (``vilscale.kernels._launch``):
the real arguments of the real host code, CPU tensors standing in for CUDA ones. Each recorded kernel is
then compiled for ``GPUTarget("cuda", 90, 32)`` in every configuration its autotuner may choose, with the
specialisation Triton's launcher would give those arguments (16-byte alignment, integers equal to 1), by
whatever Triton is installed: the JSON records its version (the GPU image runs 3.6; see
docs/benchmarks.md for how the 3.6 figures were made).

Recorded per kernel and configuration:
- ``wgmma``/``mma_sync``: Hopper warpgroup MMAs (``wgmma.mma_async`` in the PTX, ``HGMMA`` in the SASS) and
  Ampere-style ``mma.sync`` (``HMMA``) in the SASS;
- ``registers`` per thread and ``local_bytes`` (local memory per thread: spills and stack) from the cubin
  (``cuobjdump --dump-resource-usage``); ``spill_stores``/``spill_loads`` in bytes from ptxas ``-v`` run on
  Triton's PTX for sm_90a, and ``local_instructions`` (``STL``/``LDL`` in the SASS);
- ``shared_bytes``: the dynamic shared memory Triton launches the kernel with (plus the cubin's static part);
- ``inner_loop``: the loop that does the work per block of keys (for dq/dk/dv/table-gradient kernels: per
  block of keys or queries) and what it costs. Method: the SASS (``cuobjdump -sass``) is cut into loops at its
  backward branches (a ``BRA`` to a lower address closes a loop that starts at its target); the inner loop is
  the innermost loop that holds the kernel's matrix products (``HGMMA``/``HMMA``), or, if none does (fp32
  paths), the innermost loop holding the most instructions. Its instructions (``NOP`` excluded) are counted
  once: every warp of the program issues the body once per iteration, so one iteration costs
  ``count x num_warps`` warp-instructions, and it computes ``rows x keys`` scores (``rows``: the program's
  queries, ``keys``: the keys of one block; both include the padding rows and columns the kernel computes and
  masks). ``warp_instructions_per_score`` is their ratio. Instructions behind a branch inside the loop count as
  if always taken (a static upper bound of the issued work); the number is issue slots, not time.

A gate on these figures is in tests/test_kernels_static.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# ViL-Small stage 1 at 224: 56x56 map, 3 heads of 32, window 7, one global token.
STAGE1 = dict(batch=64, heads=3, map_hw=(56, 56), head_dim=32, num_global=1, window=7)
TARGET_ARCH = 90
LOCAL_KERNELS = ("tiles", "chunks")
# Scores one inner-loop iteration computes: (rows, keys) from the launch's constexprs.
MMA_SASS = re.compile(r"\b(HGMMA|HMMA)\b")


def _tool(name: str) -> Path | None:
    """ptxas / cuobjdump from the Triton installation (they ship in its wheel)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def tools_missing() -> str | None:
    """Why the sm_90 compile cannot run here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable: {error}"
    missing = [name for name in ("ptxas", "cuobjdump") if _tool(name) is None]
    if missing:
        return f"{', '.join(missing)} not found in the Triton installation (needed for sm_90 cubins)"
    return None


# ----------------------------------------------------------------------------------------------
# recording the launches of one forward and backward
# ----------------------------------------------------------------------------------------------

def record_launches(kernel: str, *, dtype_name: str = "bf16", problem: dict | None = None,
                    neighbour: int | None = None, table_grad: bool = True, biases: bool = True) -> list[tuple]:
    """(kernel object, args, kwargs) of every launch of one forward and one backward with local kernels
    ``kernel``, recorded instead of run; ``biases=False`` runs without any bias table."""
    import torch

    from vilscale.kernels import _launch, triton_attention
    from vilscale.kernels.reference import AttentionProblem

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are not compilable objects in this process")
    spec = {**STAGE1, **(problem or {})}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    batch, heads, head_dim, n_global, window = (spec[key] for key in ("batch", "heads", "head_dim", "num_global",
                                                                       "window"))
    height, width = spec["map_hw"]
    n_tokens = n_global + height * width
    # q, k, v as the model makes them: views of one packed (B, N, 3, heads, d) projection
    packed = torch.empty(batch, n_tokens, 3, heads, head_dim, dtype=dtype)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    tables = (torch.zeros(heads, (4 * window - 1) ** 2), torch.zeros(heads, n_global), torch.zeros(heads, n_global),
              torch.zeros(heads, n_global, n_global))
    if not biases:
        tables = (None, None, None, None)
    tables = tuple(None if t is None or t.numel() == 0 else t for t in tables)  # as vil_attention_triton does
    attention = AttentionProblem.of(head_dim, map_hw=(height, width), num_global=n_global, window=window,
                                    mode=spec.get("mode", "chunk"), neighbour=neighbour, scale=None)
    chosen = triton_attention.local_kernel(attention, kernel, head_dim)
    if chosen != kernel:
        raise ValueError(f"the {kernel!r} kernels do not take this problem (they would run {chosen!r})")
    launches = []
    previous = _launch.RECORDER
    _launch.RECORDER = lambda fn, grid, args, kwargs: launches.append((fn, args, dict(kwargs)))
    try:
        out, lse, global_out = triton_attention._forward(q, k, v, tables, attention, kernel)
        out.zero_()
        lse.zero_()
        triton_attention._backward(torch.zeros_like(out), q, k, v, out, lse, global_out, tables, attention, kernel,
                                   (table_grad, True, True, True))
    finally:
        _launch.RECORDER = previous
    return launches


def _unwrap(kernel_object):
    """(JITFunction, [(config kwargs, num_warps, num_stages)], heuristics) behind autotune/heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    configs, heuristics = None, {}
    obj = kernel_object
    while not isinstance(obj, JITFunction):
        if hasattr(obj, "configs") and configs is None:
            configs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in obj.configs]
        if hasattr(obj, "values"):
            heuristics.update(obj.values)
        obj = obj.fn
    return obj, configs or [({}, 4, 3)], heuristics


def compile_launch(kernel_object, args: tuple, kwargs: dict, config: tuple, heuristics: dict, arch: int = 90):
    """Compile one recorded launch in one configuration for ``GPUTarget("cuda", arch, 32)``, specialised as
    Triton's launcher would specialise these arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = kernel_object
    config_kwargs, num_warps, num_stages = config
    call_kwargs = {**kwargs, **config_kwargs}
    named = {**dict(zip(fn.arg_names, args)), **call_kwargs}
    for name, rule in heuristics.items():
        call_kwargs[name] = rule(named)
    call_kwargs.update(num_warps=num_warps, num_stages=num_stages)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **call_kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, call_kwargs, bound, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__), constexprs_by_name(fn, call_kwargs)


def constexprs_by_name(fn, call_kwargs: dict) -> dict:
    return {name: call_kwargs[name] for name in fn.arg_names if name in call_kwargs}


# ----------------------------------------------------------------------------------------------
# reading the compiled kernel
# ----------------------------------------------------------------------------------------------

SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction text) of every instruction of a cuobjdump -sass listing."""
    return [(int(address, 16), body) for address, body in SASS_LINE.findall(text)]


def _opcode(body: str) -> str:
    body = re.sub(r"^@!?U?P\w+\s+", "", body.strip())
    return body.split()[0] if body else ""


def loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first address, address of the closing branch) of every loop: a BRA to a lower address (the BRA to
    itself after EXIT is a trap, not a loop)."""
    found = []
    for address, body in instructions:
        if _opcode(body).startswith("BRA"):
            match = re.search(r"0x([0-9a-f]+)", body)
            if match and int(match.group(1), 16) < address:
                found.append((int(match.group(1), 16), address))
    return found


def inner_loop(instructions: list[tuple[int, str]]) -> dict | None:
    """The inner loop (see the module docstring): its span, instruction count and matrix products."""
    spans = loops(instructions)
    if not spans:
        return None

    def body(span):
        return [(a, b) for a, b in instructions if span[0] <= a <= span[1] and _opcode(b) != "NOP"]

    def mma_count(span):
        return sum(1 for _, b in body(span) if MMA_SASS.search(_opcode(b)))

    def inner(span, candidates):
        nested = [other for other in candidates if other != span and span[0] <= other[0] and other[1] <= span[1]]
        return not nested

    with_mma = [span for span in spans if mma_count(span)]
    if with_mma:
        chosen = min((span for span in with_mma if inner(span, with_mma)), key=lambda s: -mma_count(s))
    else:
        chosen = max((span for span in spans if inner(span, spans)), key=lambda s: len(body(s)))
    instructions_in = body(chosen)
    opcodes = {}
    for _, text in instructions_in:
        op = _opcode(text).split(".")[0]
        opcodes[op] = opcodes.get(op, 0) + 1
    return {"span": [hex(chosen[0]), hex(chosen[1])], "instructions": len(instructions_in),
            "mma_instructions": mma_count(chosen), "loops_in_kernel": len(spans),
            "top_opcodes": dict(sorted(opcodes.items(), key=lambda item: -item[1])[:12])}


def block_scores(name: str, constexprs: dict) -> tuple[int, int] | None:
    """(rows, keys) of the scores one inner-loop iteration computes, from the kernel's constexprs."""
    if "TILE_Y" in constexprs:  # tiles: a TILE_Y x TILE_X tile against one map-row segment of KEY_W keys
        return constexprs["TILE_Y"] * constexprs["TILE_X"], constexprs["KEY_W"]
    if "BLOCK" in constexprs:  # chunks: 64-row blocks, BLOCKS_PER_STEP of them per iteration
        from vilscale.kernels._triton_chunks import BLOCKS_PER_STEP

        return constexprs["BLOCK"], constexprs["BLOCK"] * BLOCKS_PER_STEP[name]
    if "BLOCK_N" in constexprs:  # global kernels: BLOCK_G global rows against BLOCK_N tokens
        return constexprs["BLOCK_G"], constexprs["BLOCK_N"]
    return None


def analyse(compiled, name: str, constexprs: dict, num_warps: int) -> dict:
    ptx = compiled.asm["ptx"]
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as scratch:
        cubin_path = Path(scratch) / "kernel.cubin"
        cubin_path.write_bytes(cubin)
        ptx_path = Path(scratch) / "kernel.ptx"
        ptx_path.write_text(ptx)
        sass = subprocess.run([str(_tool("cuobjdump")), "-sass", str(cubin_path)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", str(cubin_path)],
                               capture_output=True, text=True, check=True).stdout
        arch = "sm_90a" if ".target sm_90a" in ptx else "sm_90"
        verbose = subprocess.run([str(_tool("ptxas")), "-v", f"--gpu-name={arch}", str(ptx_path), "-o",
                                  str(Path(scratch) / "again.cubin")], capture_output=True, text=True)
    resources = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose.stderr + verbose.stdout)
    instructions = parse_sass(sass)
    opcodes = [_opcode(body) for _, body in instructions]
    report = {
        "num_warps": num_warps,
        "wgmma": "wgmma.mma_async" in ptx and any(op.startswith("HGMMA") for op in opcodes),
        "wgmma_instructions": sum(1 for op in opcodes if op.startswith("HGMMA")),
        "mma_sync_instructions": sum(1 for op in opcodes if op.startswith("HMMA")),
        "registers": int(resources.get("REG", -1)),
        "local_bytes": int(resources.get("LOCAL", -1)),
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "local_instructions": sum(1 for op in opcodes if op.split(".")[0] in ("STL", "LDL")),
        "shared_bytes": int(compiled.metadata.shared) + int(resources.get("SHARED", 0)),
        "sass_instructions": len(instructions),
        "async_copies": sum(1 for op in opcodes if op.split(".")[0] in ("LDGSTS", "UBLKCP", "UTMALDG")),
    }
    loop = inner_loop(instructions)
    scores = block_scores(name, constexprs)
    if loop is not None and scores is not None:
        rows, keys = scores
        loop["scores_per_iteration"] = rows * keys
        loop["warp_instructions_per_iteration"] = loop["instructions"] * num_warps
        loop["warp_instructions_per_score"] = round(loop["instructions"] * num_warps / (rows * keys), 4)
    report["inner_loop"] = loop
    return report


# ----------------------------------------------------------------------------------------------

def kernel_figures(kernel: str, *, arch: int = TARGET_ARCH, **record_kwargs) -> dict:
    """{kernel name: [figures per configuration]} for every launch of ``kernel``'s forward and backward."""
    figures = {}
    for kernel_object, args, kwargs in record_launches(kernel, **record_kwargs):
        fn, configs, heuristics = _unwrap(kernel_object)
        name = fn.__name__
        if name in figures:
            continue
        rows = []
        for config in configs:
            compiled, constexprs = compile_launch(fn, args, kwargs, config, heuristics, arch)
            row = analyse(compiled, name, constexprs, config[1])
            row["config"] = {**config[0], "num_warps": config[1], "num_stages": config[2]}
            row["constexprs"] = {key: value for key, value in constexprs.items()
                                 if key.isupper() and not isinstance(value, bool)}
            rows.append(row)
        figures[name] = rows
    return figures


# The sweep: every kind of problem the chunk kernels may be given, each compiled in every configuration.
SWEEP_HEAD_DIMS = (16, 32, 48, 64)
SWEEP_WINDOWS = (7, 11)  # one 64-row block per chunk, and two
SWEEP_DTYPES = ("bf16", "fp16", "fp32")
SM90_MAX_SHARED = 232448  # bytes of shared memory a block may use on sm_90 (227 KiB)


def sweep_problems() -> list[dict]:
    """Problems for ``sweep``: every dtype, head dim and block count, all 9 chunks with one global token and a
    shift mode's neighbour without global tokens (biases on), and bf16 without bias tables with 3 global tokens."""
    problems = []
    for dtype in SWEEP_DTYPES:
        for head_dim in SWEEP_HEAD_DIMS:
            for window in SWEEP_WINDOWS:
                base = dict(dtype_name=dtype, problem=dict(batch=2, heads=2, map_hw=(23, 30), head_dim=head_dim,
                                                          window=window))
                problems.append({**base, "problem": {**base["problem"], "num_global": 1}, "neighbour": None})
                problems.append({**base, "problem": {**base["problem"], "num_global": 0}, "neighbour": 5})
                if dtype == "bf16":
                    problems.append({**base, "problem": {**base["problem"], "num_global": 3}, "neighbour": None,
                                     "biases": False})
    return problems


def sweep(arch: int = TARGET_ARCH, progress=print) -> list[dict]:
    """Compile the chunk kernels for every problem of ``sweep_problems`` in every configuration: whether each
    compiles, fits sm_90's shared memory, and its registers and spills."""
    rows = []
    for spec in sweep_problems():
        launches = record_launches("chunks", dtype_name=spec["dtype_name"], problem=spec["problem"],
                                   neighbour=spec["neighbour"], biases=spec.get("biases", True))
        for kernel_object, args, kwargs in launches:
            fn, configs, heuristics = _unwrap(kernel_object)
            if "chunk" not in fn.__name__:
                continue
            for config in configs:
                row = {"kernel": fn.__name__, "dtype": spec["dtype_name"], "head_dim": spec["problem"]["head_dim"],
                       "window": spec["problem"]["window"], "num_global": spec["problem"]["num_global"],
                       "neighbour": spec["neighbour"], "biases": spec.get("biases", True),
                       "num_warps": config[1], "num_stages": config[2]}
                try:
                    compiled, constexprs = compile_launch(fn, args, kwargs, config, heuristics, arch)
                except Exception as error:  # a lowering failure is the finding
                    row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
                else:
                    figures = analyse(compiled, fn.__name__, constexprs, config[1])
                    row.update({key: figures[key] for key in ("wgmma", "registers", "spill_stores", "spill_loads",
                                                              "shared_bytes")})
                    row["fits_shared"] = figures["shared_bytes"] <= SM90_MAX_SHARED
                rows.append(row)
                progress(json.dumps(row))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default=",".join(LOCAL_KERNELS), help="comma-separated subset of tiles,chunks")
    parser.add_argument("--sweep", action="store_true",
                        help="also compile the chunk kernels for every dtype, head dim and window they take (slow)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/"
                                                    "kernel-static-sm90-triton<version>.json)")
    args = parser.parse_args(argv)
    reason = tools_missing()
    if reason:
        raise SystemExit(f"kernel_static.py: {reason}")
    import torch
    import triton

    sys.path.insert(0, str(REPO / "benchmarks"))
    from provenance import commit

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit(), "triton": triton.__version__, "torch": torch.__version__,
              "target": f"sm_{TARGET_ARCH}", "problem": {**STAGE1, "dtype": "bf16", "mode": "chunk",
                                                         "tables": "all four, learnt"},
              "kernels": {}}
    for kernel in (name.strip() for name in args.kernels.split(",") if name.strip()):
        if kernel not in LOCAL_KERNELS:
            raise SystemExit(f"unknown kernels {kernel!r}; valid: {LOCAL_KERNELS}")
        report["kernels"][kernel] = kernel_figures(kernel)
        for name, rows in report["kernels"][kernel].items():
            for row in rows:
                loop = row["inner_loop"] or {}
                print(f"{kernel:<7} {name:<24} warps {row['num_warps']} stages {row['config']['num_stages']}: "
                      f"wgmma {row['wgmma_instructions']:>3} mma.sync {row['mma_sync_instructions']:>3} "
                      f"regs {row['registers']:>3} spills {row['spill_stores']}/{row['spill_loads']} "
                      f"smem {row['shared_bytes']:>6} loop {loop.get('instructions', '-')} instr, "
                      f"{loop.get('warp_instructions_per_score', '-')} warp-instr/score", flush=True)
    if args.sweep:
        report["sweep"] = sweep()
    major_minor = ".".join(triton.__version__.split(".")[:2])
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / \
        f"kernel-static-sm{TARGET_ARCH}-triton{major_minor}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
