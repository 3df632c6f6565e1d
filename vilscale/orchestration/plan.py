"""What a job will do and what it will cost, before anything is spent (`vilscale plan`).

The plan is arithmetic on the resolved spec, the data's sizes and a throughput, done with the very
functions the trainer uses (``JobSpec.grad_accum``, ``peak_lr``, ``LrSchedule``, the task's batches per
epoch, the shard assignment), so the numbers it prints are the ones the run will have. Wall time and
device-hours need a training throughput in images per second per rank, which comes from one of:

- ``--img-per-s``: a figure the user measured (say on the target cluster with a short run);
- ``--throughput FILE``: a ``benchmarks/train.py`` result (or a ``gpu_check`` result holding one); for
  another model or resolution the figure is scaled by forward FLOPs, which assumes the same MFU, and the
  plan says so;
- ``--measure``: a few timed training steps of the job's model on this machine (synthetic images, a plain
  PyTorch step: no data loading, no gradient all-reduce, so an upper bound for the same device).

Without one the plan says that the time is not known rather than guessing it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from vilscale.orchestration.config import JobSpec, SpecError

# An evaluation image costs a forward pass: about a third of a training image's forward + backward.
EVAL_COST_OF_A_TRAINING_IMAGE = 1 / 3
# The sharded loader's decode rate per CPU core (benchmarks/data.py, benchmarks/results/data-cpu-2core.json:
# ImageNet-like JPEGs of ~51 KB cropped to 224, crop decoding): how many cores a node's loaders need.
LOADER_IMAGES_PER_CPU_S = 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class Throughput:
    img_per_s: float
    """Training images per second per rank."""
    source: str
    """Where the figure comes from, and what it assumes."""
    device: str = ""
    """The device it was measured on, when known (its peak FLOP/s gives the implied MFU)."""


def plan_job(spec: JobSpec, world_size: int, *, train_samples: int | None = None, val_samples: int | None = None,
             throughput: Throughput | None = None, peak_flops: float = 0.0, flops: bool = True) -> dict:
    """The plan as a flat dict of plain values (None where a number cannot be known here); see `plan_lines`."""
    from vilscale.data.manifest import DataError
    from vilscale.orchestration.training.optim import LrSchedule, peak_lr
    from vilscale.tasks import make_task

    spec.check_world(world_size)
    task = make_task(spec)
    accum = spec.grad_accum(world_size)
    global_batch = spec.global_batch(world_size)
    plan = {
        "task": spec.task, "model": spec.model.name, "img_size": spec.model.img_size,
        "world_size": world_size, "nodes": spec.launcher.nodes if world_size == spec.launcher.world_size else None,
        "ranks_per_node": spec.launcher.ranks_per_node if world_size == spec.launcher.world_size else world_size,
        "micro_batch": spec.train.micro_batch, "grad_accum": accum, "global_batch": global_batch,
        "lr": spec.optim.lr, "lr_batch_ref": spec.optim.lr_batch_ref, "peak_lr": peak_lr(spec, world_size),
    }
    sizes = {"train_samples": None, "val_samples": None, "shard_sizes": None}
    data_note = ""
    try:
        sizes.update(task.data_sizes())
    except (OSError, DataError, ValueError) as error:
        data_note = f"the data could not be read here ({error})"
    if train_samples is not None:
        sizes.update(train_samples=train_samples, shard_sizes=None)
    if val_samples is not None:
        sizes["val_samples"] = val_samples
    plan.update(train_samples=sizes["train_samples"], val_samples=sizes["val_samples"], data_note=data_note)

    steps_per_epoch = None
    if sizes["train_samples"] is not None:
        try:
            steps_per_epoch = task.micro_batches_per_epoch(sizes["train_samples"], world_size) // accum
        except ValueError as error:
            raise SpecError(f"{sizes['train_samples']} training samples on {world_size} rank(s): {error}") from None
        if steps_per_epoch < 1:
            raise SpecError(f"{sizes['train_samples']} training samples cannot fill one step of {global_batch} "
                            f"samples on {world_size} rank(s); lower train.micro_batch or use fewer ranks")
    total = spec.train.max_steps or (spec.train.epochs * steps_per_epoch if steps_per_epoch else None)
    plan.update(steps_per_epoch=steps_per_epoch, total_steps=total,
                samples_per_epoch=steps_per_epoch * global_batch if steps_per_epoch else None,
                samples_trained=total * global_batch if total else None,
                epochs=total / steps_per_epoch if total and steps_per_epoch else None)
    if total and steps_per_epoch:
        schedule = LrSchedule.for_run(spec, world_size=world_size, steps_per_epoch=steps_per_epoch,
                                      total_steps=total)
        switches = spec.model.shift_mode == "random" and spec.schedule.full_attention_from < 1
        plan.update(warmup_steps=schedule.warmup_steps, lr_drop_steps=list(schedule.step_at or ()),
                    full_attention_step=round(spec.schedule.full_attention_from * total) if switches else None,
                    eval_every_steps=spec.eval.every_epochs * steps_per_epoch,
                    evaluations=_evaluations(total, spec.eval.every_epochs * steps_per_epoch)
                    if sizes["val_samples"] else 0)
    else:
        plan.update(warmup_steps=None, lr_drop_steps=None, full_attention_step=None, eval_every_steps=None,
                    evaluations=None)
    plan.update(ckpt_every=spec.train.ckpt_every, checkpoints=-(-total // spec.train.ckpt_every) if total else None)
    plan.update(_shards_per_rank(sizes["shard_sizes"], world_size))

    params, flops_by_mode = (_model_size(spec, task) if flops else (None, {}))
    plan.update(parameters=params, train_flops_per_image=_mean_flops(flops_by_mode, plan), flops_by_mode=flops_by_mode)
    plan.update(_costs(plan, throughput, peak_flops))
    return plan


def _evaluations(total: int, every: int) -> int:
    """Evaluations of a run: one every ``every`` steps and one at the end (not twice at the last step)."""
    return total // every + (1 if total % every else 0)


def _shards_per_rank(shard_sizes, world_size: int) -> dict:
    if not shard_sizes:
        return {"shards": None, "shards_per_rank": None, "samples_per_rank": None}
    from vilscale.data.sharding import assign_pieces

    pieces = [assign_pieces(shard_sizes, world_size, rank) for rank in range(world_size)]
    shards = [len({piece.shard for piece in mine}) for mine in pieces]
    samples = [sum(len(piece) for piece in mine) for mine in pieces]
    return {"shards": len(shard_sizes), "shards_per_rank": [min(shards), max(shards)],
            "samples_per_rank": [min(samples), max(samples)]}


def _model_size(spec: JobSpec, task) -> tuple[int, dict[str, float]]:
    """(parameters, {shift mode: training FLOPs per image}) of the job's model, built on this machine's CPU."""
    import torch

    torch.manual_seed(0)
    model = task.create_model()
    parameters = sum(p.numel() for p in model.parameters())
    return parameters, task.flops_per_image(model)


def _mean_flops(by_mode: dict[str, float], plan: dict) -> float | None:
    """Training FLOPs per image over the whole run: the shift mode's until the switch step, full after it."""
    if not by_mode:
        return None
    modes = list(by_mode)
    if len(modes) == 1 or not plan["full_attention_step"] or not plan["total_steps"]:
        return by_mode[modes[0]]
    share = plan["full_attention_step"] / plan["total_steps"]
    return share * by_mode[modes[0]] + (1 - share) * by_mode["full"]


def _costs(plan: dict, throughput: Throughput | None, peak_flops: float) -> dict:
    out = {"img_per_s_per_rank": None, "throughput_source": "", "step_s": None, "train_hours": None,
           "eval_hours": None, "wall_hours": None, "device_hours": None, "checkpoint_interval_min": None,
           "implied_mfu": None, "loader_cores_per_node": None}
    if throughput is None:
        return out
    rate = throughput.img_per_s * plan["world_size"]  # images per second of the whole job
    out.update(img_per_s_per_rank=throughput.img_per_s, throughput_source=throughput.source,
               step_s=plan["global_batch"] / rate,
               checkpoint_interval_min=plan["ckpt_every"] * plan["global_batch"] / rate / 60,
               loader_cores_per_node=math.ceil(throughput.img_per_s * plan["ranks_per_node"] / LOADER_IMAGES_PER_CPU_S))
    if plan["train_flops_per_image"] and peak_flops:
        out["implied_mfu"] = throughput.img_per_s * plan["train_flops_per_image"] / peak_flops
    if not plan["samples_trained"]:
        return out
    train_s = plan["samples_trained"] / rate
    eval_s = (plan["evaluations"] or 0) * (plan["val_samples"] or 0) * EVAL_COST_OF_A_TRAINING_IMAGE / rate
    out.update(train_hours=train_s / 3600, eval_hours=eval_s / 3600, wall_hours=(train_s + eval_s) / 3600,
               device_hours=(train_s + eval_s) / 3600 * plan["world_size"])
    return out


# ------------------------------------------------------------------------------------------- throughput


def throughput_from_file(path: str | Path, spec: JobSpec) -> Throughput:
    """The training throughput of a ``benchmarks/train.py`` result (or a gpu_check result holding one) for
    ``spec``: the row of the job's attention backend (``auto``: the fastest row, which ``auto`` picks on a GPU
    where the kernels pass their self-check), scaled by forward FLOPs when the benchmark's model or resolution
    differs from the job's."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SpecError(f"--throughput {path}: cannot read it as JSON ({error}); give a benchmarks/train.py result "
                        "such as benchmarks/results/gpu_check-h200-06abbf4.json") from None
    result = result.get("train", result) if isinstance(result, dict) else result
    if not isinstance(result, dict) or not result.get("results") or "config" not in result:
        raise SpecError(f"--throughput {path} holds no training throughput (no 'results' of benchmarks/train.py); "
                        "give a file written by `python benchmarks/train.py --json FILE`")
    config, rows = result["config"], result["results"]
    wanted = spec.model.attn_backend
    matching = [row for row in rows if row.get("backend") == wanted] if wanted != "auto" else rows
    if not matching:
        raise SpecError(f"--throughput {path} has no row for model.attn_backend={wanted!r} (it has "
                        f"{[row.get('backend') for row in rows]}); measure that backend or set model.attn_backend")
    row = max(matching, key=lambda r: r["images_per_second"])
    if config.get("precision") != spec.train.precision:
        raise SpecError(f"--throughput {path} was measured in {config.get('precision')} and the job trains in "
                        f"{spec.train.precision}; measure in the job's precision")
    device = result.get("device", "")
    measured = (f"{row['images_per_second']:.0f} img/s of {config['model']} at {config['img_size']} on one "
                f"{device or 'device'} ({config['precision']}, {row['backend']} attention, micro-batch "
                f"{config.get('batch')}, synthetic images; {path.name})")
    rate = float(row["images_per_second"])
    if (config["model"], int(config["img_size"])) != (spec.model.name, spec.model.img_size):
        ours = _forward_gmacs(spec)
        theirs = float(row["gflops_per_image_fwd"])
        rate *= theirs / ours
        measured += (f", scaled by forward FLOPs {theirs:.2f} G / {ours:.2f} G to {spec.model.name} at "
                     f"{spec.model.img_size}: assumes the same MFU")
    if config.get("batch") and int(config["batch"]) != spec.train.micro_batch:
        measured += (f"; the job's micro-batch is {spec.train.micro_batch}, and smaller micro-batches reach a lower "
                     "MFU")
    return Throughput(img_per_s=rate, source=measured, device=device)


def _forward_gmacs(spec: JobSpec) -> float:
    """Multiply-adds (G) of one evaluation forward of the job's classifier: the benchmarks' convention."""
    import torch

    from vilscale.model import create_model
    from vilscale.model.flops import count_flops

    cfg = spec.model
    with torch.device("cpu"):
        model = create_model(cfg.name, pos_embed=cfg.pos_embed, window_mode=cfg.window_mode, window=cfg.window,
                             img_size=cfg.img_size, num_classes=cfg.num_classes)
    return count_flops(model) / 1e9


def measure_throughput(spec: JobSpec, *, steps: int = 5, warmup: int = 2, log=None) -> Throughput:
    """Time ``steps`` training steps (forward, backward, AdamW) of the job's classifier at its micro-batch on
    this machine's device, in the job's precision, on synthetic images."""
    import torch

    from vilscale.devices import resolve_device
    from vilscale.orchestration.training.engine import COMPUTE_DTYPES, settle_attention_backend
    from vilscale.tasks import make_task

    if spec.task != "classification":
        raise SpecError(f"--measure times the classification step only (task={spec.task!r}: images differ in "
                        "size); give --img-per-s from a short run of the job instead")
    try:
        device = resolve_device(spec.train.device)
    except ValueError as error:
        raise SpecError(f"train.device={spec.train.device!r}: {error}") from None
    torch.manual_seed(spec.train.seed)
    model = make_task(spec).create_model()
    backend = settle_attention_backend(model, spec, device, log=log)
    if spec.train.activation_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, size = spec.train.micro_batch, spec.model.img_size
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, spec.model.num_classes, (batch,), device=device)
    dtype = COMPUTE_DTYPES[spec.train.precision]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return Throughput(img_per_s=steps * batch / elapsed, device=name if device.type == "cuda" else "",
                      source=f"measured here: {steps} steps of micro-batch {batch} on {name} ({spec.train.precision}, "
                             f"{backend} attention), synthetic images, a plain PyTorch step without data loading or "
                             "gradient all-reduce (an upper bound for this device)")


def peak_flops_of(device: str, precision: str, configured: float = 0.0) -> float:
    """Peak FLOP/s of one device named ``device`` (the metrics table), the spec's value first; 0 when unknown."""
    from vilscale.orchestration.training.metrics import PEAK_FLOPS

    if configured:
        return configured
    for key, table in PEAK_FLOPS.items():
        if key.lower() in device.lower():
            return table[precision]
    return 0.0


# ------------------------------------------------------------------------------------------- printing


def plan_lines(plan: dict) -> list[str]:
    """The plan in words, one figure per line."""
    def n(value, unit=""):
        return "unknown" if value is None else f"{value:,}{unit}"

    lines = [f"{plan['task']}: {plan['model']} at {plan['img_size']}"]
    layout = f"{plan['world_size']} rank(s)"
    if plan["nodes"]:
        layout += f" = {plan['nodes']} node(s) x {plan['ranks_per_node']}"
    lines += [
        f"world size:          {layout}",
        f"batch:               micro-batch {plan['micro_batch']} x grad_accum {plan['grad_accum']} x "
        f"{plan['world_size']} rank(s) = global batch {plan['global_batch']:,}",
    ]
    if plan["lr_batch_ref"]:
        lines.append(f"peak learning rate:  {plan['peak_lr']:.4g} = optim.lr {plan['lr']:g} x global batch "
                     f"{plan['global_batch']:,} / optim.lr_batch_ref {plan['lr_batch_ref']:,} (linear scaling)")
    else:
        lines.append(f"peak learning rate:  {plan['peak_lr']:.4g} (optim.lr; lr_batch_ref=0: not scaled)")
    if plan["data_note"]:
        lines.append(f"data:                {plan['data_note']}; give --train-samples N (and --val-samples N)")
    lines += [
        f"training samples:    {n(plan['train_samples'])}; validation samples: {n(plan['val_samples'])}",
        f"steps:               {n(plan['steps_per_epoch'])} per epoch, {n(plan['total_steps'])} in total"
        + (f" ({plan['epochs']:.4g} epochs, {plan['samples_trained']:,} samples)" if plan["epochs"] else ""),
        f"warmup:              {n(plan['warmup_steps'])} steps",
    ]
    if plan["lr_drop_steps"]:
        lines.append(f"learning-rate drops: at steps {', '.join(f'{s:,}' for s in plan['lr_drop_steps'])}")
    if plan["full_attention_step"] is not None:
        lines.append(f"attention switch:    random shifts until step {plan['full_attention_step']:,}, full after")
    if plan["evaluations"] is not None:
        lines.append(f"evaluation:          every {plan['eval_every_steps']:,} steps, {plan['evaluations']} in all"
                     if plan["evaluations"] else "evaluation:          none (no validation data)")
    lines.append(f"checkpoints:         every {plan['ckpt_every']:,} steps, {n(plan['checkpoints'])} in all")
    if plan["shards"]:
        lines.append(f"shards:              {plan['shards']} in all; per rank {_span(plan['shards_per_rank'])} "
                     f"shard(s), {_span(plan['samples_per_rank'], ',')} samples")
    if plan["parameters"] is not None:
        lines.append(f"parameters:          {plan['parameters'] / 1e6:.2f} M")
    if plan["train_flops_per_image"]:
        modes = plan["flops_by_mode"]
        if len(modes) > 1 and plan["full_attention_step"] is not None:
            how = ", averaged over the attention switch"
        elif len(modes) > 1:
            first = next(iter(modes))
            how = f", {first} attention; {_si(modes['full'])} in full attention"
        else:
            how = ""
        lines.append(f"training FLOPs:      {_si(plan['train_flops_per_image'])} per image (forward + "
                     f"backward = 3 x 2 x multiply-adds{how})")
    if plan["img_per_s_per_rank"] is None:
        lines.append("time:                not known: give --img-per-s N (per rank), --throughput FILE "
                     "(benchmarks/results) or --measure")
        return lines
    lines.append(f"throughput:          {plan['img_per_s_per_rank']:,.1f} img/s per rank, "
                 f"{plan['img_per_s_per_rank'] * plan['world_size']:,.0f} img/s in all: {plan['throughput_source']}")
    if plan["implied_mfu"] is not None:
        lines.append(f"implied MFU:         {100 * plan['implied_mfu']:.1f}% of the device's peak")
    lines.append(f"step time:           {plan['step_s']:.3g} s; a checkpoint every "
                 f"{_duration(plan['checkpoint_interval_min'] / 60)}")
    if plan["wall_hours"] is not None:
        lines += [
            f"wall time:           {_duration(plan['wall_hours'])} ({_duration(plan['train_hours'])} training, "
            f"{_duration(plan['eval_hours'])} evaluation)",
            f"device-hours:        {plan['device_hours']:,.1f} ({plan['world_size']} rank(s) x "
            f"{plan['wall_hours']:,.2f} h)",
        ]
    else:
        lines.append("wall time:           unknown until the number of steps is (give --train-samples N)")
    lines.append(f"data loading:        {plan['img_per_s_per_rank'] * plan['ranks_per_node']:,.0f} decoded images/s "
                 f"per node to keep up: about {plan['loader_cores_per_node']} CPU cores per node at the loader's "
                 f"measured {LOADER_IMAGES_PER_CPU_S:,} images per CPU-second (benchmarks/data.py)")
    return lines


def _si(flops: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops >= scale:
            return f"{flops / scale:.3g} {prefix}"
    return f"{flops:.3g} "


def _span(pair, sep=""):
    low, high = pair
    return f"{low:{sep}}" if low == high else f"{low:{sep}}-{high:{sep}}"


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{math.ceil(hours * 60)} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"
