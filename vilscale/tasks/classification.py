"""Image classification: ViL with its linear head, FFCV shards through the sharded loader, the paper's batch
augmentation (RandAugment, mixup/cutmix, label smoothing, random erasing) and soft-target cross-entropy, or
the semantic softmax over a class tree (`augment.loss`, see `vilscale.tasks.hierarchy`); top-1/top-5 over the
whole validation set, and the semantic top-1 with the semantic softmax."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ClassificationTask:
    """The ``task: classification`` side of the task protocol (see ``vilscale.tasks``).

    Precision: DeepSpeed's own bf16/fp16 mode, which casts the model (fp32 master weights stay in the optimizer)
    and halves the gradient all-reduce. A classifier has no coordinates to keep exact, and its loss and metrics are
    computed from fp32 logits; the dense tasks instead compute in autocast islands (``vilscale.tasks.precision``).
    """

    name = "classification"
    headline = "val_top1"
    init_note = ""  # the initial weights' report says what happened to the head itself

    def __init__(self, spec):
        self.spec = spec
        self.augment = None
        self._semantic = None

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

    @property
    def engine_precision(self) -> str:
        """DeepSpeed casts the classifier to ``train.precision`` (its bf16 or fp16 mode)."""
        return self.spec.train.precision

    @staticmethod
    def place(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
        """``model`` on ``device``, cast to ``precision`` as DeepSpeed casts it in training (for evaluation)."""
        from vilscale.tasks.precision import COMPUTE_DTYPES

        return model.to(device=device, dtype=COMPUTE_DTYPES[precision])

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

    def _data_config(self, ctx):
        """``data`` with ``num_workers`` clamped to the cores this rank may use (numba refuses more threads)."""
        import dataclasses

        from vilscale.tasks import decode_workers

        return dataclasses.replace(self.spec.data, num_workers=decode_workers(self, ctx))

    def train_loader(self, ctx):
        from vilscale.data.loader import ShardedLoader

        spec = self.spec
        return ShardedLoader(spec.data.train_manifest, rank=ctx.rank, world_size=ctx.world_size,
                             batch_size=spec.train.micro_batch, seed=spec.train.seed, train=True,
                             config=self._data_config(ctx),
                             augment=spec.augment, device=ctx.device, return_indices=True)

    def val_loader(self, ctx, *, batch_size: int | None = None):
        """This rank's part of the validation set (sequential; filler entries carry label -1), or None."""
        from vilscale.data.loader import ShardedLoader

        spec = self.spec
        if not spec.data.val_manifest:
            return None
        return ShardedLoader(spec.data.val_manifest, rank=ctx.rank, world_size=ctx.world_size,
                             batch_size=batch_size or spec.eval.batch_size, seed=spec.train.seed, train=False,
                             config=self._data_config(ctx), device=ctx.device)

    # ---- training ----------------------------------------------------------------------------------------

    def setup(self, ctx) -> None:
        from vilscale.data.augment import BatchAugment

        spec = self.spec
        self.augment = BatchAugment(spec.augment, num_classes=spec.model.num_classes, seed=spec.train.seed,
                                    mean=spec.data.mean, std=spec.data.std, rank=ctx.rank)

    def semantic(self, device):
        """The semantic softmax of `data.hierarchy` over the manifests' classes, tables on ``device`` (None with
        augment.loss=softmax)."""
        if self.spec.augment.loss != "semantic_softmax":
            return None
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as the tables will report it
        if self._semantic is None or self._semantic.targets.device != torch.device(device):
            from vilscale.data.manifest import load_manifest
            from vilscale.tasks.hierarchy import ClassHierarchy, SemanticSoftmax

            data = self.spec.data
            classes = load_manifest(data.train_manifest or data.val_manifest).classes
            self._semantic = SemanticSoftmax(ClassHierarchy.read(data.hierarchy, classes),
                                             label_smoothing=self.spec.augment.label_smoothing, device=device)
        return self._semantic

    def losses(self, engine, batch, *, micro_step: int):
        """({"loss": soft-target cross-entropy, or the semantic softmax}, indices) of one micro-batch."""
        from vilscale.data.augment import soft_target_cross_entropy
        from vilscale.tasks.precision import COMPUTE_DTYPES

        dtype = COMPUTE_DTYPES[self.spec.train.precision]  # the model's (DeepSpeed does not cast inputs)

        images, labels, indices = batch
        semantic = self.semantic(labels.device)
        if semantic is not None:
            images, mixed = self.augment.mix(images, labels, step=micro_step)
            return {"loss": semantic.loss(engine(images.to(dtype)), mixed)}, indices
        images, targets = self.augment(images, labels, step=micro_step)
        logits = engine(images.to(dtype))
        return {"loss": soft_target_cross_entropy(logits, targets)}, indices

    # ---- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, ctx, *, out_dir=None) -> dict:
        """Top-1/top-5 of ``model`` over ``loader`` (every sample once across ranks); the same on every rank.

        With the semantic softmax, top-k ranks the classes of the label's own level (its depth in the tree), and
        ``val_semantic_top1`` is the share of (sample, level) positives each level's softmax gets right."""
        from vilscale.data.augment import normalize

        spec = self.spec
        dtype = next(model.parameters()).dtype
        semantic = self.semantic(ctx.device)
        was_training = model.training
        model.eval()
        # top-1 hits, top-5 hits, samples, semantic hits, semantic positives
        totals = torch.zeros(5, dtype=torch.float64, device=ctx.device)
        try:
            for images, labels in loader:
                valid = labels >= 0  # filler that evens out the ranks carries label -1
                logits = model(normalize(images, spec.data.mean, spec.data.std).to(dtype)).float()
                if semantic is not None:
                    correct, counted = semantic.hits(logits, labels, valid)
                    totals[3] += correct
                    totals[4] += counted
                    logits = semantic.within_level(logits, labels)
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
        result = {"val_top1": totals[0].item() / samples, "val_top5": totals[1].item() / samples,
                  "val_samples": samples}
        if semantic is not None:
            result["val_semantic_top1"] = totals[3].item() / max(1.0, totals[4].item())
        return result

    @staticmethod
    def report(result: dict) -> list[str]:
        lines = [f"val top-1: {100 * result['val_top1']:.1f}%"]
        if "val_semantic_top1" in result:
            lines.append(f"val semantic top-1: {100 * result['val_semantic_top1']:.1f}%")
        return lines

    @staticmethod
    def log_line(result: dict) -> str:
        line = f"val top-1 {100 * result['val_top1']:.1f}%, top-5 {100 * result['val_top5']:.1f}%"
        if "val_semantic_top1" in result:
            line += f", semantic top-1 {100 * result['val_semantic_top1']:.1f}%"
        return line
