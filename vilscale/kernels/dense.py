"""Full (dense) attention with the relative-position bias of ViL's full-attention stages, as one
autograd function; and the in-place softmax the CPU backends share.

``dense_biased_attention(q, k, v, local_table, g2l, l2g, g2g, index=...)`` computes
``softmax(q k^T * scale + bias) v`` over all ``G + L`` tokens, where the bias of local query i and
local key j is ``local_table[:, index[i, j]]`` and the global tables act as in ViL attention (g2l:
global query -> every local key, l2g: every local query -> global key, g2g: global -> global).

Autograd over the plain formulation kept the ``(heads, L, L)`` gathered bias and its index alive,
passed over the ``(B, heads, N, N)`` scores for the scale and the bias separately, and scattered the
table gradient with ``index_put``. Here the bias is added in place and never saved, only the
probabilities are kept (fp32), and the table gradient is one ``index_add_`` of the batch-summed
score gradient. All math runs in fp32 whatever the input dtype.
"""

from __future__ import annotations

import contextlib

import torch


def softmax_(parts: list[torch.Tensor]) -> None:
    """Softmax over the last axes of ``parts`` together (each ``(rows..., keys)`` with the same rows),
    in place. Written out because torch's fused CPU softmax took about twice as long as these passes
    on rows of a few hundred keys (AVX2, torch 2.13)."""
    row_max = parts[0].amax(-1, keepdim=True)
    for part in parts[1:]:
        torch.maximum(row_max, part.amax(-1, keepdim=True), out=row_max)
    total = None
    for part in parts:
        part.sub_(row_max).exp_()
        total = part.sum(-1, keepdim=True) if total is None else total.add_(part.sum(-1, keepdim=True))
    total.reciprocal_()
    for part in parts:
        part.mul_(total)


def no_autocast(device: torch.device):
    """Autocast off on ``device`` (the functions here handle dtypes themselves)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device of count_flops


class _DenseBiasedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, local_table, g2l, l2g, g2g, index, num_global, scale):
        g = num_global
        with no_autocast(q.device):
            scores = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))  # (B, h, N, N)
            scores[:, :, g:, g:] += local_table.float()[:, index]
            if g:
                scores[:, :, :g, :g] += g2g.float()
                scores[:, :, :g, g:] += g2l.float()[:, :, None]
                scores[:, :, g:, :g] += l2g.float()[:, None, :]
            softmax_([scores])
            out = torch.matmul(scores, v.float())
        ctx.save_for_backward(q, k, v, out, scores, local_table, index)
        ctx.num_global, ctx.scale = g, scale
        ctx.table_dtypes = [None if t is None else t.dtype for t in (g2l, l2g, g2g)]
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, probs, local_table, index = ctx.saved_tensors
        g, scale = ctx.num_global, ctx.scale
        needs = ctx.needs_input_grad
        dtypes = q.dtype, k.dtype, v.dtype
        with no_autocast(q.device):
            grad_out = grad_out.float()
            q, k, v = q.float(), k.float(), v.float()
            dv = torch.matmul(probs.transpose(-1, -2), grad_out)
            grad_scores = torch.matmul(grad_out, v.transpose(-1, -2))
            grad_scores.sub_((grad_out * out).sum(-1, keepdim=True)).mul_(probs)  # p * (dp - rowsum(dO * O))
            d_local = d_g2l = d_l2g = d_g2g = None
            if needs[3] or any(needs[4:7]):
                per_pair = grad_scores.sum(0)  # (h, N, N)
                if needs[3]:
                    d_local = torch.zeros(local_table.shape, dtype=torch.float32, device=q.device)
                    d_local.index_add_(1, index.reshape(-1), per_pair[:, g:, g:].reshape(per_pair.shape[0], -1))
                    d_local = d_local.to(local_table.dtype)
                if g:
                    d_g2l = per_pair[:, :g, g:].sum(-1).to(ctx.table_dtypes[0]) if needs[4] else None
                    d_l2g = per_pair[:, g:, :g].sum(1).to(ctx.table_dtypes[1]) if needs[5] else None
                    d_g2g = per_pair[:, :g, :g].to(ctx.table_dtypes[2]) if needs[6] else None
                del per_pair
            grad_scores *= scale
            dq = torch.matmul(grad_scores, k)
            dk = torch.matmul(grad_scores.transpose(-1, -2), q)
        return (dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), d_local, d_g2l, d_l2g, d_g2g, None, None,
                None)


def dense_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local_table: torch.Tensor,
                           g2l: torch.Tensor | None, l2g: torch.Tensor | None, g2g: torch.Tensor | None, *,
                           index: torch.Tensor, num_global: int, scale: float) -> torch.Tensor:
    """Attention of all ``(B, h, G + L, d)`` tokens to all, with relative-position biases.

    Args:
        q, k, v: ``(B, heads, G + L, d)``, global tokens first.
        local_table: ``(heads, entries)`` local-to-local bias table.
        g2l, l2g: ``(heads, G)`` global-query and local-query biases (or None when ``num_global`` is 0).
        g2g: ``(heads, G, G)``.
        index: ``(L, L)`` long, the table entry of every (local query, local key) pair.
        num_global: ``G``.
        scale: factor of ``q k^T``.
    """
    if num_global and (g2l is None or l2g is None or g2g is None):
        raise ValueError("with global tokens, dense_biased_attention needs the g2l, l2g and g2g tables")
    return _DenseBiasedAttention.apply(q, k, v, local_table, g2l if num_global else None,
                                       l2g if num_global else None, g2g if num_global else None, index,
                                       num_global, scale)
