"""Which torch device a request names: one meaning of ``auto``, ``cpu`` and ``cuda`` everywhere."""

from __future__ import annotations

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
