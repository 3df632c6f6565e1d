"""Top-1/top-5 over the whole validation set, every sample counted exactly once across ranks."""

from __future__ import annotations

import contextlib

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


class Evaluator:
    """Evaluation at the end of every ``eval.every_epochs`` epochs and at the end of the run, on the EMA
    weights when the run keeps an EMA and ``eval.use_ema`` (the live weights are restored bit for bit).

    Args:
        spec: the job spec.
        ctx: this rank's context.
        engine: the DeepSpeed engine (its module is evaluated in the training precision).
        ema: the run's EMA or None.
        metrics: this rank's metric families.
        log: rank 0's logger.
    """

    def __init__(self, spec, ctx, engine, ema, metrics, *, log):
        self.spec, self.ctx, self.engine, self.ema, self.metrics, self.log = spec, ctx, engine, ema, metrics, log
        # Built once: each loader's decode pipeline compiles once per process, not per evaluation.
        self.loader = validation_loader(spec, ctx) if spec.data.val_manifest else None

    def at_epoch_end(self, state, *, last_step: int) -> None:
        if state.epoch % self.spec.eval.every_epochs == 0 or state.step >= last_step:
            self.evaluate(state)

    def at_run_end(self, state) -> None:
        if state.last_eval.get("step") != state.step:
            self.evaluate(state)

    def evaluate(self, state) -> dict:
        if self.loader is None:
            return {}
        module = self.engine.module
        weights = self.ema.applied(module) if self.ema is not None and self.spec.eval.use_ema else \
            contextlib.nullcontext(module)
        with weights:
            result = evaluate(module, self.loader, self.spec, self.ctx)
        self.metrics.val_top1.set(result["val_top1"])
        result["step"] = state.step
        result["weights"] = "ema" if self.ema is not None and self.spec.eval.use_ema else "live"
        self.metrics.log({"epoch": state.epoch, **result})
        self.log(f"epoch {state.epoch}: val top-1 {100 * result['val_top1']:.1f}%, top-5 "
                 f"{100 * result['val_top5']:.1f}% ({result['weights']} weights)")
        state.last_eval = result
        return result
