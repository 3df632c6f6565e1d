"""The paper's batch-level training augmentation, on the training device, reproducible from a seed.

The loader has already done RandomResizedCrop and the horizontal flip while decoding; `BatchAugment`
does the rest in the order of timm's transform (which the ViL code uses): RandAugment (kornia) or, when
RandAugment is off, colour jitter (kornia); normalisation; random erasing (kornia, filled with 0, i.e.
the mean colour); then mixup or cutmix with label smoothing, giving soft targets.

Where this differs from timm, and why:
- kornia's RandAugment draws its two operations per call, not per image; the batch is therefore split
  into `randaugment_groups` groups that each draw their own operations and magnitude. The magnitude
  noise (mstd) is drawn per group as well. kornia's magnitude scale is 0..30, timm's 0..10 (m9 -> 27).
- Random erasing fills with 0 after normalisation (the mean colour) instead of per-pixel noise.

Reproducibility: every call seeds its own generators from (seed, rank, step), so the same step on the
same rank gives the same batch, however many calls came before (a resumed run matches an uninterrupted
one), and the global torch RNG is left as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vilscale.data.config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from vilscale.devices import resolve_device


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [0, 255] (or float [0, 1]) NCHW images -> float32 normalised images (the evaluation transform)."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float().clone()
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int64 -> (B, num_classes) float32 with ``1 - smoothing + smoothing/C`` on the label."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))`` (the loss with mixup/cutmix targets)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@dataclass(frozen=True)
class MixedLabels:
    """What a batch's targets are made of: ``lam`` x the labels' targets + (1 - lam) x the partners' (the images
    mixed in by mixup or cutmix), for losses that build their own targets from labels (the semantic softmax)."""

    labels: torch.Tensor
    """(B,) int64 class indices."""
    partners: torch.Tensor
    """(B,) int64 class indices of the images mixed in; they count for nothing when ``lam`` is 1."""
    lam: float
    """Weight of ``labels`` (1.0: the batch is not mixed)."""

    def soft_targets(self, num_classes: int, smoothing: float) -> torch.Tensor:
        """(B, num_classes) smoothed one-hot targets, mixed."""
        targets = one_hot_smoothed(self.labels, num_classes, smoothing)
        if self.lam == 1.0:
            return targets
        return targets.mul(self.lam).add_(one_hot_smoothed(self.partners, num_classes, smoothing), alpha=1.0 - self.lam)


class BatchAugment:
    """``(images uint8 NCHW, labels (B,), step) -> (normalised float32 images, soft targets (B, num_classes))``.

    Args:
        config: the augmentation recipe (every part can be off).
        num_classes: width of the soft targets.
        seed: the run's seed.
        mean, std: normalisation (RGB, [0, 1] units), as in `DataConfig`.
        rank: this process's rank (ranks draw different augmentations for the same step).
    """

    def __init__(self, config: AugmentConfig, num_classes: int, seed: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 rank: int = 0):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.config, self.num_classes, self.seed, self.rank = config, num_classes, int(seed), int(rank)
        self.mean, self.std = tuple(mean), tuple(std)
        import kornia.augmentation as K
        from kornia.augmentation.auto import RandAugment

        self._randaugment = RandAugment(n=2, m=max(1, round(config.randaugment_magnitude * 3))) \
            if config.randaugment else None
        jitter = config.color_jitter
        self._jitter = K.ColorJitter(jitter, jitter, jitter, 0.0, p=1.0) \
            if jitter > 0 and not config.randaugment else None
        self._erasing = K.RandomErasing(p=config.random_erasing, value=0.0) if config.random_erasing > 0 else None

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, int(step), 7])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, mixed = self.mix(images, labels, step)
        return x, mixed.soft_targets(self.num_classes, self.config.label_smoothing)

    def mix(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, MixedLabels]:
        """The augmented images and what their targets are made of (`__call__` without the soft targets)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if labels.device.type == "cpu" and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}); got [{int(labels.min())}, "
                             f"{int(labels.max())}] (validation filler labels are -1: do not augment validation)")
        rng = self._rng(step)
        device = images.device
        fork_devices = [resolve_device(device).index] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(int(rng.integers(2 ** 63 - 1)))
            x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            if self._randaugment is not None:
                x = self._apply_randaugment(x, rng)
            elif self._jitter is not None:
                x = self._jitter(x)
            x = normalize(x.clamp_(0.0, 1.0), self.mean, self.std)
            if self._erasing is not None:
                x = self._erasing(x)
        return self._mix(x, labels, rng)

    def _apply_randaugment(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        cfg = self.config
        group = math.ceil(x.shape[0] / cfg.randaugment_groups)
        parts = []
        for chunk in x.split(group):
            magnitude = cfg.randaugment_magnitude
            if cfg.randaugment_mstd > 0:
                magnitude = float(np.clip(rng.normal(magnitude, cfg.randaugment_mstd), 0.0, 10.0))
            self._randaugment.m = float(np.clip(magnitude * 3.0, 0.05, 29.95))  # kornia's 0..30 scale
            parts.append(self._randaugment(chunk))
        return torch.cat(parts)

    def _mix(self, x: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        cfg = self.config
        partners = labels.flip(0)
        if not cfg.mixes or rng.random() >= cfg.mix_prob:
            return x, MixedLabels(labels, partners, 1.0)
        use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.switch_prob)
        alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        partner = x.flip(0)
        if use_cutmix:
            height, width = x.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(height * cut), int(width * cut)
            cy, cx = int(rng.integers(height)), int(rng.integers(width))
            top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
            left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
            x = x.clone()
            x[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)  # the area actually pasted
        else:
            x = x.mul(lam).add_(partner, alpha=1.0 - lam)
        return x, MixedLabels(labels, partners, lam)
