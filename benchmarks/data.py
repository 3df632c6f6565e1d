"""Data pipeline throughput: the vilscale FFCV loader against a torch DataLoader with Pillow, side by side.

    python benchmarks/data.py              # 1024 JPEGs, 1 and 2 workers -> benchmarks/results/data-<host>.json
    python benchmarks/data.py --quick --out /tmp/data.json

Both pipelines do the same work on the same photographs (crops of scikit-learn's two sample photos, at
ImageNet-like sizes, saved as JPEG): decode, RandomResizedCrop to 224 (scale 0.08-1), random horizontal
flip, uint8 CHW batches of 64. The Pillow side reads the JPEG files (`Image.open`, `convert("RGB")`,
`resize(box=...)`, as torchvision's RandomResizedCrop does) in DataLoader worker processes; the vilscale
side reads the same images from FFCV shards with numba decode threads, stored two ways: all as JPEG
(quality 90, original size: the like-for-like comparison) and half of them raw (FFCV's
``compress_probability=0.5``, which its ImageNet recipes use: larger shards, less decoding).
"Workers" is processes for the DataLoader and decode threads for vilscale.

Per core means per CPU-second: images divided by the CPU time (user + system) that the pipeline used
during the epoch, its main process and (DataLoader) worker processes together. On a shared machine
this is far steadier than wall-clock rates, which are reported too.

Start-up is the time from constructing a loader to its first batch (FFCV: numba compilation, paid once
per process; DataLoader: starting its worker processes). It is reported next to the steady epoch time
and projected onto an ImageNet-1K epoch of one rank of 8 at the measured rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vilscale.data.config import AugmentConfig, DataConfig  # noqa: E402
from vilscale.data.pipeline import random_resized_boxes  # noqa: E402

SIZE, BATCH = 224, 64


class PillowRandomResizedCrop(torch.utils.data.Dataset):
    """JPEG file -> Pillow decode -> RandomResizedCrop(224) -> random flip -> uint8 (3, 224, 224)."""

    def __init__(self, files: list[str], labels: list[int], seed: int):
        self.files, self.labels, self.seed, self.epoch = files, labels, seed, 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        rng = np.random.default_rng([self.seed, self.epoch, index])
        with Image.open(self.files[index]) as image:
            image = image.convert("RGB")
            width, height = image.size
            top, left, h, w, flip = random_resized_boxes(np.array([height]), np.array([width]), scale=(0.08, 1.0),
                                                         ratio=(3 / 4, 4 / 3), hflip=0.5, rng=rng)[0]
            image = image.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + w, top + h))
            if flip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            array = np.asarray(image)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), self.labels[index]


def _cpu_seconds(loader) -> float:
    """CPU time (user + system) used so far by this process and, for a DataLoader, its worker processes."""
    import psutil

    processes = [psutil.Process()]
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    processes += [psutil.Process(w.pid) for w in workers]
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def _time_epochs(make_iterable, epochs: int) -> tuple[float, list[float], list[float]]:
    """(seconds from construction to the first batch, wall seconds and CPU seconds of each later epoch)."""
    started = time.perf_counter()
    loader = make_iterable()
    iterator = iter(loader)
    first = next(iterator)
    startup = time.perf_counter() - started
    for _ in iterator:
        pass
    del first
    times, cpu = [], []
    for epoch in range(1, epochs + 1):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if hasattr(getattr(loader, "dataset", None), "epoch"):
            loader.dataset.epoch = epoch
        t0, c0 = time.perf_counter(), _cpu_seconds(loader)
        for _ in loader:
            pass
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds(loader) - c0)
    return startup, times, cpu


def run(args) -> dict:
    from vilscale.data.loader import ShardedLoader
    from vilscale.data.samples import photo_imagefolder
    from vilscale.data.writer import WriterSettings, prepare, scan_imagefolder

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vilscale-data-bench-"))
    per_class = args.images // 2
    source = work / "jpegs"
    if not source.exists():
        photo_imagefolder(source, num_classes=2, per_class=per_class, min_side=256, max_side=640, seed=0)
    plan = scan_imagefolder(source)
    shard_sets = {}
    for name, compress in (("jpeg", 1.0), ("half_raw", 0.5)):
        shard_sets[name] = work / f"shards_{name}"
        prepare(plan, shard_sets[name], num_shards=args.shards, workers=2, progress=False,
                settings=WriterSettings(max_side=0, compress_probability=compress, jpeg_quality=90))
    shards = shard_sets["jpeg"]
    num_images = len(plan.refs)
    steps = num_images // BATCH
    sizes = [os.stat(r[1]).st_size for r in plan.refs]
    result = {
        "benchmark": "data", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        "images": num_images, "mean_jpeg_bytes": int(np.mean(sizes)), "shards": args.shards,
        "batch": BATCH, "crop": SIZE, "epochs_timed": args.epochs, "rows": [],
    }
    crop_only = AugmentConfig()
    for workers in args.workers:
        config = DataConfig(img_size=SIZE, num_workers=workers, verify_checksums=False)
        row = {"workers": workers}
        rates = {}
        for name, path in shard_sets.items():
            startup, times, cpu = _time_epochs(
                lambda config=config, path=path: ShardedLoader(path / "manifest.json", rank=0, world_size=1,
                                                               batch_size=BATCH, seed=0, train=True, config=config,
                                                               augment=crop_only),
                args.epochs)
            rates[name] = steps * BATCH / statistics.median(cpu)
            row[f"vilscale_ffcv_{name}"] = {
                "startup_s": round(startup, 2), "epoch_s": [round(t, 3) for t in times],
                "cpu_s": [round(t, 3) for t in cpu], "images_per_s": round(steps * BATCH / statistics.median(times), 1),
                "images_per_cpu_s": round(rates[name], 1),
                # start-up against one rank's share of an ImageNet-1K epoch (1,281,167 images over 8 ranks)
                "startup_fraction_of_in1k_rank_epoch": round(startup / (1_281_167 / 8 / rates[name]), 5)}
        dataset = PillowRandomResizedCrop([r[1] for r in plan.refs], plan.labels, seed=0)
        pil_startup, pil_times, pil_cpu = _time_epochs(
            lambda dataset=dataset, workers=workers: torch.utils.data.DataLoader(
                dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
                persistent_workers=True, generator=torch.Generator().manual_seed(0),
                multiprocessing_context="spawn"),  # forking after numba has started threads is unsafe
            args.epochs)
        pil_rate = steps * BATCH / statistics.median(pil_cpu)
        row["torch_pillow"] = {"startup_s": round(pil_startup, 2), "epoch_s": [round(t, 3) for t in pil_times],
                               "cpu_s": [round(t, 3) for t in pil_cpu],
                               "images_per_s": round(steps * BATCH / statistics.median(pil_times), 1),
                               "images_per_cpu_s": round(pil_rate, 1)}
        row["speedup_per_core_jpeg"] = round(rates["jpeg"] / pil_rate, 2)
        row["speedup_per_core_half_raw"] = round(rates["half_raw"] / pil_rate, 2)
        first = row["vilscale_ffcv_jpeg"]
        print(f"workers={workers}: torch+Pillow {pil_rate:6.1f} img/CPU-s (start-up {pil_startup:.2f} s)"
              f" | vilscale JPEG {rates['jpeg']:6.1f} (x{row['speedup_per_core_jpeg']:.2f}, start-up "
              f"{first['startup_s']:.2f} s, epoch {statistics.median(first['epoch_s']):.2f} s) | vilscale half raw "
              f"{rates['half_raw']:6.1f} (x{row['speedup_per_core_half_raw']:.2f})", flush=True)
        result["rows"].append(row)
    # A second loader in the same process (e.g. validation, or a loader rebuilt after an elastic restart)
    # reuses the compiled pipeline: its start-up is the cost of opening shards, not of compiling.
    started = time.perf_counter()
    second = ShardedLoader(shards / "manifest.json", rank=0, world_size=1, batch_size=BATCH, seed=1, train=False,
                           config=DataConfig(img_size=SIZE, num_workers=args.workers[0], verify_checksums=False))
    next(iter(second))
    result["second_loader_startup_s"] = round(time.perf_counter() - started, 3)
    result["load_average_at_end"] = os.getloadavg()
    print(f"second loader in the same process: first batch after {result['second_loader_startup_s']:.3f} s")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="JPEG files to read per epoch (default: 1024)")
    parser.add_argument("--shards", type=int, default=8, help="FFCV shards they are written to (default: 8)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the first (default: 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--quick", action="store_true", help="256 images, 1 worker")
    parser.add_argument("--workdir", default=None, help="keep the JPEGs and shards here (default: a temp folder)")
    parser.add_argument("--out", default=None, help="JSON result path (default: benchmarks/results/data-<host>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.workers, args.shards = 256, [1], 4
    result = run(args)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"data-{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
