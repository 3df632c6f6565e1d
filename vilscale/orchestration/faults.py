"""Deterministic fault injection for the fault-tolerance tests (no effect unless the variables are set).

``VILSCALE_INJECT_FAULT=POINT:STEP[:RANK]`` makes rank RANK (default 0) SIGKILL itself when it
reaches POINT at optimizer step STEP, once per run directory (a marker file keeps a restarted run
from dying again). Points: ``mid-step`` (after the forward of a step, before its backward) and
``checkpoint-files-written`` (every rank has written its checkpoint files, the manifest and
``latest`` are not yet written); ``freeze`` stops the rank with SIGSTOP instead (after its forward, as
``mid-step``): alive but silent, as a rank on a host whose network is gone, so its peers wait in their
next collective until ``train.collective_timeout_s``.

``VILSCALE_INJECT_FAULT_NODE=NAME`` limits ``VILSCALE_INJECT_FAULT`` to ranks on the SLURM node NAME
(``SLURMD_NODENAME``): a node whose GPU or disk keeps failing.

``VILSCALE_INJECT_NONFINITE=STEP:MICRO:RANK[:grad][,...]`` makes the loss of micro-batch MICRO (0-based)
of step STEP (1-based) on rank RANK NaN; with ``:grad`` the loss stays finite and its gradients are NaN.

``VILSCALE_INJECT_OOM=STEP:RANK:device|host`` makes rank RANK run out of memory at step STEP: ``device``
raises torch's OutOfMemoryError, ``host`` allocates (and touches) memory until the kernel's OOM killer
ends the process (run it in a memory-limited cgroup).

``VILSCALE_INJECT_HOLD=STEP:PATH`` makes every rank wait before step STEP (1-based) until the file PATH
exists (at most ten minutes), so that a test can lose a node while the run is surely mid-way, however
fast the machine steps.

``VILSCALE_INJECT_SLOW_CONVERSION=SECONDS`` makes rank 0's conversion to a universal checkpoint take that much
longer (a large checkpoint on a slow file system), so a test can make it outlast ``train.collective_timeout_s``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

ENV = "VILSCALE_INJECT_FAULT"
NONFINITE_ENV = "VILSCALE_INJECT_NONFINITE"
HOLD_ENV = "VILSCALE_INJECT_HOLD"
OOM_ENV = "VILSCALE_INJECT_OOM"
SLOW_CONVERSION_ENV = "VILSCALE_INJECT_SLOW_CONVERSION"
POINTS = ("mid-step", "checkpoint-files-written", "freeze")
HOLD_LIMIT_S = 600.0


def maybe_die(point: str, *, step: int, rank: int, run_dir: Path) -> None:
    setting = os.environ.get(ENV)
    node = os.environ.get("VILSCALE_INJECT_FAULT_NODE")
    if node and os.environ.get("SLURMD_NODENAME") != node:
        return
    if not setting:
        return
    parts = setting.split(":")
    if parts[0] not in POINTS or len(parts) not in (2, 3):
        raise ValueError(f"{ENV}={setting!r} is not valid; use POINT:STEP[:RANK] with POINT in {POINTS}")
    target_rank = int(parts[2]) if len(parts) == 3 else 0
    if parts[0] != point or int(parts[1]) != step or target_rank != rank:
        return
    marker = Path(run_dir) / f".fault-{point}-{step}-{rank}"
    if marker.exists():
        return
    marker.touch()
    os.kill(os.getpid(), signal.SIGSTOP if point == "freeze" else signal.SIGKILL)


def maybe_poison_loss(loss: torch.Tensor, *, step: int, micro: int, rank: int) -> torch.Tensor:
    setting = os.environ.get(NONFINITE_ENV)
    if not setting:
        return loss
    targets = {}
    for item in setting.split(","):
        fields = item.split(":")
        if len(fields) not in (3, 4) or not all(f.isdigit() for f in fields[:3]) or fields[3:] not in ([], ["grad"]):
            raise ValueError(f"{NONFINITE_ENV}={setting!r} is not valid; use STEP:MICRO:RANK[:grad][,...]")
        targets[tuple(int(f) for f in fields[:3])] = fields[3:] == ["grad"]
    if (step, micro, rank) not in targets:
        return loss
    return _NanGradient.apply(loss) if targets[(step, micro, rank)] else loss * float("nan")


class _NanGradient(torch.autograd.Function):
    """The identity forward; NaN gradients backward."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def maybe_run_out_of_memory(*, step: int, rank: int) -> None:
    setting = os.environ.get(OOM_ENV)
    if not setting:
        return
    fields = setting.split(":")
    if len(fields) != 3 or not fields[0].isdigit() or not fields[1].isdigit() or fields[2] not in ("device", "host"):
        raise ValueError(f"{OOM_ENV}={setting!r} is not valid; use STEP:RANK:device|host")
    if (int(fields[0]), int(fields[1])) != (step, rank):
        return
    if fields[2] == "device":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the fault tests)")
    hoard = []
    while True:  # until the OOM killer ends this process
        hoard.append(torch.ones(64 * 2**20 // 4))


def maybe_hold(*, step: int) -> None:
    setting = os.environ.get(HOLD_ENV)
    if not setting:
        return
    at, sep, path = setting.partition(":")
    if not sep or not at.isdigit() or not path:
        raise ValueError(f"{HOLD_ENV}={setting!r} is not valid; use STEP:PATH")
    if int(at) != step:
        return
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{HOLD_ENV}: {path} did not appear within {HOLD_LIMIT_S:.0f} s")
        time.sleep(0.1)


def maybe_slow_conversion() -> None:
    setting = os.environ.get(SLOW_CONVERSION_ENV)
    if setting:
        time.sleep(float(setting))
