"""Top-1/top-5 over the whole validation set, every sample counted exactly once across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def validation_loader(spec, ctx):
    """This rank's part of the validation set (sequential; filler entries carry label -1)."""
    from vilscale.data.loader import ShardedLoader

    return ShardedLoader(spec.data.val_manifest, rank=ctx.rank, world_size=ctx.world_size,
                         batch_size=spec.eval.batch_size, seed=spec.train.seed, train=False, config=spec.data,
                         device=ctx.device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, spec, ctx) -> dict:
    """Accuracy of ``model`` over ``loader`` (every sample once across ranks); the same on every rank."""
    from vilscale.data.augment import normalize

    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # top-1 hits, top-5 hits, samples
    try:
        for images, labels in loader:
            valid = labels >= 0  # filler that evens out the ranks carries label -1
            logits = model(normalize(images, spec.data.mean, spec.data.std).to(dtype)).float()
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
