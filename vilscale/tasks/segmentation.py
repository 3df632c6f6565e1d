"""Semantic segmentation: Semantic FPN (the semantic branch of Panoptic FPN, as PVT's ADE20K numbers use it) on the
ViL backbone, ADE20K-format data, per-pixel cross-entropy with an ignore index, and mIoU from a confusion matrix
all-reduced over the ranks.

The model: torchvision's FPN on every stage of ``create_model(..., backbone=True)`` (P2-P5, strides 4-32; P2-P4
for the three stages of vil_nano), per level ``max(1, level)`` blocks of 3x3 conv + GroupNorm + ReLU, each but the
finest level's followed by x2 bilinear upsampling, so all reach 1/4; their sum, dropout 0.1, a 1x1 classifier,
and bilinear upsampling to the input. mmsegmentation's FPNHead (PVT's) uses SyncBN in these blocks; GroupNorm (Panoptic
FPN's choice) has no statistics to synchronise across ranks and none that depend on the batch.

Images reach the model as float tensors in [0, 1] (uint8 / 255), as the detectors take them; it normalises them
with ``data.mean``/``data.std`` and pads them right and bottom to a multiple of the backbone's total stride (with
the mean colour, 0 after normalising), and crops its logits back. The loss is the mean cross-entropy over the
pixels that are not ``data.ignore_index`` (mmsegmentation's ``avg_non_ignore``).

Precision (``vilscale.tasks.precision``): fp32 weights (DeepSpeed runs in fp32); in bf16 runs the backbone with its
FPN and the per-level heads with the classifier compute under autocast, and the class scores' upsampling to the
input, the loss and the argmax are fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vilscale.tasks.backbone import OnViLBody, ViLFPN
from vilscale.tasks.detection import skipped_line
from vilscale.tasks.precision import COMPUTE_DTYPES, island, set_compute_dtype


class SemanticFPN(OnViLBody, nn.Module):
    """Semantic FPN on a ViL backbone. ``forward(images)`` returns logits ``(B, K, H, W)`` at the input's size;
    ``forward(images, masks)`` in training returns ``{"loss_seg": cross-entropy}``.

    Args:
        body: a ``VisionLongformer`` built with ``backbone=True``.
        num_classes: K, the classes scored (``ignore_index`` is none of them).
        fpn_channels: channels of every FPN level.
        head_channels: channels of the per-level heads and the classifier's input.
        ignore_index: the label that is neither trained nor scored.
        mean: per-channel mean of [0, 1] images.
        std: per-channel standard deviation of [0, 1] images.
        dropout: before the classifier (mmsegmentation's 0.1).
    """

    def __init__(self, body: nn.Module, *, num_classes: int, fpn_channels: int, head_channels: int,
                 ignore_index: int, mean: tuple[float, ...], std: tuple[float, ...], dropout: float = 0.1):
        super().__init__()
        levels = list(range(len(body.feature_dims)))
        self.backbone = ViLFPN(body, levels, fpn_channels, extra_blocks=None)
        groups = math.gcd(32, head_channels)
        self.scale_heads = nn.ModuleList()
        for level in levels:
            blocks = []
            for index in range(max(1, level)):
                blocks.append(nn.Sequential(
                    nn.Conv2d(fpn_channels if index == 0 else head_channels, head_channels, 3, padding=1, bias=False),
                    nn.GroupNorm(groups, head_channels), nn.ReLU(inplace=True)))
            self.scale_heads.append(nn.ModuleList(blocks))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mean, self.std = tuple(mean), tuple(std)
        self.stride = body.feature_strides[-1]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) class scores of [0, 1] images (B, 3, H, W)."""
        height, width = images.shape[-2:]
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        x = (images - mean) / std
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        levels = list(self.backbone(x).values())  # fp32, computed in the backbone's island
        with island(self.backbone.compute_dtype, x.device.type):  # the heads: the same compute dtype
            out = None
            for level, (features, blocks) in enumerate(zip(levels, self.scale_heads)):
                for block in blocks:
                    features = block(features)
                    if level > 0:
                        features = F.interpolate(features, scale_factor=2.0, mode="bilinear", align_corners=False)
                if out is None:
                    out = features
                else:
                    if features.shape[-2:] != out.shape[-2:]:
                        features = F.interpolate(features, size=out.shape[-2:], mode="bilinear", align_corners=False)
                    out = out + features
            scores = self.classifier(self.dropout(out))
        # the scores' upsampling to the input, the loss and the argmax in fp32
        scores = F.interpolate(scores.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return scores[..., :height, :width]

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None):
        scores = self.logits(images)
        if masks is None:
            return scores
        return {"loss_seg": cross_entropy(scores, masks, self.ignore_index)}



def cross_entropy(scores: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the pixels that are not ``ignore_index`` (0, with gradients, when all are)."""
    total = F.cross_entropy(scores.float(), masks, ignore_index=ignore_index, reduction="sum")
    return total / (masks != ignore_index).sum().clamp(min=1)


def build_segmenter(spec) -> SemanticFPN:
    from vilscale.model import create_model

    cfg, data = spec.model, spec.data
    body = create_model(cfg.name, pos_embed=cfg.pos_embed, window_mode=cfg.window_mode, window=cfg.window,
                        img_size=cfg.img_size, num_classes=0, attn_backend=cfg.attn_backend,
                        shift_mode=cfg.shift_mode, drop_path_rate=cfg.drop_path_rate, backbone=True)
    model = SemanticFPN(body, num_classes=cfg.num_classes, fpn_channels=cfg.fpn_channels,
                        head_channels=cfg.head_channels, ignore_index=data.ignore_index, mean=data.mean, std=data.std)
    return set_compute_dtype(model, COMPUTE_DTYPES[spec.train.precision])


@torch.no_grad()
def class_maps(model: nn.Module, images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Predicted class per pixel ``(H, W)`` int64 for each uint8 image (evaluation's input, ``resize_for_eval``),
    at ``sizes`` (the label maps' own): logits upsampled bilinearly to that size, then the argmax. Images of one
    size go through the model together."""
    parameter = next(model.parameters())
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    for members in groups.values():
        batch = torch.stack([images[i] for i in members]).to(parameter.device, torch.float32) / 255
        scores = model(batch).float()
        for row, index in enumerate(members):
            full = F.interpolate(scores[row:row + 1], size=tuple(sizes[index]), mode="bilinear", align_corners=False)
            out[index] = full[0].argmax(dim=0)
    return out


# ----------------------------------------------------------------------------------------------------
# mIoU: a confusion matrix over every rank
# ----------------------------------------------------------------------------------------------------

def confusion_matrix(truth: torch.Tensor, prediction: torch.Tensor, num_classes: int,
                     ignore_index: int) -> torch.Tensor:
    """(K, K) int64 counts, row = true class, column = predicted class, over the pixels not ``ignore_index``."""
    valid = truth != ignore_index
    pairs = truth[valid] * num_classes + prediction[valid]
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def scores_of(confusion: np.ndarray) -> dict:
    """Per-class IoU (None for a class in neither truth nor prediction), mIoU over the classes that have one,
    pixel accuracy and mean class accuracy (as mmsegmentation computes them)."""
    confusion = confusion.astype(np.float64)
    hits = np.diag(confusion)
    truth, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    union = truth + predicted - hits
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, hits / union, np.nan)
        accuracy = np.where(truth > 0, hits / truth, np.nan)
    total = confusion.sum()
    return {"iou": [None if np.isnan(v) else float(v) for v in iou],
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "pixel_accuracy": float(hits.sum() / total) if total else 0.0,
            "mean_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else 0.0}


def save_prediction(path: Path, classes: torch.Tensor, offset: int) -> None:
    """A predicted class map as a PNG in the label maps' own values (class + ``offset``: 1 with reduce_zero_label),
    8-bit when it fits, else 16-bit."""
    from PIL import Image

    values = classes.cpu().numpy() + offset
    array = values.astype(np.uint8) if values.max(initial=0) <= 255 else values.astype(np.uint16)
    Image.fromarray(array).save(path)


@torch.no_grad()
def evaluate(model: nn.Module, loader, spec, ctx, *, out_dir: Path | None = None) -> dict:
    """mIoU, per-class IoU, pixel accuracy over the whole validation split, every image once across ranks; with
    ``out_dir``: each rank writes its predictions to ``out_dir/predictions/NAME.png`` and rank 0 the scores and the
    confusion matrix to ``out_dir/iou.json``."""
    data, classes = spec.data, spec.model.num_classes
    offset = 1 if data.reduce_zero_label else 0
    was_training = model.training
    model.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.int64, device=ctx.device)
    predictions = out_dir / "predictions" if out_dir is not None else None
    if predictions is not None:
        predictions.mkdir(parents=True, exist_ok=True)
    try:
        for images, targets, indices in loader:
            maps = class_maps(model, images, [tuple(t["mask"].shape) for t in targets])
            for prediction, target, index in zip(maps, targets, indices.tolist()):
                if index < 0:  # a filler evening out the ranks
                    continue
                confusion += confusion_matrix(target["mask"].to(ctx.device), prediction, classes, data.ignore_index)
                if predictions is not None:
                    save_prediction(predictions / f"{target['name']}.png", prediction, offset)
    finally:
        model.train(was_training)
    skipped = torch.tensor([loader.skipped], dtype=torch.int64, device=ctx.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(confusion)
        dist.all_reduce(skipped)
    matrix = confusion.cpu().numpy()
    scores = scores_of(matrix)
    result = {"miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
              "mean_accuracy": scores["mean_accuracy"], "val_images": len(loader.data) - int(skipped),
              "skipped_images": int(skipped), "scored_pixels": int(matrix.sum())}
    if out_dir is not None and ctx.rank == 0:
        (out_dir / "iou.json").write_text(json.dumps({
            **result, "iou": scores["iou"], "num_classes": classes, "ignore_index": data.ignore_index,
            "reduce_zero_label": data.reduce_zero_label, "label_offset": offset,
            "predictions": "predictions/ (NAME.png per image: predicted class + label_offset, the label maps' values)",
            "confusion": matrix.tolist()}))
    return result


# ----------------------------------------------------------------------------------------------------
# the task protocol (see vilscale.tasks)
# ----------------------------------------------------------------------------------------------------

class SegmentationTask:
    """The ``task: segmentation`` side of the task protocol: Semantic FPN on ADE20K-format data
    (``data.train_images``/``train_masks``, ``data.val_images``/``val_masks``)."""

    name = "segmentation"
    headline = "miou"
    init_note = "dropped (the classifier's final norm and head; FPN and segmentation head start fresh)"

    def __init__(self, spec):
        self.spec = spec
        self.device = torch.device("cpu")

    # ---- model ---------------------------------------------------------------------------------------

    def create_model(self) -> nn.Module:
        return build_segmenter(self.spec)

    @staticmethod
    def init_target(model: nn.Module) -> nn.Module:
        return model.body

    engine_precision = "fp32"
    """DeepSpeed keeps fp32 weights; ``train.precision`` is the compute dtype of the segmenter's autocast islands
    (``vilscale.tasks.precision``)."""

    @staticmethod
    def place(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
        """``model`` (fp32 weights) on ``device``, its islands computing in ``precision`` (for evaluation)."""
        from vilscale.tasks.precision import COMPUTE_DTYPES, set_compute_dtype

        return set_compute_dtype(model.to(device=device, dtype=torch.float32), COMPUTE_DTYPES[precision])

    @staticmethod
    def flops_per_image(model: nn.Module) -> dict[str, float]:
        return {}  # not counted for the FPN and heads: MFU is not reported for segmentation

    # ---- data ------------------------------------------------------------------------------------------

    def _augment(self):
        from vilscale.data.ade import TrainAugment

        data = self.spec.data
        return TrainAugment(crop_size=data.crop_size, scale_range=tuple(data.scale_range),
                            cat_max_ratio=data.cat_max_ratio, photometric=self.spec.augment.photometric_distortion,
                            ignore_index=data.ignore_index, pad_colour=tuple(round(255 * m) for m in data.mean))

    def _split(self, *, train: bool):
        from vilscale.data.ade import AdeData

        data = self.spec.data
        images, masks = (data.train_images, data.train_masks) if train else (data.val_images, data.val_masks)
        return AdeData(images, masks, train=train, reduce_zero_label=data.reduce_zero_label,
                       ignore_index=data.ignore_index, augment=self._augment())

    def data_sizes(self) -> dict:
        """For `vilscale plan`: training and validation images (every image trains)."""
        from vilscale.data.ade import image_files

        data = self.spec.data
        train = len(image_files(data.train_images))
        val = len(image_files(data.val_images)) if data.val_images and data.val_masks else 0
        return {"train_samples": train, "val_samples": val, "shard_sizes": None}

    def micro_batches_per_epoch(self, train_samples: int, world_size: int) -> int:
        from vilscale.data.coco import train_batches_per_rank

        return train_batches_per_rank(train_samples, world_size, self.spec.train.micro_batch)

    def _loader(self, ctx, *, train: bool, batch_size: int):
        from vilscale.data.ade import AdeLoader
        from vilscale.tasks import decode_workers

        return AdeLoader(self._split(train=train), rank=ctx.rank, world_size=ctx.world_size, batch_size=batch_size,
                         seed=self.spec.train.seed, train=train, num_workers=decode_workers(self, ctx),
                         hflip=self.spec.augment.hflip if train else 0.0,
                         decode_error_limit=self.spec.data.decode_error_limit)

    def train_loader(self, ctx):
        return self._loader(ctx, train=True, batch_size=self.spec.train.micro_batch)

    def val_loader(self, ctx, *, batch_size: int | None = None):
        if not (self.spec.data.val_images and self.spec.data.val_masks):
            return None
        return self._loader(ctx, train=False, batch_size=batch_size or self.spec.eval.batch_size)

    # ---- training ----------------------------------------------------------------------------------------

    def setup(self, ctx) -> None:
        self.device = ctx.device

    def losses(self, engine, batch, *, micro_step: int):
        """({"loss_seg": cross-entropy in fp32}, indices) of one micro-batch of ``crop_size`` squares."""
        images, targets, indices = batch
        images = torch.stack(images).to(self.device, torch.float32) / 255
        masks = torch.stack([target["mask"] for target in targets]).to(self.device)
        return engine(images, masks), indices

    # ---- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, loader, ctx, *, out_dir: Path | None = None) -> dict:
        return evaluate(model, loader, self.spec, ctx, out_dir=out_dir)

    def predict_class_map(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """The predicted class (0..K-1) of every pixel of one uint8 image (3, H, W), as evaluation predicts it:
        the image resized to shorter side ``data.crop_size``, the logits upsampled back to (H, W)."""
        from vilscale.data.ade import resize_for_eval

        was_training = model.training
        model.eval()
        try:
            return class_maps(model, [resize_for_eval(image, self.spec.data.crop_size)],
                              [tuple(image.shape[-2:])])[0]
        finally:
            model.train(was_training)

    def validation_images(self, count: int) -> list[torch.Tensor]:
        """The first ``count`` validation images (by name), uint8 (3, H, W) as stored."""
        from PIL import Image

        from vilscale.data.ade import image_files

        if not self.spec.data.val_images:
            return []
        out = []
        for path in image_files(self.spec.data.val_images)[:count]:
            with Image.open(path) as handle:
                out.append(torch.from_numpy(np.asarray(handle.convert("RGB")).copy()).permute(2, 0, 1).contiguous())
        return out

    @staticmethod
    def report(result: dict) -> list[str]:
        return [f"mIoU: {100 * result['miou']:.1f}",
                f"pixel accuracy: {100 * result['pixel_accuracy']:.1f}%  mean accuracy: "
                f"{100 * result['mean_accuracy']:.1f}%", *skipped_line(result)]

    @staticmethod
    def log_line(result: dict) -> str:
        line = f"mIoU {100 * result['miou']:.1f}, pixel accuracy {100 * result['pixel_accuracy']:.1f}%"
        if result.get("skipped_images"):
            line += f" ({result['skipped_images']} unreadable image(s) left out)"
        return line

    # ---- pre-flight ----------------------------------------------------------------------------------------

    def check_eval(self) -> None:
        """Before `vilscale eval` reads anything: the validation split's checks of ``check``."""
        from vilscale.data.ade import check_ade_folder

        data = self.spec.data
        check_ade_folder(data.val_images, data.val_masks, what="val", num_classes=self.spec.model.num_classes,
                         ignore_index=data.ignore_index, reduce_zero_label=data.reduce_zero_label)

    def check(self, world_size: int) -> None:
        """Before any rank starts: the folders, a label map of the same size for every image, label values that
        are classes or ignore, ignore_index outside the classes, enough images for one step on every rank."""
        from vilscale.data.ade import check_ade_folder

        data, spec = self.spec.data, self.spec
        if not data.train_images or not data.train_masks:
            raise ValueError("task=segmentation needs data.train_images (an image folder) and data.train_masks (its "
                             "PNG label maps, same names); write them with `vilscale prepare digits-coco OUT` "
                             "(OUT/train/images, OUT/train/masks) or point them at ADE20K's images/training and "
                             "annotations/training")
        if bool(data.val_images) != bool(data.val_masks):
            raise ValueError("give both data.val_images and data.val_masks (or neither: no evaluation)")
        if data.ignore_index < spec.model.num_classes:
            raise ValueError(f"data.ignore_index={data.ignore_index} is one of the model.num_classes="
                             f"{spec.model.num_classes} classes; use a value >= {spec.model.num_classes} (ADE20K: 255)")
        common = dict(num_classes=spec.model.num_classes, ignore_index=data.ignore_index,
                      reduce_zero_label=data.reduce_zero_label)
        train = check_ade_folder(data.train_images, data.train_masks, what="train", **common)
        if data.val_images:
            check_ade_folder(data.val_images, data.val_masks, what="val", **common)
        per_step = spec.train.micro_batch * spec.grad_accum(world_size) * world_size
        if train.images < per_step:
            raise ValueError(f"{data.train_images} has {train.images} images, fewer than one step of {per_step} "
                             f"(train.micro_batch x grad_accum x {world_size} rank(s)); lower train.micro_batch or "
                             "use fewer ranks")
