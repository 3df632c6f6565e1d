"""One entry point for ViL attention: picks a backend and says why the others refuse.

A backend is a module-level object with ``name``, ``can_run(q, *, head_dim, ...) -> str | None``
(``None`` when it can run, else the reason it cannot) and ``forward(q, k, v, **problem)``.
``auto`` prefers ``triton`` on CUDA, then ``chunked``; ``reference`` is never chosen automatically
because its memory is quadratic in the number of tokens.
"""

from __future__ import annotations

import importlib

import torch

from vilscale.kernels.reference import validate_problem

BACKEND_NAMES = ("reference", "chunked", "triton")
_AUTO_ORDER = ("triton", "chunked")
_MODULES = {
    "reference": "vilscale.kernels.reference_backend",
    "chunked": "vilscale.kernels.chunked",
    "triton": "vilscale.kernels.triton_attention",
}


def get_backend(name: str):
    """The backend object called ``name`` (imported lazily, so nothing touches CUDA at import)."""
    if name not in _MODULES:
        raise ValueError(f"attention backend {name!r} is unknown; valid: {('auto',) + BACKEND_NAMES}")
    return importlib.import_module(_MODULES[name]).BACKEND


def refusals(q: torch.Tensor, **problem) -> dict[str, str | None]:
    """For every backend: ``None`` if it can run this problem, else why not."""
    out = {}
    for name in BACKEND_NAMES:
        try:
            out[name] = get_backend(name).can_run(q, **problem)
        except ImportError as error:
            out[name] = f"not importable: {error}"
    return out


def select_backend(name: str, q: torch.Tensor, **problem) -> str:
    """Resolve ``auto`` and check that an explicitly named backend can run the problem."""
    if name == "auto":
        for candidate in _AUTO_ORDER:
            try:
                if get_backend(candidate).can_run(q, **problem) is None:
                    return candidate
            except ImportError:
                continue
        reasons = refusals(q, **problem)
        raise ValueError(f"no attention backend can run this problem: {reasons}")
    reason = get_backend(name).can_run(q, **problem)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} cannot run this problem: {reason}")
    return name


def vil_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, map_hw: tuple[int, int],
                  num_global: int, window: int, mode: str = "chunk", scale: float | None = None,
                  local_bias=None, g2l_bias=None, l2g_bias=None, g2g_bias=None, neighbour: int | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """ViL attention (see ``vilscale.kernels.reference`` for the exact semantics and layout;
    ``neighbour`` narrows the chunks a local query sees, chunk mode only)."""
    validate_problem(q, k, v, map_hw=map_hw, num_global=num_global, window=window, mode=mode, neighbour=neighbour)
    problem = dict(map_hw=map_hw, num_global=num_global, window=window, mode=mode)
    chosen = select_backend(backend, q, **problem)
    return get_backend(chosen).forward(q, k, v, scale=scale, local_bias=local_bias, g2l_bias=g2l_bias,
                                       l2g_bias=l2g_bias, g2g_bias=g2g_bias, neighbour=neighbour, **problem)
