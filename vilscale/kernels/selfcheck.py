"""``auto`` that proves itself: the fused kernels checked against ``chunked`` on the device before use.

A kernel that fails to compile, or computes wrong numbers, on one GPU model, driver or Triton release
must not crash every rank of a cluster run or train it on garbage. Before training (and evaluation),
``settle_backend`` runs the triton kernels once on tiny problems shaped like the model's ViL attention
(each distinct head dim, window, window mode and global-token count, in every shift mode the run uses,
forward and backward, in the run's dtype) against the chunked backend on the same device:

- ``auto``: on success the model uses ``triton``; on an error or a mismatch beyond the tolerance it uses
  ``chunked``, and the reason (kernel error, or the largest error and where) is returned for one log line
  and the ``vilscale_attention_backend`` info metric;
- an explicit ``triton`` that fails the same check raises ``KernelCheckError`` (the trainer stops before
  its first step, exit 2, with the reason);
- ``chunked`` and ``reference`` are not checked.

The check runs wherever ``auto`` would pick triton: a CUDA device, or the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests drive it without a GPU. ``VILSCALE_INJECT_TRITON_CHECK``
(``error`` or ``mismatch``) makes the check see a failing kernel, for tests of the fallback.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

INJECT_ENV = "VILSCALE_INJECT_TRITON_CHECK"
INJECTIONS = ("error", "mismatch")
# Largest difference from chunked allowed, relative to the largest magnitude of chunked's tensor. Both
# round to the input dtype differently (the kernels round probabilities before their matmuls); a broken
# kernel is off by O(1).
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class KernelCheckError(ValueError):
    """The triton kernels failed their check on this device (the message says how)."""


@dataclass(frozen=True)
class CheckCase:
    """One tiny problem: the attention shape of a group of the model's ViL layers, in one shift mode."""

    heads: int
    head_dim: int
    num_global: int
    window: int
    mode: str
    neighbour: int | None
    tables: bool

    def describe(self) -> str:
        shift = "all 9 chunks" if self.neighbour is None else f"neighbour {self.neighbour}"
        return (f"head dim {self.head_dim}, window {self.window} ({self.mode}, {shift}), "
                f"{self.num_global} global, {'with' if self.tables else 'without'} bias tables")


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str
    max_error: float | None = None


def check_cases(model: torch.nn.Module) -> list[CheckCase]:
    """The distinct problems of ``model``'s ViL attention layers: every shift mode a run uses (``random``
    trains with one neighbour and evaluates with all 9; ``own`` sees its own chunk only)."""
    cases = []
    for module in model.modules():
        if not (hasattr(module, "backend") and hasattr(module, "window")):
            continue
        shift = getattr(module, "shift_mode", "full")
        neighbours = {"full": [None], "random": [None, 0], "own": [4]}[shift]
        head_dim = module.qkv.out_features // 3 // module.heads
        for neighbour in neighbours:
            case = CheckCase(heads=min(module.heads, 2), head_dim=head_dim, num_global=module.num_global,
                             window=module.window, mode=module.window_mode, neighbour=neighbour,
                             tables=bool(getattr(module, "rpe", False)))
            if case not in cases:
                cases.append(case)
    return cases


def _inputs(case: CheckCase, device: torch.device, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # a map of two chunks and a ragged third along each axis, not a multiple of the kernels' tiles
    map_hw = (2 * case.window + 3, 2 * case.window + 1)
    tokens = case.num_global + map_hw[0] * map_hw[1]
    qkv = [torch.randn(2, case.heads, tokens, case.head_dim, generator=gen).to(device, dtype) for _ in range(3)]
    tables = {}
    if case.tables:
        g = case.num_global
        tables = {"local_bias": torch.randn(case.heads, (4 * case.window - 1) ** 2, generator=gen),
                  "g2l_bias": torch.randn(case.heads, g, generator=gen),
                  "l2g_bias": torch.randn(case.heads, g, generator=gen),
                  "g2g_bias": torch.randn(case.heads, g, g, generator=gen)}
        tables = {name: table.to(device) for name, table in tables.items()}
    grad = torch.randn(qkv[0].shape, generator=gen).to(device, dtype)
    return qkv, tables, grad, map_hw


def _run(backend_name: str, case: CheckCase, qkv, tables, grad, map_hw, inject: str | None = None):
    from vilscale.kernels.dispatch import get_backend

    leaves = [t.clone().requires_grad_() for t in qkv]
    table_leaves = {name: t.clone().requires_grad_() for name, t in tables.items() if t.numel()}
    if inject == "error":
        raise RuntimeError(f"injected kernel failure ({INJECT_ENV}=error)")
    out = get_backend(backend_name).forward(*leaves, map_hw=map_hw, num_global=case.num_global, window=case.window,
                                            mode=case.mode, neighbour=case.neighbour, **table_leaves)
    out.backward(grad)
    results = {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    results.update({name: t.grad for name, t in table_leaves.items()})
    if inject == "mismatch":
        results["dk"] = results["dk"] + results["dk"].abs().max()
    return results


def check_triton(cases: list[CheckCase], device: torch.device, dtype: torch.dtype) -> CheckResult:
    """Run the triton backend on every case against chunked on ``device`` in ``dtype``."""
    inject = os.environ.get(INJECT_ENV) or None
    if inject is not None and inject not in INJECTIONS:
        raise ValueError(f"{INJECT_ENV}={inject!r} is not valid; use one of {INJECTIONS}")
    key = (str(device), dtype, tuple(cases), inject)
    return _check_cached(*key)


@functools.cache
def _check_cached(device: str, dtype: torch.dtype, cases: tuple[CheckCase, ...], inject: str | None) -> CheckResult:
    device = torch.device(device)
    tolerance = TOLERANCE[dtype]
    worst, worst_where = 0.0, ""
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for index, case in enumerate(cases):
            qkv, tables, grad, map_hw = _inputs(case, device, dtype, seed=index)
            try:
                got = _run("triton", case, qkv, tables, grad, map_hw, inject)
            except Exception as error:  # noqa: BLE001 - any failure of the kernels is the verdict
                first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
                return CheckResult(False, f"the triton kernels failed on {case.describe()}: "
                                          f"{type(error).__name__}: {first}")
            want = _run("chunked", case, qkv, tables, grad, map_hw)
            for name, reference in want.items():
                value = got[name].float()
                if not torch.isfinite(value).all():
                    return CheckResult(False, f"the triton kernels returned non-finite {name} on {case.describe()}")
                scale = reference.float().abs().max().item() or 1.0
                error = (value - reference.float()).abs().max().item() / scale
                if error > worst:
                    worst, worst_where = error, f"{name} on {case.describe()}"
    if worst > tolerance:
        return CheckResult(False, f"the triton kernels disagree with chunked: relative error {worst:.2e} in "
                                  f"{worst_where} (tolerance {tolerance:.0e})", worst)
    return CheckResult(True, f"checked against chunked on {len(cases)} problem(s), largest relative error "
                             f"{worst:.1e}", worst)


def triton_refusal(case: CheckCase, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the triton backend can run ``case`` on ``device`` in ``dtype``, else why not."""
    from vilscale.kernels.dispatch import get_backend

    probe = torch.empty(1, case.heads, case.num_global + 1, case.head_dim, device=device, dtype=dtype)
    try:
        return get_backend("triton").can_run(probe, map_hw=(1, 1), num_global=case.num_global, window=case.window,
                                             mode=case.mode)
    except ImportError as error:
        return f"triton is not importable: {error}"


def settle_backend(model: torch.nn.Module, requested: str, device: torch.device,
                   dtype: torch.dtype) -> tuple[str, str]:
    """Resolve ``requested`` for ``model`` on ``device`` (checking the triton kernels where they would run)
    and return ``(backend, reason)``. On a failed check ``auto`` sets the model to chunked; on a passed one
    the model keeps its setting (``auto`` then runs triton on every layer it applies to, chunked on the
    others). Raises ``KernelCheckError`` when an explicit ``triton`` cannot run or fails its check."""
    if requested in ("chunked", "reference"):
        return requested, "as configured"
    cases = check_cases(model)
    if not cases:
        return requested, "the model has no ViL attention"
    refusals = {case: triton_refusal(case, device, dtype) for case in cases}
    runnable = [case for case, refusal in refusals.items() if refusal is None]
    if requested == "triton" and len(runnable) < len(cases):
        case, refusal = next((case, refusal) for case, refusal in refusals.items() if refusal is not None)
        raise KernelCheckError(f"model.attn_backend=triton cannot run here ({case.describe()}): {refusal}")
    if not runnable:
        model.set_attn_backend("chunked")
        return "chunked", f"auto: triton does not apply ({next(iter(refusals.values()))})"
    verdict = check_triton(runnable, device, dtype)
    if verdict.ok:
        return "triton", f"{requested}: {verdict.reason}"
    if requested == "triton":
        raise KernelCheckError(f"model.attn_backend=triton: {verdict.reason}; use attn_backend auto (falls back "
                               "to chunked) or chunked")
    model.set_attn_backend("chunked")
    return "chunked", f"auto fell back to chunked: {verdict.reason}"


__all__ = ["CheckCase", "CheckResult", "KernelCheckError", "check_cases", "check_triton", "settle_backend",
           "triton_refusal"]
