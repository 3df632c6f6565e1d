"""The ViL backbone for detection at detection resolution: forward+backward time and peak memory per attention
backend, at 400x667 and 800x1333 (COCO's test size), batch 1, and how memory grows with the pixels.

    python benchmarks/backbone.py                                   # vil_small, chunked (+ triton on CUDA)
    python benchmarks/backbone.py --model vil_tiny --threads 2 --json out.json      # a CPU-sized run

The model is ``create_model(NAME, backbone=True)`` (ViL attention in every stage, global tokens 1, 1, 1, 0,
window 7, as the official detection configs), the input padded to the total stride (32) as the detector's
transform pads it, and the step is the sum of every stage map's mean, backpropagated (no detection head: this
measures the backbone). Each (size, backend) runs in its own process, so peak memory is that process's own: on
CUDA the allocator's peak, on CPU the peak resident memory above what the process held before the first step.
Windowed attention makes activation memory linear in the pixels: the script prints, per backend, the ratio of
peak memory between the two sizes next to the ratio of their pixels (4x). The dense ``reference`` backend
(quadratic) is left out unless asked for.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from provenance import commit, cpu_model

REPO = Path(__file__).resolve().parents[1]
SIZES = ((400, 667), (800, 1333))


def _padded(height: int, width: int, stride: int = 32) -> tuple[int, int]:
    return -(-height // stride) * stride, -(-width // stride) * stride


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(job: dict, conn) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from vilscale.model import create_model

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = job["device"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    try:
        torch.manual_seed(0)
        model = create_model(job["model"], backbone=True, attn_backend=job["backend"], pos_embed=job["pos_embed"],
                             drop_path_rate=0.0).to(device).train()
        height, width = _padded(*job["size"])
        images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1)).to(device)

        def step():
            with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not torch.float32):
                loss = sum(stage.float().mean() for stage in model(images))
            loss.backward()
            model.zero_grad(set_to_none=True)

        baseline = _rss_bytes()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for index in range(job["warmup"] + job["steps"]):
            started = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            if index >= job["warmup"]:
                seconds.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        conn.send({"status": "ok", "seconds": statistics.median(seconds), "peak_bytes": peak,
                   "input_hw": [height, width]})
    except (ValueError, RuntimeError) as error:  # a backend refusing the problem, or out of memory
        conn.send({"status": "failed", "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vil_small")
    parser.add_argument("--pos-embed", choices=("ape", "rpe"), default="rpe")
    parser.add_argument("--backends", nargs="+", default=None, help="default: chunked, and triton on CUDA")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = args.backends or (["triton", "chunked"] if device == "cuda" else ["chunked"])
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    threads = args.threads or os.cpu_count()
    where = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()} ({threads} threads)"
    print(f"{args.model} backbone ({args.pos_embed}), batch 1, {dtype}, forward+backward on {where}")
    context = multiprocessing.get_context("spawn")
    rows = []
    for backend in backends:
        for size in SIZES:
            parent, child = context.Pipe()
            job = dict(model=args.model, pos_embed=args.pos_embed, backend=backend, size=size, device=device,
                       dtype=dtype, threads=args.threads, steps=args.steps, warmup=args.warmup)
            process = context.Process(target=_worker, args=(job, child))
            process.start()
            try:
                result = parent.recv()
            except EOFError:
                result = {"status": "failed", "reason": f"exit code {process.exitcode} (killed for memory?)"}
            process.join()
            result.update(backend=backend, size=list(size))
            rows.append(result)
            if result["status"] == "ok":
                print(f"{backend:8s} {size[0]:4d}x{size[1]:<5d} {result['seconds'] * 1e3:10.1f} ms   peak "
                      f"{result['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
            else:
                print(f"{backend:8s} {size[0]:4d}x{size[1]:<5d} {result['reason']}", flush=True)
    ratios = {}
    for backend in backends:
        small, large = (next((r for r in rows if r["backend"] == backend and r["size"] == list(s)
                              and r["status"] == "ok"), None) for s in SIZES)
        if small and large:
            pixels = (large["input_hw"][0] * large["input_hw"][1]) / (small["input_hw"][0] * small["input_hw"][1])
            ratios[backend] = {"pixels": pixels, "peak_memory": large["peak_bytes"] / small["peak_bytes"],
                               "time": large["seconds"] / small["seconds"]}
            print(f"{backend}: 400x667 -> 800x1333 is {pixels:.2f}x the pixels, {ratios[backend]['peak_memory']:.2f}x "
                  f"the peak memory, {ratios[backend]['time']:.2f}x the time")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "backbone", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "device": where, "torch": torch.__version__, "model": args.model,
            "pos_embed": args.pos_embed, "dtype": dtype, "rows": rows, "ratios": ratios}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
