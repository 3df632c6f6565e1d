"""Training-step throughput and MFU of a ViL variant inside a real DeepSpeed engine.

Side by side in one run, for each position embedding (RPE first: the paper's best ImageNet and every detection
figure use it), each mode (eager, and `torch.compile` of the model with its attention as one custom op) and each
attention backend asked for: images/s, step time and MFU (model FLOPs x images/s / device peak) of forward +
backward + optimizer step on synthetic images (so the data path does not limit it; see benchmarks/data.py for
that), and with ``--profile`` a `torch.profiler` breakdown of 3 steps (attention, linear, elementwise, optimizer,
idle) of each row.

    python benchmarks/train.py --model vil_small --img-size 224 --precision bf16 --zero-stage 2 \
        --backends triton,chunked --batch 64 --json benchmarks/results/train_h100.json
    python benchmarks/train.py --model vil_nano --img-size 32 --window 2 --precision fp32 --batch 32   # CPU

``--engine torch`` (the default where DeepSpeed is not installed, as on a bare GPU image) times the same
step in plain PyTorch: fp32 weights, ``torch.autocast`` in the chosen precision, torch's AdamW (fused on
CUDA). Beside the MFU against the datasheet peak, ``mfu_measured`` divides by the matrix-product rate this
script measures on the same device (a large square product in the same precision), which is what a
kernel can actually reach.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import commit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_peak(device: torch.device, precision: str) -> float:
    """FLOP/s of a large square matrix product in ``precision`` on ``device`` (a small one on CPU)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    repeats = 10
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _deepspeed_installed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


# Kernel (or op) names of each part of a step, for the profiler's breakdown; the rest of the device time is
# "elementwise" (norms, activations, casts, copies, reductions), and the wall time no kernel covers is "idle". The
# triton backend's kernels are named; the chunked backend's attention runs as generic products and copies, which
# land in "linear" and "elementwise".
PARTS = (("attention", ("vil_attention", "fwd_local", "fwd_global", "bwd_local", "bwd_global", "dq_", "dkdv",
                        "flex_attention", "chunked")),
         ("linear", ("gemm", "matmul", "cutlass", "xmma", "cublas", "addmm", "aten::mm", "aten::bmm", "sm90_",
                     "sm80_")),
         ("optimizer", ("adam", "multi_tensor", "foreach", "optimizer")))


def profile_breakdown(step, device: torch.device, steps: int = 3) -> dict:
    """Seconds per step of attention / linear / elementwise / optimizer / idle over ``steps`` profiled steps (device
    kernels on CUDA; on the CPU the aten ops' own time, a rougher split)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall = (time.perf_counter() - started) / steps
    parts = dict.fromkeys(("attention", "linear", "elementwise", "optimizer"), 0.0)
    for event in prof.key_averages():
        own = (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total) / 1e6 / steps
        if own <= 0 or (device.type != "cuda" and not event.key.startswith("aten::")):
            continue
        name = event.key.lower()
        part = next((label for label, signs in PARTS if any(sign in name for sign in signs)), "elementwise")
        parts[part] += own
    parts["idle"] = max(0.0, wall - sum(parts.values()))
    return {"step_s": wall, **{f"{name}_s": value for name, value in parts.items()}}


def measure_plain(args, backend: str, pos_embed: str = "ape", compiled: bool = False) -> dict:
    """The step in plain PyTorch: fp32 weights, autocast, AdamW."""
    from vilscale.model import create_model
    from vilscale.model.flops import count_flops

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size, window=args.window, attn_backend=backend,
                         num_classes=args.num_classes, pos_embed=pos_embed).to(device)
    flops_per_image = 6.0 * count_flops(model, args.img_size)  # fwd + bwd, 2 FLOPs per multiply-add
    if compiled:
        model.compile()  # its attention is one custom op in the graph (vilscale.kernels.op)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                  fused=device.type == "cuda")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32"):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    elapsed = (time.perf_counter() - started) / args.steps
    row = _row(args, backend, device, elapsed, flops_per_image)
    if args.profile:
        row["breakdown"] = profile_breakdown(step, device)
    return row


def _row(args, backend, device, elapsed, flops_per_image) -> dict:
    from vilscale.orchestration.training.metrics import device_peak_flops

    throughput = args.batch / elapsed
    peak = device_peak_flops(device, args.precision, args.peak_flops) if device.type == "cuda" else 0.0
    return {"backend": backend, "step_ms": 1000 * elapsed, "images_per_second": throughput,
            "mfu": flops_per_image * throughput / peak if peak else None,
            "mfu_measured": flops_per_image * throughput / args.measured_peak if args.measured_peak else None,
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "gflops_per_image_fwd": flops_per_image / 6e9}


def measure(args, backend: str, pos_embed: str = "ape", compiled: bool = False) -> dict:
    if args.engine == "torch":
        return measure_plain(args, backend, pos_embed, compiled)
    from vilscale.model.flops import count_flops
    from vilscale.orchestration.config import spec_from_dict
    from vilscale.orchestration.training.engine import build_engine, build_model
    spec = spec_from_dict({
        "run_dir": "/tmp/vilscale-bench", "data": {},
        "model": {"name": args.model, "img_size": args.img_size, "window": args.window, "attn_backend": backend,
                  "num_classes": args.num_classes, "pos_embed": pos_embed},
        "train": {"micro_batch": args.batch, "zero_stage": args.zero_stage, "precision": args.precision,
                  "activation_checkpointing": args.activation_checkpointing, "compile": compiled},
    })
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(spec)
    flops_per_image = 6.0 * count_flops(model, args.img_size)  # fwd + bwd, 2 FLOPs per multiply-add
    engine, _ = build_engine(spec, model, world_size=1, device=device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)

    def step():
        loss = torch.nn.functional.cross_entropy(engine(images).float(), labels)
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - started) / args.steps
    row = _row(args, backend, device, elapsed, flops_per_image)
    if args.profile:
        row["breakdown"] = profile_breakdown(step, device)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vil_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--backends", default="chunked", help="comma-separated: triton,chunked,reference")
    parser.add_argument("--pos-embeds", default="rpe,ape", help="comma-separated: rpe (the paper's best), ape")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled (torch.compile)")
    parser.add_argument("--profile", action="store_true",
                        help="add a torch.profiler breakdown of 3 steps to every row (attention, linear, elementwise, "
                             "optimizer, idle)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-flops", type=float, default=0.0, help="device peak FLOP/s (default: known table)")
    parser.add_argument("--engine", choices=("auto", "deepspeed", "torch"), default="auto",
                        help="deepspeed (a real engine) or torch (plain PyTorch); auto: deepspeed where installed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch engine only (the DeepSpeed path takes the first CUDA device, else the CPU)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.engine == "auto":
        args.engine = "deepspeed" if _deepspeed_installed() else "torch"
    args.measured_peak = matmul_peak(torch.device(args.device), args.precision)
    print(f"measured {args.precision} matrix-product rate: {args.measured_peak / 1e12:.4g} TFLOP/s")

    if args.engine == "deepspeed":
        from vilscale.orchestration.training.distributed import init_distributed
        from vilscale.orchestration.training.engine import use_environment_ninja

        use_environment_ninja()
        init_distributed("auto")  # a one-rank group
    rows = []

    def write_json():
        """Rewritten after every backend, so a run stopped midway keeps what it measured."""
        if args.json:
            Path(args.json).write_text(json.dumps({
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
                "torch": torch.__version__, "measured_peak_flops": args.measured_peak, "config": vars(args),
                "results": rows}, indent=1))

    for pos_embed in args.pos_embeds.split(","):
        for mode in args.modes.split(","):
            for backend in args.backends.split(","):
                label = {"backend": backend, "pos_embed": pos_embed, "mode": mode}
                try:
                    rows.append({**measure(args, backend, pos_embed, mode == "compiled"), **label})
                except Exception as error:  # one row failing is a result; the others still run
                    first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
                    rows.append({**label, "error": f"{type(error).__name__}: {first_line}"})
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                write_json()
    engine = f"ZeRO-{args.zero_stage}" if args.engine == "deepspeed" else "plain torch + AdamW"
    print(f"{args.model} @ {args.img_size}, batch {args.batch}, {args.precision}, {engine}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or 'cpu'}")
    print(f"{'pos':4} {'mode':9} {'backend':10} {'step ms':>10} {'images/s':>10} {'MFU':>8} {'MFU meas.':>9} "
          f"{'peak GiB':>9}")
    for row in rows:
        what = f"{row['pos_embed']:4} {row['mode']:9} {row['backend']:10}"
        if "error" in row:
            print(f"{what} cannot run: {row['error']}")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        measured = f"{100 * row['mfu_measured']:.1f}%" if row["mfu_measured"] is not None else "n/a"
        memory = f"{row['peak_mem_bytes'] / 2**30:.2f}" if row["peak_mem_bytes"] else "n/a"
        print(f"{what} {row['step_ms']:10.1f} {row['images_per_second']:10.1f} {mfu:>8} {measured:>9} {memory:>9}")
        if "breakdown" in row:
            print("     " + ", ".join(f"{key[:-2]} {1000 * value:.1f} ms" for key, value in row["breakdown"].items()))
    for row in rows:
        base = next((r for r in rows if (r["pos_embed"], r["mode"], r["backend"]) ==
                     (row["pos_embed"], "eager", "chunked") and "error" not in r), None)
        if base and row is not base and "error" not in row:
            print(f"{row['pos_embed']} {row['mode']} {row['backend']} vs eager chunked: "
                  f"{row['images_per_second'] / base['images_per_second']:.2f}x images/s")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
