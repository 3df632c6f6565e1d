"""Every job in jobs/ at its own shapes and precision for a few training steps and one evaluation forward, on the
device given: the GPU half of "every shipped job runs as shipped" (tests/test_shipped_jobs.py is the CPU half,
through `vilscale train` with real tiny data).

The device image has no DeepSpeed, FFCV, kornia or pycocotools, so this runs each job's own model (the task's
``create_model``, its heads, its precision scheme: DeepSpeed-style bf16 weights for classification, fp32 weights and
bf16 autocast islands for detection and segmentation), the job's optimizer (AdamW or QHM with its weight-decay
groups) and its micro-batch, on synthetic batches in the task's format at the job's image size (classification:
``model.img_size`` squares; detection: images of ``data.max_size`` x ``data.min_size`` with boxes and masks;
segmentation: ``data.crop_size`` crops with label maps), plain PyTorch. The evaluation forward keeps every detection
(score threshold 0), so NMS runs on real candidates. One JSON row per job: ok or the error, seconds per step, peak
memory, what was run.

    python benchmarks/jobs.py --device cuda --json $OUT/jobs.json       # on the GPU (gpu_check.sh's jobs step)
    python benchmarks/jobs.py --device cpu --dry-run --json /tmp/j.json  # here: batch 1, 224 px, fp32, 1 step
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DRY_SIDE = 224  # the dry run's images: the smallest side at which ViL-Small's stage 4 holds a 7x7 window


def synthetic_batch(spec, device: torch.device, batch: int, generator: torch.Generator):
    """A batch in the task's format (what its loader yields), at the spec's image size."""
    task, data = spec.task, spec.data
    if task == "classification":
        side = spec.model.img_size
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, spec.model.num_classes, (batch,), generator=generator)
        return images.to(device), labels.to(device)
    if task == "detection":
        height, width = max(data.min_size), data.max_size
        images, targets = [], []
        for _ in range(batch):
            images.append(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator))
            corners = torch.rand(8, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
            sides = 16 + torch.rand(8, 2, generator=generator) * torch.tensor([width * 0.3, height * 0.3])
            boxes = torch.cat([corners, corners + sides], dim=1)
            masks = torch.zeros(8, height, width, dtype=torch.uint8)
            for index, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
                masks[index, y0:y1, x0:x1] = 1
            labels = torch.randint(1, spec.model.num_classes + 1, (8,), generator=generator)
            targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
        return images, targets
    side = data.crop_size
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, spec.model.num_classes, (batch, side, side), generator=generator)
    return images.to(device), masks.to(device)


def losses(model, spec, batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The task's named losses of one batch, as its ``losses`` computes them (classification without the kornia
    augmentation the device image lacks: soft-target cross-entropy of one-hot labels)."""
    from vilscale.data.augment import normalize, soft_target_cross_entropy
    from vilscale.tasks.precision import COMPUTE_DTYPES

    if spec.task == "classification":
        images, labels = batch
        inputs = normalize(images, spec.data.mean, spec.data.std).to(COMPUTE_DTYPES[spec.train.precision])
        targets = torch.nn.functional.one_hot(labels, spec.model.num_classes).float()
        return {"loss": soft_target_cross_entropy(model(inputs), targets)}
    if spec.task == "detection":
        images, targets = batch
        return model([image.to(device, torch.float32) / 255 for image in images], targets)
    images, masks = batch
    return model(images.float() / 255, masks)


@torch.no_grad()
def evaluate_forward(model, spec, batch, device: torch.device) -> dict:
    """One evaluation forward on the batch's first image(s): what came out."""
    model.eval()
    try:
        if spec.task == "classification":
            from vilscale.data.augment import normalize
            from vilscale.tasks.precision import COMPUTE_DTYPES

            images, _ = batch
            logits = model(normalize(images[:1], spec.data.mean, spec.data.std)
                           .to(COMPUTE_DTYPES[spec.train.precision]))
            return {"logits": list(logits.shape), "finite": bool(torch.isfinite(logits).all())}
        if spec.task == "detection":
            images, _ = batch
            output = model([images[0].to(device, torch.float32) / 255])[0]
            return {"detections": len(output["boxes"]), "boxes_dtype": str(output["boxes"].dtype)}
        from vilscale.tasks.segmentation import class_maps

        images, masks = batch
        classes = class_maps(model, [images[0]], [tuple(masks.shape[-2:])])[0]
        return {"class_map": list(classes.shape)}
    finally:
        model.train()


def run_job(path: Path, device: torch.device, *, steps: int, dry_run: bool) -> dict:
    from vilscale.orchestration.config import load_spec
    from vilscale.orchestration.training.engine import settle_attention_backend
    from vilscale.orchestration.training.optim import build_optimizer
    from vilscale.tasks import make_task

    overrides = ["model.score_threshold=0"] if load_spec(path).task == "detection" else []
    if dry_run:  # the same code on the CPU: fp32, batch 1, the smallest legal images
        overrides += ["train.precision=fp32", "train.micro_batch=1", "model.init_weights="]
        spec = load_spec(path, overrides)
        if spec.task == "detection" and max(spec.data.min_size) > DRY_SIDE:
            overrides += [f"data.min_size=[{DRY_SIDE}]", f"data.max_size={DRY_SIDE}"]
        if spec.task == "segmentation" and spec.data.crop_size > DRY_SIDE:
            overrides += [f"data.crop_size={DRY_SIDE}"]
    else:
        overrides += ["model.init_weights="]  # the job's pretrained weights are not on the device: random ones
    spec = load_spec(path, overrides)
    row = {"job": path.stem, "task": spec.task, "model": spec.model.name, "precision": spec.train.precision,
           "micro_batch": spec.train.micro_batch, "optimizer": spec.optim.name, "overrides": overrides,
           "shape": _shape(spec)}
    started = time.perf_counter()
    try:
        task = make_task(spec)
        torch.manual_seed(0)
        model = task.create_model()
        row["attention_backend"] = settle_attention_backend(model, spec, device)
        model = task.place(model, device, spec.train.precision)
        if spec.train.activation_checkpointing:
            model.set_grad_checkpointing(True)
        optimizer = build_optimizer(model, spec)
        generator = torch.Generator().manual_seed(0)
        batch = synthetic_batch(spec, device, spec.train.micro_batch, generator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            step_started = time.perf_counter()
            named = losses(model, spec, batch, device)
            total = sum(named.values())
            total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - step_started)
            row.setdefault("losses", []).append({name: float(value.detach()) for name, value in named.items()})
        row["step_s"] = [round(t, 4) for t in times]
        row["eval"] = evaluate_forward(model, spec, batch, device)
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        finite = all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in row["losses"])
        row["ok"] = bool(finite) and row["eval"].get("finite", True)
        if not finite:
            row["error"] = "a loss was not finite"
    except Exception as error:  # noqa: BLE001 - one job's failure is a row of the report, not the end of the run
        row["ok"] = False
        row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
        row["traceback"] = traceback.format_exc()[-3000:]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def _shape(spec) -> str:
    if spec.task == "classification":
        return f"{spec.model.img_size}x{spec.model.img_size}"
    if spec.task == "detection":
        return f"{max(spec.data.min_size)}x{spec.data.max_size}"
    return f"{spec.data.crop_size}x{spec.data.crop_size}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", default=str(REPO / "jobs"), help="folder of job specs (every *.yaml)")
    parser.add_argument("--only", default="", help="comma-separated job names (default: every job)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="CPU: fp32, batch 1, 224-px images, as a check")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    paths = sorted(Path(args.jobs).glob("*.yaml"))
    if args.only:
        wanted = set(args.only.split(","))
        paths = [path for path in paths if path.stem in wanted]
    from provenance import commit

    report = {"kind": "jobs", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
              "torch": torch.__version__, "dry_run": args.dry_run, "jobs": []}
    for path in paths:
        row = run_job(path, device, steps=1 if args.dry_run else args.steps, dry_run=args.dry_run)
        report["jobs"].append(row)
        Path(args.json).write_text(json.dumps(report, indent=1))  # after every job: a time-out keeps the rows
        state = "ok" if row["ok"] else f"FAILED: {row['error']}"
        print(f"{row['job']}: {row['model']} {row['precision']} {row['shape']} x{row['micro_batch']}: "
              f"{row.get('step_s')} s/step, {row['seconds']} s in all: {state}", flush=True)
    return 0 if all(row["ok"] for row in report["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
