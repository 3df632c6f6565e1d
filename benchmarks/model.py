"""Forward+backward time and peak memory of a ViL model per attention backend, side by side.

    python benchmarks/model.py                                  # ViL-Small at 224, 448, 896
    python benchmarks/model.py --batch 1 --max-size 448         # a CPU-sized run (a few minutes)
    python benchmarks/model.py --backends chunked reference triton --dtype bf16

Each (size, backend) runs in a fresh process, so peak memory is that run's alone: on CUDA the
allocator's peak (``torch.cuda.max_memory_allocated``), on CPU the process's peak resident memory
above what it held before the first step (model and input included in the baseline). A step is
forward + backward of the model under autocast in ``--dtype`` (no optimizer). When the dense
``reference`` backend would not fit in memory, or refuses the problem, the table says so instead of
running it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _available_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _dense_need_bytes(model_name: str, size: int, batch: int) -> int:
    """Rough memory the dense reference needs in its largest ViL stage: about six fp32/bool
    (heads, N, N) tensors per image kept or live at once (bias, scores, probabilities, their grads)."""
    from vilscale.model import build_config

    config = build_config(model_name, img_size=size)
    need = 0
    for index, (stage, (height, width)) in enumerate(zip(config.stages, config.stage_maps())):
        if config.uses_vil(index):
            tokens = stage.num_global + height * width
            need = max(need, 6 * 4 * batch * stage.heads * tokens * tokens)
    return need


def _measure(model_name, size, batch, backend, dtype_name, device, steps, warmup, threads, queue):
    import torch

    if threads:
        torch.set_num_threads(threads)

    from vilscale.model import create_model

    try:
        torch.manual_seed(0)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        model = create_model(model_name, img_size=size, attn_backend=backend, drop_path_rate=0.0).to(device)
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, 1000, (batch,), device=device)

        def step():
            with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not torch.float32):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            model.zero_grad(set_to_none=True)

        baseline = _rss_bytes()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        queue.put({"status": "ok", "seconds": seconds, "images_per_s": batch / seconds, "peak_bytes": peak})
    except ValueError as error:  # a backend refusing the problem
        queue.put({"status": "refused", "reason": str(error)})
    except torch.OutOfMemoryError:
        queue.put({"status": "oom", "reason": "out of memory"})


def _run_one(args, size, backend, device):
    if backend == "reference":
        need, available = _dense_need_bytes(args.model, size, args.batch), _available_bytes(device)
        if need > 0.8 * available:
            return {"status": "does not fit",
                    "reason": f"needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(args.model, size, args.batch, backend, args.dtype, device,
                                                      args.steps, args.warmup, args.threads, queue))
    process.start()
    process.join()
    if process.exitcode != 0 and queue.empty():
        return {"status": "failed", "reason": f"exit code {process.exitcode} (killed for memory?)"}
    return queue.get()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vil_small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 896])
    parser.add_argument("--max-size", type=int, default=None, help="skip sizes above this (CPU runs)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 32 on CUDA, 1 on CPU)")
    parser.add_argument("--backends", nargs="+", default=["chunked", "reference"],
                        help="attention backends to compare (chunked, reference, triton)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batch = args.batch or (32 if device == "cuda" else 1)
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [size for size in args.sizes if args.max_size is None or size <= args.max_size]
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model}, batch {args.batch}, {args.dtype}, forward+backward, on {where}")
    header = f"{'size':>5s}" + "".join(f" | {backend:^34s}" for backend in args.backends)
    print(header)
    print(f"{'':5s}" + "".join(f" | {'ms/step':>9s} {'img/s':>9s} {'peak MiB':>12s}" for _ in args.backends))
    results = []
    for size in sizes:
        cells = []
        for backend in args.backends:
            result = _run_one(args, size, backend, device)
            results.append({"model": args.model, "size": size, "backend": backend, "batch": args.batch,
                            "dtype": args.dtype, "device": where, **result})
            if result["status"] == "ok":
                cells.append(f"{result['seconds'] * 1e3:9.1f} {result['images_per_s']:9.2f} "
                             f"{result['peak_bytes'] / 2**20:12.1f}")
            else:
                cells.append(f"{result['status']:>34s}")
        print(f"{size:5d}" + "".join(f" | {cell}" for cell in cells), flush=True)
    for result in results:
        if result["status"] != "ok":
            print(f"  {result['backend']} at {result['size']}: {result['status']}: {result['reason']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
