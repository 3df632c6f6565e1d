"""ViL attention as one PyTorch custom op, ``torch.ops.vilscale.vil_attention``: what `torch.compile` sees of it.

Eagerly, ``ViLAttention`` calls the backends directly (their own autograd functions, which keep what their backward
needs). Under `torch.compile` it calls this op instead, so Dynamo traces whole ViL blocks in one graph: the op is
opaque to the tracer (its fake implementation gives the output's shape), while the backends' Python (problem checks,
geometry caches, Triton launches) would break the graph dozens of times per forward (47 breaks in vil_nano's). The
neighbour chunk of random-shift attention is a tensor argument (drawn in the graph from torch's generator), so one
graph serves every draw.

Backward: a second op recomputes the backend's forward with autograd on and differentiates it (every backend is
differentiable); that costs one more attention forward per backward, which the fused rest of the compiled step is
meant to pay for, and keeps one implementation of every gradient.
"""

from __future__ import annotations

import torch

from vilscale.kernels.dispatch import vil_attention

_TABLES = ("local_bias", "g2l_bias", "l2g_bias", "g2g_bias")


def random_neighbour() -> torch.Tensor:
    """The neighbour of the official ``mode = randrange(1, 9)``, drawn from torch's global generator as a tensor
    (what a compiled graph draws; eagerly ``ViLAttention.neighbour`` draws the same value as an int)."""
    # arithmetic, not a table lookup: indexing by a tensor reads its value (.item(), a graph break), and Inductor's
    # CPU code generation failed on torch.take of a constant table (KeyError 'buf1', torch 2.14)
    mode = torch.randint(1, 9, ())
    return mode - 1 + (mode > 4).long()


def _call(q, k, v, tables, neighbour: torch.Tensor, map_h, map_w, num_global, window, mode, backend):
    chosen = int(neighbour)
    return vil_attention(q, k, v, map_hw=(map_h, map_w), num_global=num_global, window=window, mode=mode,
                         neighbour=None if chosen < 0 else chosen, backend=backend,
                         **{name: table for name, table in zip(_TABLES, tables) if table is not None})


@torch.library.custom_op("vilscale::vil_attention", mutates_args=())
def _vil_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local_bias: torch.Tensor | None,
                      g2l_bias: torch.Tensor | None, l2g_bias: torch.Tensor | None, g2g_bias: torch.Tensor | None,
                      neighbour: torch.Tensor, map_h: int, map_w: int, num_global: int, window: int, mode: str,
                      backend: str) -> torch.Tensor:
    return _call(q, k, v, (local_bias, g2l_bias, l2g_bias, g2g_bias), neighbour, map_h, map_w, num_global, window,
                 mode, backend).contiguous()


@_vil_attention_op.register_fake
def _(q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, neighbour, map_h, map_w, num_global, window, mode, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("vilscale::vil_attention_backward", mutates_args=())
def _vil_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               local_bias: torch.Tensor | None, g2l_bias: torch.Tensor | None,
                               l2g_bias: torch.Tensor | None, g2g_bias: torch.Tensor | None, neighbour: torch.Tensor,
                               map_h: int, map_w: int, num_global: int, window: int, mode: str,
                               backend: str) -> list[torch.Tensor]:
    tables = (local_bias, g2l_bias, l2g_bias, g2g_bias)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        leaves = [None if t is None else t.detach().requires_grad_() for t in tables]
        out = _call(*inputs, leaves, neighbour, map_h, map_w, num_global, window, mode, backend)
        wanted = inputs + [t for t in leaves if t is not None]
        grads = list(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    dq, dk, dv = (torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads[:3]))
    rest = iter(grads[3:])
    dtables = []
    for table in tables:
        if table is None:
            dtables.append(q.new_empty(0))
        else:
            g = next(rest)
            dtables.append(torch.zeros_like(table) if g is None else g)
    return [dq.contiguous(), dk.contiguous(), dv.contiguous(), *dtables]


@_vil_attention_backward_op.register_fake
def _(grad, q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, neighbour, map_h, map_w, num_global, window, mode,
      backend):
    tables = [q.new_empty(0) if t is None else torch.empty_like(t) for t in (local_bias, g2l_bias, l2g_bias, g2g_bias)]
    return [torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), *tables]


def _setup_context(ctx, inputs, output):
    q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, neighbour, *problem = inputs
    ctx.save_for_backward(q, k, v, neighbour, *(t for t in (local_bias, g2l_bias, l2g_bias, g2g_bias)
                                                if t is not None))
    ctx.present = [t is not None for t in (local_bias, g2l_bias, l2g_bias, g2g_bias)]
    ctx.problem = problem


def _backward(ctx, grad):
    q, k, v, neighbour, *saved = ctx.saved_tensors
    tables, rest = [], iter(saved)
    for present in ctx.present:
        tables.append(next(rest) if present else None)
    dq, dk, dv, *dtables = torch.ops.vilscale.vil_attention_backward(grad.contiguous(), q, k, v, *tables, neighbour,
                                                                     *ctx.problem)
    return (dq, dk, dv, *(d if present else None for d, present in zip(dtables, ctx.present)),
            None, None, None, None, None, None, None)


_vil_attention_op.register_autograd(_backward, setup_context=_setup_context)


def vil_attention_compiled(q, k, v, *, map_hw, num_global, window, mode, backend, neighbour: torch.Tensor,
                           local_bias=None, g2l_bias=None, l2g_bias=None, g2g_bias=None) -> torch.Tensor:
    """``vil_attention`` through the custom op (``neighbour``: a scalar int64 tensor, -1 for all 9 chunks)."""
    return torch.ops.vilscale.vil_attention(q, k, v, local_bias, g2l_bias, l2g_bias, g2g_bias, neighbour,
                                            int(map_hw[0]), int(map_hw[1]), num_global, window, mode, backend)


__all__ = ["random_neighbour", "vil_attention_compiled"]
