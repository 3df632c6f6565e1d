"""Top-1/top-5 over the whole validation set, every sample counted exactly once across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(model: torch.nn.Module, spec, ctx) -> dict:
    """Accuracy of ``model`` on ``spec.data.val_manifest``; identical result on every rank."""
    from vilscale.data.augment import normalize
    from vilscale.data.loader import ShardedLoader

    loader = ShardedLoader(spec.data.val_manifest, rank=ctx.rank, world_size=ctx.world_size,
                           batch_size=spec.eval.batch_size, seed=spec.train.seed, train=False, config=spec.data,
                           device=ctx.device, return_indices=True)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # top-1 hits, top-5 hits, samples
    try:
        for images, labels, indices in loader:
            valid = indices >= 0  # padding that evens out the ranks carries index -1
            logits = model(normalize(images, spec.data).to(dtype)).float()
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = top5 == labels[:, None]
            totals[0] += (hits[:, 0] & valid).sum()
            totals[1] += (hits.any(dim=-1) & valid).sum()
            totals[2] += valid.sum()
    finally:
        model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(totals)
    samples = int(totals[2].item())
    if samples == 0:
        raise RuntimeError(f"the validation set {spec.data.val_manifest} yielded no samples")
    return {"val_top1": totals[0].item() / samples, "val_top5": totals[1].item() / samples,
            "val_samples": samples}
