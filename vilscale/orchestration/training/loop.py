"""The training of one rank: `run_worker(spec)`.

Every launcher (torchrun processes, Ray Train workers, SLURM tasks) calls `run_worker` once per rank.
`TrainingRun` builds everything once (engine, loaders, schedule, checkpoints, metrics, EMA, evaluation)
and resumes from the run dir's own ``checkpoints/latest`` (the source of truth, whatever launched it);
`TrainingRun.train` is the loop. The step runner, the non-finite policy, the metrics window, the
checkpoint cadence and the evaluator each decide their own cadence.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vilscale.orchestration.checkpoint import Checkpointer
from vilscale.orchestration.checkpoint.rank_state import rng_state, set_rng_state
from vilscale.orchestration.checkpoint.rundir import (
    LOCK_HELD_ENV,
    RunDirError,
    RunLock,
    read_or_create_run_id,
    write_spec,
)
from vilscale.orchestration.config import JobSpec, SpecError
from vilscale.orchestration.ranks import broadcast_object as _broadcast
from vilscale.orchestration.training.distributed import RankContext, init_distributed
from vilscale.orchestration.training.ema import ExponentialMovingAverage
from vilscale.orchestration.training.engine import (
    build_engine,
    build_model,
    settle_attention_backend,
    use_environment_ninja,
)
from vilscale.orchestration.training.evaluation import Evaluator
from vilscale.orchestration.training.metrics import MetricsWindow, TrainingMetrics, device_peak_flops
from vilscale.orchestration.training.optim import LrSchedule
from vilscale.orchestration.training.step import NonFiniteLossError, NonFinitePolicy, OutOfMemory, StepRunner


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed (skipped ones included: their data was consumed)."""
    epoch: int = 0
    """Current epoch."""
    micro_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (0: the epoch has not started)."""
    bad_in_row: int = 0
    """Consecutive steps skipped for a non-finite loss."""
    nonfinite_total: int = 0
    """Steps skipped for a non-finite loss over the whole run."""
    last_eval: dict = field(default_factory=dict)
    """Latest evaluation result."""
    shift_mode: str = ""
    """The ViL attention mode in effect ("" until the schedule switches it: the spec's ``model.shift_mode``)."""


def run_worker(spec: JobSpec, *, run_id: str | None = None, fault_hook=None, stop_requested=None) -> dict:
    """Train (or resume) the job on this rank; returns the run's summary.

    ``stop_requested() -> bool`` is asked after every step (a launcher's preemption notice, e.g. SLURM's
    USR2 before the time limit): when it is true on any rank, every rank saves a checkpoint at that step
    and the run stops early with ``"preempted": True`` in its summary. ``fault_hook(step, loss) -> loss``
    lets the fault-injection tests replace a step's loss.
    """
    use_environment_ninja()
    from vilscale.orchestration.training.distributed import nccl_environment

    nccl_environment(spec.run_dir)  # before any process group: error handling on, traces dumped into the run dir
    owns_group = not dist.is_initialized()
    ctx = init_distributed(spec.train.device, collective_timeout_s=spec.train.collective_timeout_s)
    lock = None
    try:
        lock = _take_run_lock(spec, ctx)
        try:
            run = TrainingRun(spec, ctx, run_id=run_id, fault_hook=fault_hook, stop_requested=stop_requested)
            try:
                return run.train()
            finally:
                run.close()
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(_out_of_memory_message(spec, ctx, error)) from None
        except RuntimeError as error:
            if "can't allocate memory" not in str(error) and "not enough memory" not in str(error):
                raise
            raise OutOfMemory(_out_of_memory_message(spec, ctx, error)) from None
    finally:
        if lock is not None:
            lock.release()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


class TrainingRun:
    """One rank's run, built once: model, engine, data, schedule, checkpoints, metrics, EMA, evaluation."""

    def __init__(self, spec: JobSpec, ctx: RankContext, *, run_id: str | None = None, fault_hook=None,
                 stop_requested=None):
        from vilscale.tasks import make_task

        spec.check_world(ctx.world_size)
        if spec.optim.ema_decay and spec.train.zero_stage == 3:
            raise SpecError("optim.ema_decay needs full parameters on every rank; use train.zero_stage <= 2 with EMA")
        self.spec, self.ctx, self.run_dir = spec, ctx, Path(spec.run_dir)
        self.stop_requested, self.preempted = stop_requested, False
        _settle_spec(spec, ctx)
        self.run_id = run_id or _broadcast(read_or_create_run_id(self.run_dir) if ctx.rank == 0 else None)
        self.task = make_task(spec)
        # The data first: a missing or corrupt shard is found before the engine's start-up, not after.
        self.train_loader = self.task.train_loader(ctx)

        self.checkpointer = Checkpointer(self.run_dir, keep=spec.train.keep_checkpoints, spec_digest=spec.digest())
        self.resume_from = self.checkpointer.find_resumable(log=self.log)
        torch.manual_seed(spec.train.seed)  # identical initial weights on every rank
        # A resumed run's weights are its checkpoint's: `model.init_weights` is read only for a run's first start.
        model = build_model(spec, log=self.log, initial_weights=self.resume_from is None)
        self.attention_backend = settle_attention_backend(model, spec, ctx.device, log=self.log)
        peak_flops = device_peak_flops(ctx.device, spec.train.precision, spec.metrics.peak_flops)
        # FLOPs matter for MFU only, which needs the device's peak (known GPUs, or metrics.peak_flops).
        self.flops_per_image = self.task.flops_per_image(model) if peak_flops else {}
        rescaled = self.resume_from is not None and self.resume_from["world_size"] != ctx.world_size
        self.engine, self.optimizer = build_engine(spec, model, world_size=ctx.world_size, device=ctx.device,
                                                   load_universal=rescaled)
        torch.manual_seed(spec.train.seed * 1000 + ctx.rank + 1)  # per-rank stream for drop path

        self.accum = spec.grad_accum(ctx.world_size)
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch < 1:
            raise SpecError(f"an epoch has {len(self.train_loader)} micro-batches per rank, fewer than grad_accum="
                            f"{self.accum}; lower train.micro_batch or train.grad_accum")
        self.total_steps = spec.train.max_steps or spec.train.epochs * self.steps_per_epoch
        # Only random shifts switch to full attention (the official schedule switches modes > 0 only).
        switches = spec.model.shift_mode == "random" and spec.schedule.full_attention_from < 1
        self.full_attention_step = round(spec.schedule.full_attention_from * self.total_steps) if switches else None
        self.schedule = LrSchedule.for_run(spec, world_size=ctx.world_size, steps_per_epoch=self.steps_per_epoch,
                                           total_steps=self.total_steps)
        self.task.setup(ctx)
        self.stepper = StepRunner(self.engine, self.optimizer, self.task, accum=self.accum, rank=ctx.rank,
                                  device=ctx.device, run_dir=self.run_dir, fault_hook=fault_hook)
        self.nonfinite = NonFinitePolicy(spec.train.max_bad_steps, log=self.log)

        self.metrics = TrainingMetrics(self.run_dir, run_id=self.run_id, rank=ctx.rank, host=spec.metrics.host,
                                       port=spec.metrics.port + ctx.rank if spec.metrics.port else 0,
                                       serve=spec.metrics.enabled, advertise_host=spec.metrics.advertise_host)
        self.metrics.publish_targets(self.run_id)
        self.metrics.attention_backend.info({"backend": self.attention_backend, "requested": spec.model.attn_backend})
        self.ema = ExponentialMovingAverage(self.engine.module, spec.optim.ema_decay) if spec.optim.ema_decay else None
        self.evaluator = Evaluator(spec, ctx, self.engine, self.ema, self.metrics, self.task, log=self.log)
        self.state = TrainState()
        self._resume()
        if spec.metrics.tensorboard:
            self.metrics.open_tensorboard(resumed_step=self.state.step)
        self.progress = _progress_bar(ctx, self.total_steps, self.state.step)
        self.window = MetricsWindow(self.metrics, world_size=ctx.world_size, log_every=spec.train.log_every,
                                    total_steps=self.total_steps,
                                    flops_per_image=self.flops_per_image.get(spec.model.shift_mode, 0.0),
                                    peak_flops=peak_flops,
                                    device=ctx.device, progress=self.progress,
                                    log=self.log if self.progress is None else None)

    def train(self) -> dict:
        """The loop: steps until the run's last step (or ``train.exit_after_steps`` of this launch)."""
        spec, state = self.spec, self.state
        first_step, self.saved_step, stop_early = state.step, state.step if self.resume_from else -1, False
        self._attention_schedule()
        # A notice during start-up or resume: nothing new to save when the run resumed from a checkpoint.
        stop_early = self._stop_if_noticed("during start-up")
        while state.step < self.total_steps and not stop_early:
            batches = self._epoch_batches()
            while state.micro_in_epoch < self.steps_per_epoch * self.accum and state.step < self.total_steps:
                started = time.perf_counter()
                self._attention_schedule()
                lr = self.schedule.apply(self.optimizer, state.step)
                result = self.stepper.run(batches, state.step)
                self.nonfinite.observe(state, result, self.metrics)  # raises after too many in a row
                state.step += 1
                state.micro_in_epoch += self.accum
                if self.ema is not None and not result.skipped:
                    self.ema.update(self.engine.module)
                if spec.train.record_samples:
                    _record_samples(self.run_dir, self.ctx.rank, state.step, result.indices)
                self.window.observe(result, state=state, lr=lr, images=spec.train.micro_batch * self.accum,
                                    seconds=time.perf_counter() - started, engine=self.engine,
                                    decode_errors=self._decode_errors())
                if state.step % spec.train.ckpt_every == 0:
                    self.save("every ckpt_every steps")
                if self._stop_if_noticed(f"after step {state.step}"):
                    stop_early = True
                    break
                if spec.train.exit_after_steps and state.step - first_step >= spec.train.exit_after_steps:
                    stop_early = True
                    break
            if state.micro_in_epoch >= self.steps_per_epoch * self.accum:
                state.epoch, state.micro_in_epoch = state.epoch + 1, 0
                self.evaluator.at_epoch_end(state, last_step=self.total_steps)
                stop_early = stop_early or self._stop_if_noticed(f"after the evaluation of epoch {state.epoch}")
        if self.saved_step != state.step:
            self.save("end of this launch" if stop_early else "end of training")
        if not stop_early and not self._stop_if_noticed("before the final evaluation"):
            self.evaluator.at_run_end(state)
        return self._summary(stop_early or self.preempted)

    def _stop_if_noticed(self, where: str) -> bool:
        """A launcher's preemption notice (SLURM's USR2 before the time limit) on any rank, whenever it came
        (in a step, a save, an evaluation, start-up): every rank saves the current step unless it is saved
        already, and the run stops for its launcher to requeue it. Called at the same points on every rank."""
        if self.preempted or not self._preemption_notice():
            return self.preempted
        if self.saved_step != self.state.step:
            self.save("preemption notice")
        self.log(f"preemption notice ({where}): stopped at step {self.state.step}, which is saved")
        self.preempted = True
        return True

    def _epoch_batches(self):
        """Batches of the current epoch from where it stands (a fresh epoch, or mid-epoch after a resume)."""
        if self.state.micro_in_epoch == 0:
            self.train_loader.set_epoch(self.state.epoch)
        return iter(self.train_loader)

    def _attention_schedule(self) -> None:
        """From `schedule.full_attention_from` of the run on, random-shift ViL attention sees all neighbouring
        chunks. Once switched, the run stays switched (``TrainState.shift_mode`` travels in its checkpoints):
        a run extended after its switch step does not go back to random shifts."""
        module, state = self.engine.module, self.state
        due = self.full_attention_step is not None and state.step >= self.full_attention_step
        if state.shift_mode != "full" and not due:
            return
        if not state.shift_mode:
            self.log(f"step {state.step}: ViL attention switches from shift_mode={self.spec.model.shift_mode!r} to "
                     f"'full' (schedule.full_attention_from={self.spec.schedule.full_attention_from})")
        state.shift_mode = "full"
        if module.shift_mode != "full":
            module.set_shift_mode("full")
        if getattr(self, "window", None) is not None:
            self.window.flops_per_image = self.flops_per_image.get("full", 0.0)

    def _decode_errors(self) -> int:
        """Samples this rank's loaders failed to decode so far (training and validation)."""
        val = self.evaluator.loader
        return self.train_loader.decode_errors + (val.decode_errors if val is not None else 0)

    def _preemption_notice(self) -> bool:
        """True on every rank when any rank's launcher asked to stop (one tiny all-reduce per step)."""
        if self.stop_requested is None:
            return False
        flag = torch.tensor([1.0 if self.stop_requested() else 0.0], device=self.ctx.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save(self, reason: str) -> int:
        """A checkpoint of the current step on every rank; returns the step (also kept as ``saved_step``)."""
        _check_ranks_agree(self.engine, self.spec, self.state.step)
        started = time.perf_counter()
        client = {"train_state": vars(self.state).copy(), "rng": rng_state(), "rank": self.ctx.rank,
                  "loader": self.train_loader.state_dict()}
        self.checkpointer.save(self.engine, step=self.state.step, client_state=client,
                               ema=self.ema.state_dict() if self.ema is not None else None)
        self.metrics.checkpoint_duration.observe(time.perf_counter() - started)
        self.metrics.last_checkpoint.set(time.time())
        self.log(f"checkpoint at step {self.state.step} ({reason})")
        self.saved_step = self.state.step
        return self.state.step

    def _resume(self) -> None:
        manifest = self.resume_from
        if manifest is None:
            return
        universal = None
        if manifest["world_size"] != self.ctx.world_size:
            self.log(f"checkpoint {manifest['tag']} was written by {manifest['world_size']} ranks, this run has "
                     f"{self.ctx.world_size}: converting it to a universal checkpoint")
            universal = self.checkpointer.convert_to_universal(manifest)
        chosen = _group_settings(self.optimizer)
        client = self.checkpointer.load(self.engine, manifest, tag=universal)
        self._keep_group_settings(chosen)
        self.state = TrainState(**client["train_state"])
        if client.get("rank", self.ctx.rank) == self.ctx.rank:
            set_rng_state(client["rng"])
        else:
            # A rank the saved run did not have: its own stream (rank 0's would repeat its drop-path and shift draws).
            torch.manual_seed(self.spec.train.seed * 1000 + self.ctx.rank + 1 + 7919 * self.state.step)
        if self.ema is not None:
            saved = self.checkpointer.load_ema(manifest, self.ctx.device)
            if saved is not None:
                self.ema.load_state_dict(saved)
            else:
                self.ema.restart_from(self.engine.module)
                self.log("the checkpoint has no EMA (optim.ema_decay was 0 when it was written): the EMA starts "
                         "from the resumed weights")
        if manifest["world_size"] == self.ctx.world_size:
            try:
                self.train_loader.load_state_dict(client["loader"])
            except ValueError as error:  # e.g. a dataset of another size mid-epoch: no restart can fix it
                raise SpecError(f"cannot resume {manifest['tag']} (step {self.state.step}, mid-epoch "
                                f"{self.state.epoch}): {error}. Resume with the data the run was trained on, or "
                                "start a new run_dir from its weights (model.init_weights)") from None
        elif self.state.micro_in_epoch:
            self.log(f"world size changed ({manifest['world_size']} -> {self.ctx.world_size}): epoch "
                     f"{self.state.epoch} restarts its data order from the beginning")
            self.state.micro_in_epoch = 0
        self.metrics.last_checkpoint.set(manifest["created"])
        self.log(f"resumed from {manifest['tag']} (step {self.state.step}, epoch {self.state.epoch})")

    def _keep_group_settings(self, chosen: list[dict]) -> None:
        """Loading optimizer states copies the saved run's settings over this launch's: the group settings
        (weight decay, betas, ...) and, in DeepSpeed's ZeRO 1/2 and bf16 optimizers, the gradient clipping. Put
        the spec's back, so that an adjusted ``optim.weight_decay`` or ``optim.clip_grad`` applies from here on."""
        for group, settings in zip(self.optimizer.param_groups, chosen, strict=True):
            for key, value in settings.items():
                if group.get(key) != value:
                    self.log(f"optimizer setting {key}: {group.get(key)!r} in the checkpoint, {value!r} from this "
                             "launch's spec on")
                    group[key] = value
        wrapper = self.engine.optimizer
        if wrapper is not self.optimizer and hasattr(wrapper, "clip_grad"):
            if wrapper.clip_grad != self.spec.optim.clip_grad:
                self.log(f"optimizer setting clip_grad: {wrapper.clip_grad!r} in the checkpoint, "
                         f"{self.spec.optim.clip_grad!r} from this launch's spec on")
            wrapper.clip_grad = self.spec.optim.clip_grad

    def _summary(self, exited_early: bool) -> dict:
        evaluation = {f"eval_{k}" if k == "step" else k: v for k, v in self.state.last_eval.items()}
        summary = {"step": self.state.step, "epoch": self.state.epoch, "total_steps": self.total_steps,
                   "exited_early": exited_early, "preempted": self.preempted,
                   "nonfinite_steps": self.state.nonfinite_total,
                   "run_id": self.run_id, **evaluation}
        if self.ctx.rank == 0:
            from vilscale.orchestration.checkpoint.rundir import fence

            fence(self.run_dir, "writing summary.json")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def log(self, message: str) -> None:
        if self.ctx.rank == 0:
            print(f"[vilscale] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()


# Optimizer group settings the spec decides (the learning rate is the schedule's, set every step).
GROUP_SETTINGS = ("weight_decay", "betas", "eps", "momentum")


def _group_settings(optimizer) -> list[dict]:
    return [{key: group[key] for key in GROUP_SETTINGS if key in group} for group in optimizer.param_groups]


def _settle_spec(spec: JobSpec, ctx: RankContext) -> None:
    """Rank 0 writes the spec into the run dir, unless the run dir's spec.yaml says something else is trained
    there: the launch that wrote it (and checked its changes) came after this job was submitted, e.g. a SLURM
    job queued or requeued under an older spec. Every rank learns the outcome."""
    refusal = None
    if ctx.rank == 0:
        from vilscale.orchestration.checkpoint.rundir import stored_spec
        from vilscale.orchestration.config.spec import spec_changes

        stored = stored_spec(Path(spec.run_dir))
        changes = spec_changes(stored, spec.to_dict()) if stored is not None and _has_checkpoint(spec) else []
        if changes:
            described = "; ".join(f"{key}: {after!r} here, {before!r} in spec.yaml"
                                  for key, before, after in changes[:8])
            refusal = (f"this job's spec differs from {Path(spec.run_dir) / 'spec.yaml'} in what it trains "
                       f"({described}): "
                       "the run dir was relaunched with another spec after this job was submitted. Cancel this job, "
                       "or submit it again (with --allow-spec-change if the change is meant)")
        else:
            write_spec(spec)
    refusal = _broadcast(refusal)
    if refusal:
        raise RunDirError(refusal)


def _has_checkpoint(spec: JobSpec) -> bool:
    return (Path(spec.run_dir) / "checkpoints" / "latest").is_file()


def _out_of_memory_message(spec: JobSpec, ctx: RankContext, error: BaseException) -> str:
    """What ran out, by how much, and what to change."""
    train = spec.train
    if ctx.device.type == "cuda":
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        peak = torch.cuda.max_memory_allocated(ctx.device)
        where = (f"GPU {ctx.device} of rank {ctx.rank} ({total / 2**30:.1f} GiB; this rank's peak allocation "
                 f"{peak / 2**30:.1f} GiB)")
    else:
        where = f"host memory of rank {ctx.rank} ({_meminfo_gib('MemTotal')} GiB total, " \
                f"{_meminfo_gib('MemAvailable')} GiB available now)"
    fixes = [f"lower train.micro_batch (now {train.micro_batch}; raise train.grad_accum or keep train.global_batch "
             "to keep the global batch)"]
    if not train.activation_checkpointing:
        fixes.append("set train.activation_checkpointing=true")
    if train.zero_stage < 3:
        fixes.append(f"raise train.zero_stage (now {train.zero_stage})")
    return (f"{where} ran out at micro_batch={train.micro_batch}, {spec.model.name} at {spec.model.img_size} px, "
            f"{train.precision}: {' or '.join(fixes)}. ({str(error).splitlines()[0][:300]})")


def _meminfo_gib(field: str) -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return f"{int(line.split()[1]) / 2**20:.1f}"
    except OSError:
        pass
    return "?"


def _take_run_lock(spec: JobSpec, ctx: RankContext) -> RunLock | None:
    """Rank 0 takes the run dir's lock unless its launcher holds it for the ranks; every rank learns the
    outcome, so a refused rank 0 never leaves the others waiting in a collective."""
    import os

    lock, refusal = None, None
    if ctx.rank == 0 and not os.environ.get(LOCK_HELD_ENV):
        try:
            # A requeued or restarted job may start while its predecessor is still exiting: wait a little.
            lock = RunLock(Path(spec.run_dir), mode=spec.launcher.run_dir_mode).acquire(
                wait_s=60, what=f"rank 0 of {ctx.world_size}")
        except RunDirError as error:
            refusal = str(error)
    refusal = _broadcast(refusal)
    if refusal:
        raise RunDirError(refusal)
    return lock


def _check_ranks_agree(engine, spec: JobSpec, step: int) -> None:
    """Before a checkpoint: under ZeRO 0-2 every rank holds the full weights and they must be identical.
    A difference means a step was applied on some ranks only; saving it would make the run unresumable,
    so the run stops with a restartable error (the previous checkpoint is still good)."""
    if spec.train.zero_stage == 3 or not dist.is_initialized():
        return
    from vilscale.orchestration.checkpoint import CheckpointError
    from vilscale.orchestration.ranks import gather_objects

    with torch.no_grad():
        fingerprint = [float(p.detach().double().sum()) for p in engine.module.parameters()]
    fingerprints = gather_objects(fingerprint)
    differing = [r for r, other in enumerate(fingerprints) if other != fingerprints[0]]
    if differing:
        raise CheckpointError(f"ranks {differing} hold weights that differ from rank 0's at step {step}; not saving "
                              "this state. 'latest' still points to the previous complete checkpoint")


def _record_samples(run_dir: Path, rank: int, step: int, indices: list[torch.Tensor]) -> None:
    folder = run_dir / "samples"
    folder.mkdir(exist_ok=True)
    with open(folder / f"rank{rank}.jsonl", "a") as handle:
        handle.write(json.dumps({"step": step, "indices": torch.cat(indices).tolist()}) + "\n")


def _progress_bar(ctx: RankContext, total: int, initial: int):
    """rank 0's progress bar, only on a terminal (logs stay clean elsewhere)."""
    if ctx.rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1)


__all__ = ["NonFiniteLossError", "TrainState", "TrainingRun", "run_worker"]
