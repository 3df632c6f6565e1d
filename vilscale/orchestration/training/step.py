"""One optimizer step of one rank: its micro-batches, forward and backward, and the non-finite policy.

A step whose loss is not finite on some rank (in any of its micro-batches), or whose gradients are not
(a finite loss can still give NaN or infinite gradients), is skipped as a whole, on every rank: every
micro-batch still runs its backward, so every rank takes part in exactly the collectives DeepSpeed
expects (ZeRO 0/1 reduce gradients in the boundary micro-batch's backward, ZeRO 2/3 in every backward),
but the optimizer's update is suppressed at the boundary. Weights and optimizer state stay those of the
previous step, the gradients are dropped, and the ranks stay identical. `NonFinitePolicy` stops the run
after ``train.max_bad_steps`` skipped steps in a row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from vilscale.orchestration.faults import maybe_die, maybe_hold, maybe_poison_loss, maybe_run_out_of_memory


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stopped (a restart would meet them again)."""


class OutOfMemory(RuntimeError):
    """A rank ran out of memory; the message gives the batch, the memory figures and the fix."""


@dataclass
class StepResult:
    losses: list[torch.Tensor] = field(default_factory=list)
    """Total losses of the step's micro-batches (finite ones only)."""
    components: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """Each named loss of the task (e.g. RetinaNet's classification and bbox_regression), per finite micro-batch."""
    skipped: bool = False
    """A micro-batch had a non-finite loss, or the gradients were not finite, on some rank: the update was
    suppressed on every rank."""
    nonfinite_gradients: bool = False
    """The losses were finite but the gradients were not."""
    data_wait: float = 0.0
    """Seconds spent waiting for batches."""
    indices: list[torch.Tensor] = field(default_factory=list)
    """Dataset indices of every micro-batch."""


def finite_everywhere(loss: torch.Tensor, device: torch.device) -> bool:
    """True when the loss is finite on every rank; every rank gets the same answer."""
    flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    return flag.item() == 0.0


class UpdateGuard:
    """Wraps the torch optimizer's ``step()`` (once, on this instance): it does nothing while ``suppress`` is
    set (a non-finite loss somewhere), and nothing when the gradients it is about to apply are not finite on
    some rank (``nonfinite_gradients`` says so afterwards). DeepSpeed still finishes the step around it
    (reduces, clips and zeroes the gradients, copies the unchanged fp32 master weights back), so every rank
    runs the same collectives and nothing changes. Every rank calls the optimizer's step at the same point
    (each on its own ZeRO partition), so the finiteness flag is agreed with one all-reduce."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.suppress = False
        self.nonfinite_gradients = False
        apply = optimizer.step

        def guarded_step(*args, **kwargs):
            if self.suppress:
                return None
            local = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            finite = all(bool(torch.isfinite(g).all()) for g in local)
            if not finite_everywhere(torch.tensor(0.0 if finite else float("nan")), device):
                self.nonfinite_gradients = True
                return None
            return apply(*args, **kwargs)

        optimizer.step = guarded_step  # shadows the class's step on this instance only


class StepRunner:
    """Runs the micro-batches of one optimizer step on this rank.

    Args:
        engine: the DeepSpeed engine.
        optimizer: the torch optimizer inside it (its update is what a bad step suppresses).
        task: the task (``vilscale.tasks``): turns a batch into its named losses.
        accum: micro-batches per optimizer step.
        rank: this rank (fault injection points name ranks).
        device: where the non-finite flag is reduced.
        run_dir: where fault-injection markers live.
        fault_hook: ``(step, loss) -> loss``, for tests that replace a step's loss in-process.
    """

    def __init__(self, engine, optimizer, task, *, accum: int, rank: int, device: torch.device, run_dir: Path,
                 fault_hook=None):
        self.engine, self.optimizer, self.task = engine, optimizer, task
        self.accum, self.rank, self.device = accum, rank, device
        self.run_dir, self.fault_hook = run_dir, fault_hook
        self.guard = UpdateGuard(optimizer, device)

    def run(self, batches, step: int) -> StepResult:
        """Step ``step`` (0-based: the number of steps completed before it)."""
        result = StepResult()
        maybe_hold(step=step + 1)
        for micro in range(self.accum):
            wait_start = time.perf_counter()
            batch = next(batches)
            result.data_wait += time.perf_counter() - wait_start
            named, indices = self.task.losses(self.engine, batch, micro_step=step * self.accum + micro)
            result.indices.append(indices)
            maybe_die("mid-step", step=step + 1, rank=self.rank, run_dir=self.run_dir)
            maybe_die("freeze", step=step + 1, rank=self.rank, run_dir=self.run_dir)
            maybe_run_out_of_memory(step=step + 1, rank=self.rank)
            loss = sum(named.values())
            loss = maybe_poison_loss(loss, step=step + 1, micro=micro, rank=self.rank)
            if self.fault_hook is not None:
                loss = self.fault_hook(step, loss)
            if finite_everywhere(loss, self.device):
                result.losses.append(loss.detach())
                for name, value in named.items():
                    result.components.setdefault(name, []).append(value.detach().float())
            else:
                result.skipped = True
            self.engine.backward(loss)
            self.guard.suppress, self.guard.nonfinite_gradients = result.skipped, False
            skipped_before = self.engine.skipped_steps
            self.engine.step()
            # ZeRO 1-3 find non-finite gradients themselves (and skip the update, agreed across ranks); with
            # ZeRO 0 the guard finds them.
            deepspeed_skipped = self.engine.skipped_steps > skipped_before
            if not result.skipped and (self.guard.nonfinite_gradients or deepspeed_skipped):
                result.skipped = result.nonfinite_gradients = True
        return result


class NonFinitePolicy:
    """Counts skipped steps; raises `NonFiniteLossError` after ``max_in_row`` in a row."""

    def __init__(self, max_in_row: int, *, log):
        self.max_in_row = max_in_row
        self.log = log

    def observe(self, state, result: StepResult, metrics) -> None:
        if not result.skipped:
            state.bad_in_row = 0
            return
        state.bad_in_row += 1
        state.nonfinite_total += 1
        metrics.nonfinite.inc()
        what = "non-finite gradients (the loss was finite)" if result.nonfinite_gradients else "non-finite loss"
        self.log(f"step {state.step}: {what}, step skipped on every rank "
                 f"({state.bad_in_row} in a row, {state.nonfinite_total} in total)")
        if state.bad_in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"{state.bad_in_row} non-finite losses in a row at step {state.step}; the run stopped (each was "
                "skipped, so the weights are unharmed and the latest checkpoint is good). Lower optim.lr, set "
                "optim.clip_grad, or check the data, then relaunch to resume from the latest checkpoint.")
