"""Data pipeline throughput: the vilscale loader against FFCV's own `Loader` and a torch DataLoader with Pillow.

    python benchmarks/data.py --workers 1  # 1024 JPEGs -> benchmarks/results/data-<host>.json
    python benchmarks/data.py --quick --out /tmp/data.json

Every pipeline does the same work on the same photographs (crops of scikit-learn's two sample photos, at
ImageNet-like sizes 256-640 px, saved as JPEG): decode, RandomResizedCrop to 224 (scale 0.08-1, ratio
3/4-4/3), random horizontal flip, uint8 batches of 64.

- ``vilscale``: `ShardedLoader` on FFCV shards with every image stored as JPEG (quality 90, original size):
  training decodes only the rows and columns each crop needs, scaled in the DCT domain when the crop is at
  least twice the output (`vilscale.data.cropdecode`).
- ``vilscale_full_decode``: the same loader with ``data.crop_decode=False`` (whole-image decode, OpenCV
  resize: what vilscale did before, and what FFCV's decoder does).
- ``vilscale_half_raw``: the default loader on shards with half of the images stored raw (FFCV's
  ``compress_probability=0.5``, as FFCV's ImageNet recipes write them).
- ``ffcv_loader``: FFCV's own `Loader` with `RandomResizedCropRGBImageDecoder`, `RandomHorizontalFlip`,
  `ToTensor`, `ToTorchImage` (its ImageNet example, less the GPU stages), reading the same JPEG shards, one
  `Loader` per shard (an FFCV `Loader` reads one file), each built once and reused every epoch.
- ``torch_pillow``: the JPEG files through `Image.open`, `convert("RGB")`, `resize(box=...)` (what
  torchvision's RandomResizedCrop does) in DataLoader worker processes.

"Workers" is decode threads for vilscale and FFCV, processes for the DataLoader.

Per core means per CPU-second: images divided by the CPU time (user + system) the pipeline used during an
epoch, its main process and (DataLoader) worker processes together. On a shared machine this is far
steadier than wall-clock rates, which are reported too. The pipelines take turns epoch by epoch (round
robin), so a change in the machine's load hits all of them alike; each ratio is the median over rounds of
the ratio within a round.

Start-up is the time from constructing a loader to its first batch (vilscale and FFCV: numba compilation, paid
once per process by vilscale and once per `Loader`, so per shard, by FFCV; DataLoader: starting its worker
processes).
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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from provenance import commit  # noqa: E402

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


class FFCVLoaders:
    """FFCV's own loader over several shards: one `ffcv.loader.Loader` per .beton, read one after the other."""

    def __init__(self, shard_paths: list[Path], workers: int):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

        threads = torch.get_num_threads()
        self.loaders = [
            Loader(str(path), batch_size=BATCH, num_workers=workers, order=OrderOption.RANDOM, os_cache=True,
                   drop_last=True, seed=0,
                   pipelines={"image": [RandomResizedCropRGBImageDecoder((SIZE, SIZE)), RandomHorizontalFlip(),
                                        ToTensor(), ToTorchImage()],
                              "label": [IntDecoder(), ToTensor()]})
            for path in shard_paths]
        torch.set_num_threads(threads)  # FFCV's Loader sets torch's thread count as a side effect

    def __iter__(self):
        for loader in self.loaders:
            yield from loader


def _cpu_seconds(loader) -> float:
    """CPU time (user + system) used so far by this process and, for a DataLoader, its worker processes."""
    import psutil

    processes = [psutil.Process()]
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    processes += [psutil.Process(w.pid) for w in workers]
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def _start(make_iterable):
    """Construct, read the first epoch; returns (loader, seconds from construction to the first batch)."""
    started = time.perf_counter()
    loader = make_iterable()
    iterator = iter(loader)
    first = next(iterator)
    startup = time.perf_counter() - started
    count = len(first[0])
    for batch in iterator:
        count += len(batch[0])
    return loader, startup, count


def _epoch(loader, epoch: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, images) of one epoch."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if hasattr(getattr(loader, "dataset", None), "epoch"):
        loader.dataset.epoch = epoch
    t0, c0 = time.perf_counter(), _cpu_seconds(loader)
    images = 0
    for batch in loader:
        images += len(batch[0])
    return time.perf_counter() - t0, _cpu_seconds(loader) - c0, images


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
    jpeg_shards = sorted(shard_sets["jpeg"].glob("shard-*.beton"))
    sizes = [os.stat(r[1]).st_size for r in plan.refs]
    result = {
        "benchmark": "data", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit(), "host": platform.node(), "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "images": len(plan.refs), "mean_jpeg_bytes": int(np.mean(sizes)), "shards": args.shards,
        "batch": BATCH, "crop": SIZE, "rounds": args.epochs, "rows": [],
    }
    crop_only = AugmentConfig()
    kept = []
    for workers in args.workers:
        config = DataConfig(img_size=SIZE, num_workers=workers, verify_checksums=False)

        def vilscale(path, config=config):
            return lambda: ShardedLoader(path / "manifest.json", rank=0, world_size=1, batch_size=BATCH, seed=0,
                                         train=True, config=config, augment=crop_only)

        dataset = PillowRandomResizedCrop([r[1] for r in plan.refs], plan.labels, seed=0)
        makers = {
            "vilscale": vilscale(shard_sets["jpeg"]),
            "vilscale_full_decode": vilscale(shard_sets["jpeg"], replace(config, crop_decode=False)),
            "vilscale_half_raw": vilscale(shard_sets["half_raw"]),
            "ffcv_loader": lambda workers=workers: FFCVLoaders(jpeg_shards, workers),
            "torch_pillow": lambda workers=workers, dataset=dataset: torch.utils.data.DataLoader(
                dataset, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
                persistent_workers=True, generator=torch.Generator().manual_seed(0),
                multiprocessing_context="spawn"),  # forking after numba has started threads is unsafe
        }
        loaders, row = {}, {"workers": workers}
        for name, make in makers.items():
            loaders[name], startup, images = _start(make)
            row[name] = {"startup_s": round(startup, 2), "images_per_epoch": images, "epoch_s": [], "cpu_s": []}
        loads = []
        for epoch in range(1, args.epochs + 1):
            for name, loader in loaders.items():
                wall, cpu, images = _epoch(loader, epoch)
                assert images == row[name]["images_per_epoch"], (name, images)
                row[name]["epoch_s"].append(round(wall, 3))
                row[name]["cpu_s"].append(round(cpu, 3))
            loads.append(round(os.getloadavg()[0], 2))
        row["load_average_1min_per_round"] = loads
        for entry in row.values():
            if isinstance(entry, dict):
                n = entry["images_per_epoch"]
                entry["images_per_s"] = round(n / statistics.median(entry["epoch_s"]), 1)
                entry["images_per_cpu_s"] = round(n / statistics.median(entry["cpu_s"]), 1)

        def ratio(a: str, b: str, key: str, row=row) -> float:
            """Median over rounds of (a's rate / b's rate) within the round."""
            per_round = [(row[a]["images_per_epoch"] / ta) / (row[b]["images_per_epoch"] / tb)
                         for ta, tb in zip(row[a][key], row[b][key])]
            return round(statistics.median(per_round), 2)

        row["ratios_per_cpu_s"] = {f"vilscale/{b}": ratio("vilscale", b, "cpu_s")
                                   for b in ("torch_pillow", "ffcv_loader", "vilscale_full_decode")}
        row["ratios_per_cpu_s"]["vilscale_half_raw/torch_pillow"] = ratio("vilscale_half_raw", "torch_pillow",
                                                                          "cpu_s")
        row["ratios_wall"] = {f"vilscale/{b}": ratio("vilscale", b, "epoch_s")
                              for b in ("torch_pillow", "ffcv_loader", "vilscale_full_decode")}
        cpu_rates = " | ".join(f"{name} {row[name]['images_per_cpu_s']:.0f}" for name in makers)
        print(f"workers={workers}: images per CPU-second: {cpu_rates}", flush=True)
        print(f"workers={workers}: ratios per CPU-second {row['ratios_per_cpu_s']}, wall {row['ratios_wall']} "
              f"(load average per round {loads})", flush=True)
        result["rows"].append(row)
        kept.append(loaders)  # freeing FFCV's Loaders makes numba print ignored KeyErrors from its finalizers
    # A second loader in the same process (e.g. validation, or a loader rebuilt after an elastic restart)
    # reuses the compiled pipeline: its start-up is the cost of opening shards, not of compiling.
    started = time.perf_counter()
    second = ShardedLoader(shard_sets["jpeg"] / "manifest.json", rank=0, world_size=1, batch_size=BATCH, seed=1,
                           train=False,
                           config=DataConfig(img_size=SIZE, num_workers=args.workers[0], verify_checksums=False))
    next(iter(second))
    result["second_loader_startup_s"] = round(time.perf_counter() - started, 3)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"second loader in the same process: first batch after {result['second_loader_startup_s']:.3f} s")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="JPEG files to read per epoch (default: 1024)")
    parser.add_argument("--shards", type=int, default=8, help="FFCV shards they are written to (default: 8)")
    parser.add_argument("--epochs", type=int, default=6, help="timed rounds after the first epoch (default: 6)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--quick", action="store_true", help="256 images, 1 worker, 3 rounds")
    parser.add_argument("--workdir", default=None, help="keep the JPEGs and shards here (default: a temp folder)")
    parser.add_argument("--out", default=None, help="JSON result path (default: benchmarks/results/data-<host>.json)")
    parser.add_argument("--note", default="", help="what else the result JSON should say (e.g. the machine was shared)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.workers, args.shards, args.epochs = 256, [1], 4, 3
    result = run(args)
    if args.note:
        result["note"] = args.note
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"data-{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
