"""One door for every Triton launch of the fused backend.

``launch`` runs ``kernel[grid](*args, **kwargs)``; with ``RECORDER`` set it hands the launch to it
instead. The static check (``benchmarks/kernel_static.py``) records that way, on a machine without a
GPU, exactly the kernels, arguments and constexprs the host code would launch, and compiles them for
sm_90. Nothing here imports triton.
"""

from __future__ import annotations

RECORDER = None
"""None, or ``callable(kernel, grid, args, kwargs)`` that receives each launch instead of it running."""


def launch(kernel, grid, args: tuple, kwargs: dict) -> None:
    if RECORDER is not None:
        RECORDER(kernel, grid, args, kwargs)
        return
    kernel[grid](*args, **kwargs)


def recording() -> bool:
    return RECORDER is not None
