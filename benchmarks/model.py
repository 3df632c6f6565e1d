"""Forward+backward time and peak memory of a ViL model per attention backend, side by side, and
against the official implementation (microsoft/vision-longformer) with the same weights.

    python benchmarks/model.py                                  # ViL-Small at 224, 448, 896
    python benchmarks/model.py --batch 1 --max-size 448         # a CPU-sized run (a few minutes)
    python benchmarks/model.py --backends chunked reference triton --dtype bf16
    # vilscale's chunked backend against the official `longformerhand` attention, CPU, as in
    # benchmarks/results/model-cpu-2core.json:
    python benchmarks/model.py --official-repo /path/to/vision-longformer --backends chunked official \\
        --pos-embed rpe --sizes 224 448 --batch 2 --threads 2 --repeats 3 --steps 6 --json out.json

``--official-repo`` is a checkout of microsoft/vision-longformer; its ``src/models`` is imported
from there at run time (nothing of it is copied into vilscale). It needs ``einops`` and ``scipy``;
when ``timm`` is not installed, the three helpers the official model imports from it
(``trunc_normal_``, ``DropPath``, ``to_2tuple``) are stood in for by torch equivalents (they only
initialise weights, which are overwritten, or are unused at drop-path rate 0). The official model is
built with the released configuration (shared global projections, patch-embedding LayerNorm,
``longformerhand`` attention: its hand-written sliding-chunk autograd function) and loaded with the
same weights as the vilscale model (``vilscale.model.vilscale_to_official``); the logits of the two
on the benchmark input, in evaluation mode, are compared as a check that the two compute the same
network.

Each backend runs in its own process, all of them built at once for a size and then stepping in
turn: one step each per round, the order rotated every round, so that load from other work on a
shared machine falls on every backend alike, and each step of one backend has a neighbour of the
other to compare with. ``--repeats`` does this again with fresh processes. Peak memory is each
process's own: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``), on CPU the
process's peak resident memory above what it held before the first step (model, weights and input
included in the baseline). A step is forward + backward of the model under autocast in ``--dtype``
(no optimizer), timed on its own in wall and process CPU time (all threads). Against ``official``
the script prints the ratio of median step times, the median ratio of steps run next to each other,
the ratio of the fastest steps, of CPU times and of peak memory.
When the dense ``reference`` backend would not fit in memory, or refuses the problem, the table says
so instead of running it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

from provenance import commit, cpu_model

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = "official"


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


# ----------------------------------------------------------------------------------------------
# the official implementation, imported from the user's checkout
# ----------------------------------------------------------------------------------------------

def _timm_stand_in() -> None:
    """Register ``timm.models.layers`` with the three names the official model imports, when timm is
    not installed."""
    try:
        import timm.models.layers  # noqa: F401
        return
    except ImportError:
        pass
    import torch

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob=0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if not self.training or not self.drop_prob:
                return x
            keep = 1.0 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
            return x * mask / keep

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    layers.to_2tuple = lambda value: tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


def official_msvit(repo: str | os.PathLike):
    """The official ``MsViT`` class, imported from ``<repo>/src/models`` (its package ``__init__``,
    which needs torchvision, is skipped)."""
    import importlib.util

    models = Path(repo) / "src" / "models"
    if not (models / "msvit.py").is_file():
        raise SystemExit(f"--official-repo {repo}: no src/models/msvit.py there; pass a checkout of "
                         "microsoft/vision-longformer")
    _timm_stand_in()
    package = types.ModuleType("vil_official")
    package.__path__ = [str(models)]
    sys.modules["vil_official"] = package
    spec = importlib.util.spec_from_file_location("vil_official.msvit", models / "msvit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.MsViT


def official_arch(config) -> str:
    """The official ``MODEL.VIT.MSVIT.ARCH`` string of a vilscale ``ViLConfig``."""
    ape = int(config.pos_embed == "ape")
    return "_".join(
        f"l{index + 1},h{stage.heads},d{stage.dim},n{stage.depth},s{int(config.uses_vil(index))},"
        f"g{stage.num_global},p{stage.patch_size},f{stage.window},a{ape}"
        for index, stage in enumerate(config.stages))


# The official `mode` of each vilscale shift mode.
OFFICIAL_MODES = {"full": 0, "random": 1, "own": -1}


def build_official(repo, config, shift_mode: str = "full"):
    """An official MsViT with the released configuration for this vilscale ``config``."""
    import functools

    import torch

    msvit = official_msvit(repo)
    return msvit(official_arch(config), img_size=config.img_size[0], num_classes=config.num_classes,
                 qkv_bias=config.qkv_bias, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 norm_layer=functools.partial(torch.nn.LayerNorm, eps=config.ln_eps), norm_embed=True,
                 sharew=True, attn_type="longformerhand", sw_exact=int(config.window_mode == "exact"),
                 mode=OFFICIAL_MODES[shift_mode], ln_eps=config.ln_eps)


# ----------------------------------------------------------------------------------------------
# the measurement: one worker process per backend, stepping in turn
# ----------------------------------------------------------------------------------------------

def _worker(job: dict, conn) -> None:
    """Build the model, then run one step per ``step``/``warm`` message and report its wall and CPU
    time; on ``finish`` report the peak memory and evaluation logits, and exit."""
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])

    from vilscale.model import create_model

    try:
        device, batch, size = job["device"], job["batch"], job["size"]
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
        kwargs = dict(img_size=size, pos_embed=job["pos_embed"], drop_path_rate=0.0)
        if job["backend"] == OFFICIAL:
            with torch.device("meta"):
                config = create_model(job["model"], **kwargs).config
            model = build_official(job["official_repo"], config, job["shift_mode"])
            missing, unexpected = model.load_state_dict(torch.load(job["official_weights"]), strict=False)
            if unexpected or any(not key.endswith("relative_position_index") for key in missing):
                raise RuntimeError(f"official weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        else:
            model = create_model(job["model"], attn_backend=job["backend"], shift_mode=job["shift_mode"], **kwargs)
            model.load_state_dict(torch.load(job["weights"]))
        model = model.to(device).train()
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(batch, 3, size, size, generator=generator).to(device)
        labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    except ValueError as error:  # a backend refusing the problem
        conn.send({"status": "refused", "reason": str(error)})
        return

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not torch.float32):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    baseline = _rss_bytes()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    conn.send({"status": "ready"})
    try:
        while conn.recv() != "finish":
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            conn.send((time.perf_counter() - wall, time.process_time() - cpu))
    except torch.OutOfMemoryError:
        conn.send({"status": "oom", "reason": "out of memory"})
        return
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    with torch.no_grad():
        logits = model.eval()(images[:1]).float().cpu()
    conn.send({"status": "ok", "peak_bytes": peak, "logits": logits.flatten().tolist()})


def _measure_size(args, size: int, weights: dict, device: str) -> dict[str, dict]:
    """Every backend at one size: one worker each, all alive, stepping in turn (one step each per
    round, the order rotated every round), so that load from elsewhere falls on all of them alike."""
    context = multiprocessing.get_context("spawn")
    results, workers = {}, {}
    for backend in args.backends:
        if backend == "reference":
            need, available = _dense_need_bytes(args.model, size, args.batch), _available_bytes(device)
            if need > 0.8 * available:
                results[backend] = {"status": "does not fit",
                                    "reason": f"needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}
                continue
        job = dict(model=args.model, size=size, backend=backend, batch=args.batch, dtype=args.dtype, device=device,
                   threads=args.threads, pos_embed=args.pos_embed, shift_mode=args.shift_mode,
                   official_repo=args.official_repo, **weights)
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(job, child))
        process.start()
        workers[backend] = (process, parent)
    for backend, (process, conn) in list(workers.items()):
        try:
            message = conn.recv()
        except EOFError:
            process.join()
            message = {"status": "failed", "reason": f"exit code {process.exitcode} while building the model"}
        if message["status"] != "ready":
            results[backend] = message
            process.join()
            del workers[backend]
    steps = {backend: [] for backend in workers}
    alive = list(workers)
    for round_index in range(args.warmup + args.steps):
        order = alive[round_index % len(alive):] + alive[:round_index % len(alive)] if alive else []
        for backend in order:
            process, conn = workers[backend]
            conn.send("step")
            try:
                reply = conn.recv()
            except EOFError:
                results[backend] = {"status": "failed", "reason": f"exit code {process.exitcode} (killed for memory?)"}
                alive.remove(backend)
                continue
            if isinstance(reply, dict):  # out of memory
                results[backend] = reply
                alive.remove(backend)
            elif round_index >= args.warmup:
                steps[backend].append(reply)
    for backend in alive:
        process, conn = workers[backend]
        conn.send("finish")
        final = conn.recv()
        seconds = [wall for wall, _ in steps[backend]]
        cpu_seconds = [cpu for _, cpu in steps[backend]]
        results[backend] = {**final, "step_seconds": seconds, "step_cpu_seconds": cpu_seconds,
                            "seconds": statistics.median(seconds), "cpu_seconds": statistics.median(cpu_seconds),
                            "min_seconds": min(seconds), "images_per_s": args.batch / statistics.median(seconds)}
    for process, _ in workers.values():
        process.join()
    return results


def _write_weights(args, size: int, folder: str) -> dict:
    """One set of weights per size (seed 0), saved for the vilscale and the official layout."""
    import torch

    from vilscale.model import create_model, vilscale_to_official

    torch.manual_seed(0)
    model = create_model(args.model, img_size=size, pos_embed=args.pos_embed, drop_path_rate=0.0)
    with torch.no_grad():  # LayerNorms, biases and tables start constant; make every weight matter
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    paths = {"weights": os.path.join(folder, f"vilscale-{size}.pt"),
             "official_weights": os.path.join(folder, f"official-{size}.pt")}
    torch.save(model.state_dict(), paths["weights"])
    if OFFICIAL in args.backends:
        torch.save(vilscale_to_official(model), paths["official_weights"])
    return paths


def _median(runs: list[dict], key: str) -> float:
    """Median over runs of a per-run figure; for step times, the median of all steps of all runs."""
    if key in ("seconds", "cpu_seconds"):
        return statistics.median(value for run in runs for value in run[f"step_{key}"])
    return statistics.median(run[key] for run in runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vil_small")
    parser.add_argument("--pos-embed", choices=("ape", "rpe"), default="ape")
    parser.add_argument("--shift-mode", choices=("full", "random", "own"), default="full",
                        help="ViL attention shift mode in training (official `mode` 0, >0, -1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 896])
    parser.add_argument("--max-size", type=int, default=None, help="skip sizes above this (CPU runs)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 32 on CUDA, 1 on CPU)")
    parser.add_argument("--backends", nargs="+", default=["chunked", "reference"],
                        help="what to compare: vilscale attention backends (chunked, reference, triton) and "
                             "`official` (needs --official-repo)")
    parser.add_argument("--official-repo", default=None,
                        help="a checkout of microsoft/vision-longformer; adds the `official` backend")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per (size, backend), interleaved")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.official_repo and OFFICIAL not in args.backends:
        args.backends.append(OFFICIAL)
    if OFFICIAL in args.backends and not args.official_repo:
        parser.error("the `official` backend needs --official-repo PATH (a microsoft/vision-longformer checkout)")
    if args.official_repo and not (Path(args.official_repo) / "src" / "models" / "msvit.py").is_file():
        parser.error(f"--official-repo {args.official_repo}: no src/models/msvit.py there; pass a checkout of "
                     "microsoft/vision-longformer")

    sys.path.insert(0, str(REPO))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batch = args.batch or (32 if device == "cuda" else 1)
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [size for size in args.sizes if args.max_size is None or size <= args.max_size]
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report = {"benchmark": "model", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "commit": commit(), "host": platform.node(), "machine": cpu_model() if device == "cpu" else where,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": where,
              "load_average_at_start": os.getloadavg(), "model": args.model, "pos_embed": args.pos_embed,
              "shift_mode": args.shift_mode, "batch": args.batch, "dtype": args.dtype, "threads": args.threads,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "runs": []}
    print(f"{args.model} ({args.pos_embed}, shift {args.shift_mode}), batch {args.batch}, {args.dtype}, "
          f"forward+backward, on {where}; load average {os.getloadavg()[0]:.2f}")
    runs: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = {size: _write_weights(args, size, folder) for size in sizes}
        for repeat in range(args.repeats):
            for size in sizes:
                load = os.getloadavg()[0]
                for backend, result in _measure_size(args, size, weights[size], device).items():
                    result.update(size=size, backend=backend, repeat=repeat, load_average_before=load,
                                  load_average_after=os.getloadavg()[0])
                    runs.setdefault((size, backend), []).append(result)
                    report["runs"].append({key: value for key, value in result.items() if key != "logits"})
                    if result["status"] == "ok":
                        print(f"  run {repeat + 1}/{args.repeats} {size:4d} px {backend:>9s}: "
                              f"{result['seconds'] * 1e3:9.1f} ms/step (fastest {result['min_seconds'] * 1e3:.1f}), "
                              f"{result['cpu_seconds'] * 1e3:9.1f} CPU ms/step, "
                              f"peak {result['peak_bytes'] / 2**20:8.1f} MiB (load {load:.2f})", flush=True)
                    else:
                        print(f"  run {repeat + 1}/{args.repeats} {size:4d} px {backend:>9s}: {result['status']}: "
                              f"{result.get('reason', '')}", flush=True)

    print(f"\nmedians over {args.repeats} run(s) of {args.steps} steps")
    print(f"{'size':>5s}" + "".join(f" | {backend:^34s}" for backend in args.backends))
    print(f"{'':5s}" + "".join(f" | {'ms/step':>9s} {'img/s':>9s} {'peak MiB':>12s}" for _ in args.backends))
    report["summary"] = []
    for size in sizes:
        cells = []
        for backend in args.backends:
            ok = [run for run in runs[(size, backend)] if run["status"] == "ok"]
            if not ok:
                cells.append(f"{runs[(size, backend)][0]['status']:>34s}")
                continue
            seconds, peak = _median(ok, "seconds"), _median(ok, "peak_bytes")
            report["summary"].append({"size": size, "backend": backend, "seconds": seconds,
                                      "cpu_seconds": _median(ok, "cpu_seconds"), "peak_bytes": peak,
                                      "images_per_s": args.batch / seconds, "runs": len(ok)})
            cells.append(f"{seconds * 1e3:9.1f} {args.batch / seconds:9.2f} {peak / 2**20:12.1f}")
        print(f"{size:5d}" + "".join(f" | {cell}" for cell in cells), flush=True)

    if OFFICIAL in args.backends:
        report["versus_official"] = []
        print("\nagainst the official implementation (median ratios; < 1 is better)")
        for size in sizes:
            official = [run for run in runs[(size, OFFICIAL)] if run["status"] == "ok"]
            for backend in args.backends:
                mine = [run for run in runs[(size, backend)] if run["status"] == "ok"]
                if backend == OFFICIAL or not mine or not official:
                    continue
                logits_error = max(abs(a - b) for a, b in zip(mine[0]["logits"], official[0]["logits"]))
                fastest = min(run["min_seconds"] for run in mine) / min(run["min_seconds"] for run in official)
                paired = [a / b for mine_run, official_run in zip(mine, official)
                          for a, b in zip(mine_run["step_seconds"], official_run["step_seconds"])]
                row = {"size": size, "backend": backend,
                       "time_ratio": _median(mine, "seconds") / _median(official, "seconds"),
                       "paired_step_time_ratio": statistics.median(paired),
                       "fastest_step_time_ratio": fastest,
                       "cpu_time_ratio": _median(mine, "cpu_seconds") / _median(official, "cpu_seconds"),
                       "peak_memory_ratio": _median(mine, "peak_bytes") / _median(official, "peak_bytes"),
                       "time_ratio_per_repeat": [a["seconds"] / b["seconds"] for a, b in zip(mine, official)],
                       "step_time_ratios": paired,
                       "eval_logits_max_abs_difference": logits_error}
                report["versus_official"].append(row)
                print(f"  {size:4d} px {backend}/official: time {row['time_ratio']:.3f}x (median of step pairs "
                      f"{row['paired_step_time_ratio']:.3f}x, fastest steps {fastest:.3f}x, CPU time "
                      f"{row['cpu_time_ratio']:.3f}x), peak memory {row['peak_memory_ratio']:.3f}x; "
                      f"eval logits differ by {logits_error:.2e}")
    report["load_average_at_end"] = os.getloadavg()
    for (size, backend), results in runs.items():
        for result in results:
            if result["status"] not in ("ok",):
                print(f"  {backend} at {size}: {result['status']}: {result.get('reason', '')}")
                break
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
