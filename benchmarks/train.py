"""Training-step throughput and MFU of a ViL variant inside a real DeepSpeed engine.

Side by side in one run, for each attention backend asked for: images/s, step time and MFU
(model FLOPs x images/s / device peak) of forward + backward + optimizer step on synthetic
images (so the data path does not limit it; see benchmarks/data.py for that).

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


def measure_plain(args, backend: str) -> dict:
    """The step in plain PyTorch: fp32 weights, autocast, AdamW."""
    from vilscale.model import create_model
    from vilscale.model.flops import count_flops

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size, window=args.window, attn_backend=backend,
                         num_classes=args.num_classes).to(device)
    flops_per_image = 6.0 * count_flops(model, args.img_size)  # fwd + bwd, 2 FLOPs per multiply-add
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
    return _row(args, backend, device, elapsed, flops_per_image)


def _row(args, backend, device, elapsed, flops_per_image) -> dict:
    from vilscale.orchestration.training.metrics import device_peak_flops

    throughput = args.batch / elapsed
    peak = device_peak_flops(device, args.precision, args.peak_flops) if device.type == "cuda" else 0.0
    return {"backend": backend, "step_ms": 1000 * elapsed, "images_per_second": throughput,
            "mfu": flops_per_image * throughput / peak if peak else None,
            "mfu_measured": flops_per_image * throughput / args.measured_peak if args.measured_peak else None,
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "gflops_per_image_fwd": flops_per_image / 6e9}


def measure(args, backend: str) -> dict:
    if args.engine == "torch":
        return measure_plain(args, backend)
    from vilscale.model.flops import count_flops
    from vilscale.orchestration.config import spec_from_dict
    from vilscale.orchestration.training.engine import build_engine, build_model
    spec = spec_from_dict({
        "run_dir": "/tmp/vilscale-bench", "data": {},
        "model": {"name": args.model, "img_size": args.img_size, "window": args.window, "attn_backend": backend,
                  "num_classes": args.num_classes},
        "train": {"micro_batch": args.batch, "zero_stage": args.zero_stage, "precision": args.precision,
                  "activation_checkpointing": args.activation_checkpointing},
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
    return _row(args, backend, device, elapsed, flops_per_image)


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

    for backend in args.backends.split(","):
        try:
            rows.append(measure(args, backend))
        except Exception as error:  # one backend failing is a result; the others still run
            first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            rows.append({"backend": backend, "error": f"{type(error).__name__}: {first_line}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        write_json()
    engine = f"ZeRO-{args.zero_stage}" if args.engine == "deepspeed" else "plain torch + AdamW"
    print(f"{args.model} @ {args.img_size}, batch {args.batch}, {args.precision}, {engine}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or 'cpu'}")
    print(f"{'backend':10} {'step ms':>10} {'images/s':>10} {'MFU':>8} {'MFU meas.':>9} {'peak GiB':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['backend']:10} cannot run: {row['error']}")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        measured = f"{100 * row['mfu_measured']:.1f}%" if row["mfu_measured"] is not None else "n/a"
        memory = f"{row['peak_mem_bytes'] / 2**30:.2f}" if row["peak_mem_bytes"] else "n/a"
        print(f"{row['backend']:10} {row['step_ms']:10.1f} {row['images_per_second']:10.1f} {mfu:>8} {measured:>9} "
              f"{memory:>9}")
    baseline = next((r for r in rows if r.get("backend") == "chunked" and "error" not in r), None)
    for row in rows:
        if baseline and row is not baseline and "error" not in row:
            ratio = row["images_per_second"] / baseline["images_per_second"]
            print(f"{row['backend']} vs chunked: {ratio:.2f}x images/s")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
