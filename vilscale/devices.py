"""Which torch device a request names: one meaning of ``auto``, ``cpu`` and ``cuda`` everywhere; and what this
machine's CPU offers to settings sized for a cluster node."""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when visible, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``
    -> a concrete device; a bare ``cuda`` becomes the current CUDA device (``cuda:N``).

    Raises ValueError when CUDA is asked for and no CUDA device is visible.
    """
    if isinstance(requested, str) and requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(requested)!r} asks for CUDA but no CUDA device is visible; "
                             "use train.device=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity: a SLURM task's or a container's share, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def clamp_workers(requested: int, *, key: str, log=None) -> int:
    """``requested`` decode workers, at most the cores this process may use (``key`` names the setting in the one
    line ``log`` gets when it is clamped). A job written for a 32-core node then runs on a laptop as it is."""
    cores = usable_cores()
    if requested <= cores:
        return requested
    if log is not None:
        log(f"{key}={requested} is more than the {cores} CPU core(s) this process may use: using {cores}")
    return cores
