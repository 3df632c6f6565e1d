"""Training-step throughput and MFU of a ViL variant inside a real DeepSpeed engine.

Side by side in one run, for each attention backend asked for: images/s, step time and MFU
(model FLOPs x images/s / device peak) of forward + backward + optimizer step on synthetic
images (so the data path does not limit it; see benchmarks/data.py for that).

    python benchmarks/train.py --model vil_small --img-size 224 --precision bf16 --zero-stage 2 \
        --backends triton,chunked --batch 64 --json benchmarks/results/train_h100.json
    python benchmarks/train.py --model vil_nano --img-size 32 --window 2 --precision fp32 --batch 32   # CPU
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


def measure(args, backend: str) -> dict:
    from vilscale.model.flops import count_flops
    from vilscale.orchestration.config import spec_from_dict
    from vilscale.orchestration.training.engine import build_engine, build_model
    from vilscale.orchestration.training.metrics import device_peak_flops

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
    throughput = args.batch / elapsed
    peak = device_peak_flops(device, args.precision, args.peak_flops)
    return {"backend": backend, "step_ms": 1000 * elapsed, "images_per_second": throughput,
            "mfu": flops_per_image * throughput / peak if peak else None,
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "gflops_per_image_fwd": flops_per_image / 6e9}


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
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    from vilscale.orchestration.training.distributed import init_distributed
    from vilscale.orchestration.training.engine import use_environment_ninja

    use_environment_ninja()
    init_distributed("auto")  # a one-rank group
    rows = []
    for backend in args.backends.split(","):
        try:
            rows.append(measure(args, backend))
        except (ValueError, RuntimeError) as error:
            rows.append({"backend": backend, "error": str(error).splitlines()[0][:200]})
    print(f"{args.model} @ {args.img_size}, batch {args.batch}, {args.precision}, ZeRO-{args.zero_stage}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or 'cpu'}")
    print(f"{'backend':10} {'step ms':>10} {'images/s':>10} {'MFU':>8} {'peak GiB':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['backend']:10} cannot run: {row['error']}")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        memory = f"{row['peak_mem_bytes'] / 2**30:.2f}" if row["peak_mem_bytes"] else "n/a"
        print(f"{row['backend']:10} {row['step_ms']:10.1f} {row['images_per_second']:10.1f} {mfu:>8} {memory:>9}")
    baseline = next((r for r in rows if r.get("backend") == "chunked" and "error" not in r), None)
    for row in rows:
        if baseline and row is not baseline and "error" not in row:
            ratio = row["images_per_second"] / baseline["images_per_second"]
            print(f"{row['backend']} vs chunked: {ratio:.2f}x images/s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
            "torch": torch.__version__, "config": vars(args), "results": rows}, indent=1))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
