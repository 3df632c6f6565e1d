"""Image classification: ViL with its linear head, FFCV shards through the sharded loader, the paper's batch
augmentation (RandAugment, mixup/cutmix, label smoothing, random erasing) and soft-target cross-entropy;
top-1/top-5 over the whole validation set."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ClassificationTask:
    """The ``task: classification`` side of the task protocol (see ``vilscale.tasks``)."""

    name = "classification"
    headline = "val_top1"
    init_note = ""  # the initial weights' report says what happened to the head itself

    def __init__(self, spec):
        self.spec = spec
        self.augment = None

    # ---- model ---------------------------------------------------------------------------------------

    def create_model(self) -> nn.Module:
        from vilscale.model import create_model

        cfg = self.spec.model
        return create_model(cfg.name, pos_embed=cfg.pos_embed, window_mode=cfg.window_mode, window=cfg.window,
                            img_size=cfg.img_size, num_classes=cfg.num_classes, attn_backend=cfg.attn_backend,
                            shift_mode=cfg.shift_mode, drop_path_rate=cfg.drop_path_rate)

    @staticmethod
    def init_target(model: nn.Module) -> nn.Module:
        return model

    def flops_per_image(self, model: nn.Module) -> dict[str, float]:
        """Forward + backward FLOPs of one training image (3 x forward, 2 FLOPs per multiply-add), for the
        run's shift mode and for full attention (what the run switches to)."""
        from vilscale.model.flops import count_flops

        out = {}
        for mode in dict.fromkeys((self.spec.model.shift_mode, "full")):
            model.set_shift_mode(mode)
            out[mode] = 6.0 * count_flops(model, self.spec.model.img_size, training=True)
        model.set_shift_mode(self.spec.model.shift_mode)
        return out

    # ---- data ------------------------------------------------------------------------------------------

    def data_sizes(self) -> dict:
        """For `vilscale plan`: training and validation samples and the training shards' sizes, read from the
        manifests (raises FileNotFoundError or DataError when they cannot be read here)."""
        from vilscale.data.manifest import load_manifest

        train = load_manifest(self.spec.data.train_manifest)
        val = load_manifest(self.spec.data.val_manifest) if self.spec.data.val_manifest else None
        return {"train_samples": train.num_samples, "val_samples": val.num_samples if val else 0,
                "shard_sizes": [shard.num_samples for shard in train.shards]}

    def micro_batches_per_epoch(self, train_samples: int, world_size: int) -> int:
        """Micro-batches every rank reads per epoch (what the sharded loader yields)."""
        from vilscale.data.sharding import steps_per_epoch

        return steps_per_epoch(train_samples, world_size, self.spec.train.micro_batch, train=True,
                               drop_last=self.spec.data.drop_last)

    def train_loader(self, ctx):
        from vilscale.data.loader import ShardedLoader

        spec = self.spec
        return ShardedLoader(spec.data.train_manifest, rank=ctx.rank, world_size=ctx.world_size,
                             batch_size=spec.train.micro_batch, seed=spec.train.seed, train=True, config=spec.data,
                             augment=spec.augment, device=ctx.device, return_indices=True)

    def val_loader(self, ctx, *, batch_size: int | None = None):
        """This rank's part of the validation set (sequential; filler entries carry label -1), or None."""
        from vilscale.data.loader import ShardedLoader

        spec = self.spec
        if not spec.data.val_manifest:
            return None
        return ShardedLoader(spec.data.val_manifest, rank=ctx.rank, world_size=ctx.world_size,
                             batch_size=batch_size or spec.eval.batch_size, seed=spec.train.seed, train=False,
                             config=spec.data, device=ctx.device)

    # ---- training ----------------------------------------------------------------------------------------

    def setup(self, ctx) -> None:
        from vilscale.data.augment import BatchAugment

        spec = self.spec
        self.augment = BatchAugment(spec.augment, num_classes=spec.model.num_classes, seed=spec.train.seed,
                                    mean=spec.data.mean, std=spec.data.std, rank=ctx.rank)

    def losses(self, engine, batch, *, micro_step: int, dtype: torch.dtype):
        """({"loss": soft-target cross-entropy}, indices) of one micro-batch."""
        from vilscale.data.augment import soft_target_cross_entropy

        images, labels, indices = batch
        images, targets = self.augment(images, labels, step=micro_step)
        logits = engine(images.to(dtype))
        return {"loss": soft_target_cross_entropy(logits, targets)}, indices

    # ---- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, ctx, *, out_dir=None) -> dict:
        """Top-1/top-5 of ``model`` over ``loader`` (every sample once across ranks); the same on every rank."""
        from vilscale.data.augment import normalize

        spec = self.spec
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

    @staticmethod
    def report(result: dict) -> list[str]:
        return [f"val top-1: {100 * result['val_top1']:.1f}%"]

    @staticmethod
    def log_line(result: dict) -> str:
        return f"val top-1 {100 * result['val_top1']:.1f}%, top-5 {100 * result['val_top5']:.1f}%"
