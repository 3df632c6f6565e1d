"""The training loop of one rank: `run_worker(spec)`.

Every launcher (local processes, Ray Train workers, SLURM tasks) calls `run_worker` once per rank.
It resumes from the run dir's own `checkpoints/latest` (the source of truth, whatever launched it),
and the checkpointer, the metrics and the evaluation each decide their own cadence.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vilscale.orchestration.checkpoint import Checkpointer, rng_state, set_rng_state
from vilscale.orchestration.engine import (
    RankContext,
    apply_activation_checkpointing,
    build_model,
    deepspeed_config,
    init_distributed,
    use_environment_ninja,
)
from vilscale.orchestration.evaluation import evaluate, validation_loader
from vilscale.orchestration.faults import maybe_die
from vilscale.orchestration.metrics import TrainingMetrics, device_peak_flops
from vilscale.orchestration.optim import build_optimizer, lr_at, peak_lr
from vilscale.orchestration.spec import JobSpec, SpecError, write_resolved


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the run restored its last good checkpoint and stopped."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Current epoch."""
    micro_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed."""
    bad_in_row: int = 0
    """Consecutive steps skipped for a non-finite loss."""
    nonfinite_total: int = 0
    """Steps skipped for a non-finite loss over the whole run."""
    last_eval: dict = field(default_factory=dict)
    """Latest evaluation result."""


def _log(ctx: RankContext, message: str) -> None:
    if ctx.rank == 0:
        print(f"[vilscale] {message}", file=sys.stderr, flush=True)


class ExponentialMovingAverage:
    """fp32 EMA of the model's parameters (ZeRO stages 0-2, where every rank holds full parameters)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, parameter in module.named_parameters():
            self.shadow[name].mul_(self.decay).add_(parameter.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def swap(self, module: torch.nn.Module) -> None:
        """Exchange the live weights and the EMA weights (call twice to restore)."""
        for name, parameter in module.named_parameters():
            live = parameter.detach().clone()
            parameter.copy_(self.shadow[name].to(parameter.dtype))
            self.shadow[name] = live.float()


def run_worker(spec: JobSpec, *, run_id: str | None = None, fault_hook=None) -> dict:
    """Train (or resume) the job on this rank; returns a summary on success.

    ``fault_hook(step, loss) -> loss`` lets the fault-injection tests replace a step's loss.
    """
    use_environment_ninja()
    owns_group = not dist.is_initialized()
    ctx = init_distributed(spec)
    try:
        return _train(spec, ctx, run_id=run_id, fault_hook=fault_hook)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(spec: JobSpec, ctx: RankContext, *, run_id: str | None, fault_hook) -> dict:
    import deepspeed

    from vilscale.data.augment import BatchAugment
    from vilscale.data.loader import ShardedLoader

    spec.check_world(ctx.world_size)
    if spec.optim.ema_decay and spec.train.zero_stage == 3:
        raise SpecError("optim.ema_decay needs full parameters on every rank; use train.zero_stage <= 2 with EMA")
    run_dir = Path(spec.run_dir)
    if ctx.rank == 0:
        write_resolved(spec, run_dir)
    run_id = run_id or _shared_run_id(run_dir, ctx)

    torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
    model = build_model(spec)
    if spec.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    flops_per_image = _training_flops_per_image(model, spec)
    model = model.to(ctx.device)
    if spec.train.compile:
        model = torch.compile(model)
    checkpointer = Checkpointer(run_dir, keep=spec.train.keep_checkpoints, spec_digest=spec.digest())
    manifest = checkpointer.find_resumable(log=lambda m: _log(ctx, m))
    ds_config = deepspeed_config(spec, ctx.world_size, ctx.device)
    universal_tag = None
    if manifest is not None and manifest["world_size"] != ctx.world_size:
        # ZeRO shards are per rank: another world size loads through DeepSpeed's universal format.
        _log(ctx, f"checkpoint {manifest['tag']} was written by {manifest['world_size']} ranks, this run has "
                  f"{ctx.world_size}: converting it to a universal checkpoint")
        universal_tag = checkpointer.convert_to_universal(manifest)
        ds_config["checkpoint"] = {"load_universal": True}
    optimizer = build_optimizer(model, spec)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    torch.manual_seed(spec.train.seed * 1000 + ctx.rank + 1)  # per-rank stream for drop path

    train_loader = ShardedLoader(spec.data.train_manifest, rank=ctx.rank, world_size=ctx.world_size,
                                 batch_size=spec.train.micro_batch, seed=spec.train.seed, train=True,
                                 config=spec.data, augment=spec.augment, device=ctx.device, return_indices=True)
    if train_loader.num_classes != spec.model.num_classes:
        raise SpecError(f"model.num_classes={spec.model.num_classes} but {spec.data.train_manifest} has "
                        f"{train_loader.num_classes} classes; set model.num_classes={train_loader.num_classes}")
    # Built once: each loader's decode pipeline compiles once per process, not per epoch.
    val_loader = validation_loader(spec, ctx) if spec.data.val_manifest else None
    augment = BatchAugment(spec.augment, num_classes=spec.model.num_classes, seed=spec.train.seed,
                           mean=spec.data.mean, std=spec.data.std, rank=ctx.rank)
    accum = spec.grad_accum(ctx.world_size)
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch < 1:
        raise SpecError(f"an epoch has {len(train_loader)} micro-batches per rank, fewer than grad_accum={accum}; "
                        "lower train.micro_batch or train.grad_accum")
    total_steps = spec.train.max_steps or spec.train.epochs * steps_per_epoch
    schedule = dict(peak=peak_lr(spec, ctx.world_size), total_steps=total_steps,
                    warmup_steps=round(spec.schedule.warmup_epochs * steps_per_epoch),
                    warmup_lr=spec.schedule.warmup_lr, min_lr=spec.schedule.min_lr)

    metrics = TrainingMetrics(run_dir, run_id=run_id, rank=ctx.rank, host=spec.metrics.host,
                              port=spec.metrics.port + ctx.rank if spec.metrics.port else 0,
                              serve=spec.metrics.enabled)
    metrics.publish_targets(run_id)
    ema = ExponentialMovingAverage(engine.module, spec.optim.ema_decay) if spec.optim.ema_decay else None
    state = TrainState()
    resumed_mid_epoch = False
    if manifest is not None:
        if manifest["spec_digest"] != spec.digest():
            _log(ctx, f"warning: checkpoint {manifest['tag']} was written by a different spec "
                      f"({manifest['spec_digest']} != {spec.digest()}); resuming anyway")
        client = checkpointer.load(engine, manifest, tag=universal_tag)
        state = TrainState(**client["train_state"])
        set_rng_state(client["rng"])
        if ema is not None and client.get("ema"):
            ema.shadow = client["ema"]
        if manifest["world_size"] == ctx.world_size:
            train_loader.load_state_dict(client["loader"])
            resumed_mid_epoch = True
        else:
            _log(ctx, f"world size changed ({manifest['world_size']} -> {ctx.world_size}): epoch {state.epoch} "
                      "restarts its data order from the beginning")
            state.micro_in_epoch = 0
        metrics.last_checkpoint.set(manifest["created"])
        _log(ctx, f"resumed from {manifest['tag']} (step {state.step}, epoch {state.epoch})")
    compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.train.precision]
    peak = device_peak_flops(ctx.device, spec.train.precision, spec.metrics.peak_flops)

    def save(reason: str) -> None:
        started = time.perf_counter()
        client = {"train_state": vars(state).copy(), "rng": rng_state(), "loader": train_loader.state_dict(),
                  "ema": ema.shadow if (ema is not None and ctx.rank == 0) else None}
        checkpointer.save(engine, step=state.step, client_state=client)
        metrics.checkpoint_duration.observe(time.perf_counter() - started)
        metrics.last_checkpoint.set(time.time())
        _log(ctx, f"checkpoint at step {state.step} ({reason})")

    progress = None
    try:
        progress = _progress_bar(ctx, total_steps, state.step)
        launch_start_step = state.step
        last_saved_step = state.step if manifest is not None else -1
        window = _MetricsWindow(metrics, ctx, flops_per_image=flops_per_image, peak_flops=peak)
        exit_early = False
        while state.step < total_steps and not exit_early:
            if not resumed_mid_epoch:
                train_loader.set_epoch(state.epoch)
                state.micro_in_epoch = 0
            resumed_mid_epoch = False
            batches = iter(train_loader)
            while state.micro_in_epoch + accum <= steps_per_epoch * accum and state.step < total_steps:
                step_start = time.perf_counter()
                lr = lr_at(state.step, **schedule)
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr
                batch = _forward_backward(engine, batches, augment, state, accum=accum, dtype=compute_dtype,
                                          ctx=ctx, run_dir=run_dir, fault_hook=fault_hook)
                if batch.skipped:
                    state.bad_in_row += 1
                    state.nonfinite_total += 1
                    metrics.nonfinite.inc()
                    _log(ctx, f"step {state.step}: non-finite loss, step skipped "
                              f"({state.bad_in_row} in a row, {state.nonfinite_total} in total)")
                    if state.bad_in_row >= spec.train.max_bad_steps:
                        _restore_last_good(checkpointer, engine, ctx)
                        raise NonFiniteLossError(
                            f"{state.bad_in_row} non-finite losses in a row at step {state.step}; restored the last "
                            f"good checkpoint and stopped. Lower optim.lr, enable optim.clip_grad, or check the data.")
                    if accum == 1:
                        state.step += 1
                        continue
                else:
                    state.bad_in_row = 0
                state.step += 1
                if spec.train.record_samples:
                    _record_samples(run_dir, ctx.rank, state.step, batch.indices)
                if ema is not None:
                    ema.update(engine.module)
                window.observe(batch, lr=lr, images=spec.train.micro_batch * accum,
                               seconds=time.perf_counter() - step_start)
                if progress is not None:
                    progress.update(1)
                if state.step % spec.train.log_every == 0 or state.step == total_steps:
                    record = window.flush(state, engine)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_second']:.0f}")
                if state.step % spec.train.ckpt_every == 0:
                    save("every ckpt_every steps")
                    last_saved_step = state.step
                if spec.train.exit_after_steps and state.step - launch_start_step >= spec.train.exit_after_steps:
                    exit_early = True
                    break
            epoch_done = state.micro_in_epoch + accum > steps_per_epoch * accum
            if epoch_done:
                state.epoch += 1
                if state.epoch % spec.eval.every_epochs == 0 or state.step >= total_steps:
                    state.last_eval = _evaluate(spec, engine, ema, ctx, metrics, state, val_loader)
        if last_saved_step != state.step:
            save("end of this launch" if exit_early else "end of training")
        if not exit_early and state.last_eval.get("step") != state.step and val_loader is not None:
            state.last_eval = _evaluate(spec, engine, ema, ctx, metrics, state, val_loader)
    finally:
        if progress is not None:
            progress.close()
        metrics.close()
    evaluation = {f"eval_{k}" if k == "step" else k: v for k, v in state.last_eval.items()}
    summary = {"step": state.step, "epoch": state.epoch, "total_steps": total_steps, "exited_early": exit_early,
               "nonfinite_steps": state.nonfinite_total, "run_id": run_id, **evaluation}
    if ctx.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _record_samples(run_dir: Path, rank: int, step: int, indices: list[torch.Tensor]) -> None:
    folder = run_dir / "samples"
    folder.mkdir(exist_ok=True)
    with open(folder / f"rank{rank}.jsonl", "a") as handle:
        handle.write(json.dumps({"step": step, "indices": torch.cat(indices).tolist()}) + "\n")


def _shared_run_id(run_dir: Path, ctx: RankContext) -> str:
    """One id for the whole run, kept across restarts (stored in the run dir)."""
    path = run_dir / "run_id"
    value = None
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            value = path.read_text().strip()
        else:
            value = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
            path.write_text(value + "\n")
    if dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def _finite_everywhere(loss: torch.Tensor, device: torch.device) -> bool:
    """Every rank must agree to skip, or ZeRO's collectives would deadlock."""
    flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    return flag.item() == 0.0


def _restore_last_good(checkpointer: Checkpointer, engine, ctx: RankContext) -> None:
    manifest = checkpointer.find_resumable(log=lambda m: _log(ctx, m))
    if manifest is None:
        _log(ctx, "no checkpoint to restore: the run had not saved one yet")
        return
    checkpointer.load(engine, manifest)
    _log(ctx, f"restored checkpoint {manifest['tag']}")


def _training_flops_per_image(model: torch.nn.Module, spec: JobSpec) -> float:
    """Forward + backward FLOPs of one image (3 x forward, 2 FLOPs per multiply-add)."""
    try:
        from vilscale.model.flops import count_flops
    except ImportError:
        return 0.0
    return 6.0 * count_flops(model, spec.model.img_size)


@dataclass
class _Accumulated:
    losses: list
    """Finite micro-batch losses of the step."""
    skipped: bool
    """Some micro-batch had a non-finite loss on some rank."""
    data_wait: float
    """Seconds spent waiting for batches."""
    indices: list
    """Dataset indices of every micro-batch."""


def _forward_backward(engine, batches, augment, state: TrainState, *, accum: int, dtype, ctx: RankContext,
                      run_dir: Path, fault_hook) -> _Accumulated:
    """The micro-batches of one optimizer step: augment, forward, loss, backward, engine step."""
    out = _Accumulated(losses=[], skipped=False, data_wait=0.0, indices=[])
    for micro in range(accum):
        wait_start = time.perf_counter()
        images, labels, indices = next(batches)
        out.data_wait += time.perf_counter() - wait_start
        out.indices.append(indices)
        state.micro_in_epoch += 1
        images, targets = augment(images, labels, step=state.step * accum + micro)
        logits = engine(images.to(dtype))  # DeepSpeed holds bf16/fp16 weights but does not cast inputs
        maybe_die("mid-step", step=state.step + 1, rank=ctx.rank, run_dir=run_dir)
        loss = torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        if fault_hook is not None:
            loss = fault_hook(state.step, loss)
        if not _finite_everywhere(loss, ctx.device):
            out.skipped = True
            if accum == 1:
                break
            engine.step()  # keeps DeepSpeed's accumulation counter aligned; no gradient added
            continue
        engine.backward(loss)
        engine.step()
        out.losses.append(loss.detach())
    return out


class _MetricsWindow:
    """Per-step Prometheus updates, and the averaged record written every log interval."""

    def __init__(self, metrics: TrainingMetrics, ctx: RankContext, *, flops_per_image: float, peak_flops: float):
        self.metrics, self.ctx = metrics, ctx
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.start, self.images, self.loss, self.lr, self.data_wait = time.perf_counter(), 0, float("nan"), 0.0, 0.0

    def observe(self, batch: _Accumulated, *, lr: float, images: int, seconds: float) -> None:
        m = self.metrics
        self.images += images
        self.lr, self.data_wait = lr, batch.data_wait
        m.samples.inc(images)
        m.steps.inc()
        m.step_duration.observe(seconds)
        m.data_wait.observe(batch.data_wait)
        m.learning_rate.set(lr)
        if batch.losses:
            self.loss = torch.stack(batch.losses).mean().item()
            m.loss.set(self.loss)

    def flush(self, state: TrainState, engine) -> dict:
        elapsed = time.perf_counter() - self.start
        throughput = self.images / elapsed if elapsed > 0 else 0.0  # this rank's images/s
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        mfu = self.flops_per_image * throughput / self.peak_flops if self.peak_flops else float("nan")
        device = self.ctx.device
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        m = self.metrics
        m.grad_norm.set(grad_norm)
        m.images_per_second.set(throughput)
        if self.peak_flops:
            m.mfu.set(mfu)
        if memory:
            m.device_memory.set(memory)
        record = {"step": state.step, "epoch": state.epoch, "loss": self.loss, "lr": self.lr, "grad_norm": grad_norm,
                  "images_per_second": throughput * self.ctx.world_size, "mfu": mfu, "data_wait_s": self.data_wait,
                  "device_memory_bytes": memory, "nonfinite_total": state.nonfinite_total}
        m.log(record)
        self.start, self.images = time.perf_counter(), 0
        return record


def _evaluate(spec, engine, ema, ctx, metrics, state, val_loader) -> dict:
    if val_loader is None:
        return {}
    if ema is not None and spec.eval.use_ema:
        ema.swap(engine.module)
    try:
        result = evaluate(engine.module, val_loader, spec, ctx)
    finally:
        if ema is not None and spec.eval.use_ema:
            ema.swap(engine.module)
    metrics.val_top1.set(result["val_top1"])
    result["step"] = state.step
    metrics.log({"epoch": state.epoch, **result})
    _log(ctx, f"epoch {state.epoch}: val top-1 {100 * result['val_top1']:.1f}%, "
              f"top-5 {100 * result['val_top5']:.1f}%")
    return result


def _progress_bar(ctx: RankContext, total: int, initial: int):
    """rank 0's progress bar, only on a terminal (logs stay clean elsewhere)."""
    if ctx.rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1)


__all__ = ["NonFiniteLossError", "TrainState", "run_worker"]
