"""Detection (RetinaNet) and instance segmentation (Mask R-CNN) on the ViL backbone.

The detectors, anchors, box coding, NMS, RoIAlign, losses and the FPN are torchvision's; what is ours is
the backbone (``create_model(..., backbone=True)``: ViL attention in every stage, one NCHW map per stage)
and the glue. Levels and details follow the official detection fork (microsoft/VisionLongformerForObjectDetection,
detectron2): RetinaNet reads stages 2-4 (strides 8, 16, 32) plus P6/P7 made from C5, the last stage's own map
(``LastLevelP6P7(768, 256)`` on ``layer4``), with three anchor scales per octave at their exact sizes (32, 40.3,
50.8, ...); Mask R-CNN reads stages 1-4 (strides 4-32) plus a max-pooled P6 for the RPN, and its box and mask heads
pool with detectron2's default ROIAlignV2 (``aligned=True``: pixel centres at +0.5, and an adaptive sampling ratio).
A backbone with three stages (vil_nano) gives RetinaNet stages 1-3 and Mask R-CNN stages 1-3 plus the pooled level
(the first four anchor sizes). Global tokens per stage are the variant's (1, 1, 1, 0), window 7, as the official
configs.

Precision (``vilscale.tasks.precision``): the weights stay fp32 and DeepSpeed runs in fp32; in bf16 runs the
backbone with its FPN, the RPN head, RetinaNet's heads and the RoI box and mask heads compute under autocast, and
each hands fp32 tensors on. Anchors, box coding and decoding, RoIAlign, the losses, NMS, mask pasting and the
detections are fp32.

Images reach the detector as ``uint8`` tensors scaled to [0, 1]; its ``GeneralizedRCNNTransform`` resizes
(shorter side ``data.min_size``, one drawn per image from a tuple for multi-scale training, longer side at
most ``data.max_size``), normalises with ``data.mean``/``data.std`` and pads the batch to a multiple of 32,
the backbone's total stride, so every stage map divides evenly (the ViL kernels handle maps of any size).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.poolers import LevelMapper

from vilscale.tasks.backbone import OnViLBody, ViLFPN
from vilscale.tasks.precision import COMPUTE_DTYPES, LowPrecision, set_compute_dtype

HEADLINES = {"retinanet": "box_ap", "mask_rcnn": "mask_ap"}


class P6P7FromC5(LastLevelP6P7):
    """RetinaNet's P6 (a stride-2 3x3 conv) and P7 (ReLU, then another) from C5, the last stage's own map, as the
    official fork's ``LastLevelP6P7(768, 256)``. torchvision's class reads P5 instead whenever the two widths happen
    to be equal; this one always reads C5."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.use_P5 = False


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's multi-scale RoIAlign with detectron2's ROIAlignV2: ``aligned=True`` (a box's pixel corners at
    integer coordinates, so its sampling grid is shifted by half a pixel) and ``sampling_ratio=0`` (as many samples
    per bin as the bin is wide). The level of each box follows the FPN paper's rule with 224 px at level 4 (both
    libraries'). Features are pooled in their own dtype (fp32 here)."""

    def __init__(self, featmap_names: list[str], output_size: int):
        super().__init__(featmap_names, output_size, sampling_ratio=0)

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        features = [x[name] for name in self.featmap_names]
        if self.scales is None:
            self.scales, self.map_levels = self._scales(features, image_shapes)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], index), b], dim=1) for index, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        out = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            chosen = torch.where(levels == level)[0]
            out[chosen] = roi_align(feature, rois[chosen], self.output_size, spatial_scale=scale,
                                    sampling_ratio=self.sampling_ratio, aligned=True).to(out.dtype)
        return out

    def _scales(self, features: list[torch.Tensor], image_shapes: list[tuple[int, int]]):
        """Each level's scale (a power of two: feature side / padded image side) and the box -> level mapper."""
        import math

        height = max(shape[0] for shape in image_shapes)
        scales = [2.0 ** round(math.log2(feature.shape[-2] / height)) for feature in features]
        first, last = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        return scales, LevelMapper(first, last, canonical_scale=self.canonical_scale,
                                   canonical_level=self.canonical_level)


# The heads, each an autocast island (its convolutions and linears in the compute dtype, fp32 out).
class RetinaNetHeads(LowPrecision, RetinaNetHead):
    """torchvision's RetinaNet classification and box-regression heads."""


class RPNHeads(LowPrecision, RPNHead):
    """torchvision's RPN head (objectness and box deltas per anchor)."""


class BoxHead(LowPrecision, TwoMLPHead):
    """The RoI box head: two fully connected layers on the pooled 7x7 features."""


class BoxPredictor(LowPrecision, FastRCNNPredictor):
    """Class scores and per-class box deltas of each RoI."""


class MaskHead(LowPrecision, MaskRCNNHeads):
    """The RoI mask head: four 3x3 convolutions on the pooled 14x14 features."""


class MaskPredictor(LowPrecision, MaskRCNNPredictor):
    """The mask head's upsampling and per-class mask logits."""


class ViLDetector(OnViLBody, nn.Module):
    """A torchvision detector on a ViL backbone. ``forward(images, targets)`` returns torchvision's dict of
    losses in training and its list of detections in evaluation; the ViL body's switches (shift mode,
    attention backend) and weight-decay exclusions are reachable from here as on a classifier (``OnViLBody``).

    Args:
        detector: torchvision's ``RetinaNet`` or ``MaskRCNN`` whose ``backbone`` is a ``ViLFPN``.
        kind: "retinanet" or "mask_rcnn".
    """

    body_path = "detector.backbone"

    def __init__(self, detector: nn.Module, kind: str):
        super().__init__()
        self.detector, self.kind = detector, kind

    def forward(self, images, targets=None):
        return self.detector(images, targets)


def anchor_generator(kind: str, base_sizes: tuple[int, ...]):
    """RetinaNet: three scales per octave (x, x 2^(1/3), x 2^(2/3), not rounded: 32, 40.3, 50.8) per level; Mask
    R-CNN's RPN: one size per level; both with aspect ratios 0.5, 1, 2 (the official configs' and torchvision's)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if kind == "retinanet":
        sizes = tuple((float(x), x * 2 ** (1 / 3), x * 2 ** (2 / 3)) for x in base_sizes)
    else:
        sizes = tuple((float(x),) for x in base_sizes)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def build_detector(spec) -> ViLDetector:
    """The spec's detector (``model.detector``) with ``model.num_classes`` object classes (+ background), computing
    in ``train.precision`` (see the module's docstring)."""
    from torchvision.models.detection import MaskRCNN, RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from vilscale.model import create_model

    cfg, data = spec.model, spec.data
    body = create_model(cfg.name, pos_embed=cfg.pos_embed, window_mode=cfg.window_mode, window=cfg.window,
                        img_size=cfg.img_size, num_classes=0, attn_backend=cfg.attn_backend,
                        shift_mode=cfg.shift_mode, drop_path_rate=cfg.drop_path_rate, backbone=True)
    stages = len(body.feature_dims)
    common = dict(min_size=tuple(data.min_size), max_size=data.max_size, image_mean=list(data.mean),
                  image_std=list(data.std), size_divisible=body.feature_strides[-1])
    width = cfg.fpn_channels
    if cfg.detector == "retinanet":
        levels = list(range(max(0, stages - 3), stages))
        backbone = ViLFPN(body, levels, width, P6P7FromC5(body.feature_dims[-1], width))
        anchors = anchor_generator("retinanet", cfg.anchor_sizes)
        head = RetinaNetHeads(width, anchors.num_anchors_per_location()[0], cfg.num_classes + 1)
        detector = RetinaNet(backbone, num_classes=cfg.num_classes + 1, anchor_generator=anchors, head=head,
                             detections_per_img=cfg.detections_per_image, score_thresh=cfg.score_threshold, **common)
    else:
        backbone = ViLFPN(body, list(range(stages)), width, LastLevelMaxPool())
        proposals = cfg.proposals_per_image
        names = [str(index) for index in range(stages)]  # the RoI heads read the stage levels, not the pooled one
        anchors = anchor_generator("mask_rcnn", cfg.anchor_sizes[:stages + 1])
        # heads sized by the FPN width as torchvision's defaults are for 256 channels: a 4 x width box
        # representation (1024) and a mask head of four width-wide convolutions (256)
        detector = MaskRCNN(backbone, num_classes=None, rpn_anchor_generator=anchors,
                            rpn_head=RPNHeads(width, anchors.num_anchors_per_location()[0]),
                            box_roi_pool=AlignedMultiScaleRoIAlign(names, output_size=7),
                            box_head=BoxHead(width * 7 * 7, 4 * width),
                            box_predictor=BoxPredictor(4 * width, cfg.num_classes + 1),
                            mask_roi_pool=AlignedMultiScaleRoIAlign(names, output_size=14),
                            mask_head=MaskHead(width, [width] * 4, 1),
                            mask_predictor=MaskPredictor(width, width, cfg.num_classes + 1),
                            box_batch_size_per_image=cfg.rois_per_image,
                            rpn_pre_nms_top_n_train=2 * proposals, rpn_pre_nms_top_n_test=proposals,
                            rpn_post_nms_top_n_train=proposals, rpn_post_nms_top_n_test=proposals,
                            box_detections_per_img=cfg.detections_per_image, box_score_thresh=cfg.score_threshold,
                            **common)
    return set_compute_dtype(ViLDetector(detector, cfg.detector), COMPUTE_DTYPES[spec.train.precision])


# ----------------------------------------------------------------------------------------------------
# evaluation: COCO box AP and mask AP with pycocotools, predictions gathered from every rank
# ----------------------------------------------------------------------------------------------------

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(outputs: list[dict], image_ids: list[int], category_of: dict[int, int], *,
                    masks: bool) -> tuple[list[dict], list[dict]]:
    """torchvision detections -> COCO results format (bbox [x, y, w, h]; segm as RLE of mask > 0.5)."""
    boxes_out, segm_out = [], []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].float().cpu()
        scores = output["scores"].float().cpu().tolist()
        labels = output["labels"].cpu().tolist()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, scores, labels):
            if label not in category_of:
                continue
            boxes_out.append({"image_id": int(image_id), "category_id": int(category_of[label]),
                              "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)})
        if masks and "masks" in output:
            import numpy as np
            from pycocotools import mask as mask_utils

            binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            for mask, score, label in zip(binary, scores, labels):
                if label not in category_of:
                    continue
                rle = mask_utils.encode(np.asfortranarray(mask))
                rle = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
                segm_out.append({"image_id": int(image_id), "category_id": int(category_of[label]),
                                 "segmentation": rle, "score": round(float(score), 5)})
    return boxes_out, segm_out


def coco_ap(annotations: str | Path, results: list[dict], kind: str) -> dict[str, float]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl (in [0, 1]) of ``results`` against ``annotations``; 0 for
    every figure when there are no results at all."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(AP_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        evaluation = COCOeval(truth, truth.loadRes(copy.deepcopy(results)), kind)  # loadRes adds keys in place
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: max(0.0, float(value)) for name, value in zip(AP_NAMES, evaluation.stats[:6])}


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


@torch.no_grad()
def evaluate(model: nn.Module, loader, spec, ctx, *, out_dir: Path | None = None) -> dict:
    """Box AP (and mask AP for Mask R-CNN) over the whole validation split, every image once across ranks;
    the predictions are written in COCO's results format to ``out_dir/bbox.json`` (and ``segm.json``)."""
    masks = spec.model.detector == "mask_rcnn"
    was_training = model.training
    model.eval()
    boxes, segms = [], []
    try:
        for images, targets, indices in loader:
            inputs = [image.to(ctx.device, torch.float32) / 255 for image in images]
            outputs = model(inputs)
            real = [i for i, index in enumerate(indices.tolist()) if index >= 0]  # fillers evening out the ranks
            batch_boxes, batch_segms = to_coco_results([outputs[i] for i in real],
                                                       [targets[i]["image_id"] for i in real],
                                                       loader.data.category_of, masks=masks)
            boxes += batch_boxes
            segms += batch_segms
    finally:
        model.train(was_training)
    boxes, segms = gather_lists(boxes), gather_lists(segms)
    skipped = sum(gather_lists([loader.skipped]))
    result = {}
    if ctx.rank == 0:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "bbox.json").write_text(json.dumps(boxes))
            if masks:
                (out_dir / "segm.json").write_text(json.dumps(segms))
        annotations = loader.data.annotations_path
        result.update({f"box_{name}": value for name, value in coco_ap(annotations, boxes, "bbox").items()})
        if masks:
            result.update({f"mask_{name}": value for name, value in coco_ap(annotations, segms, "segm").items()})
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    result["box_ap"] = result["box_AP"]
    if masks:
        result["mask_ap"] = result["mask_AP"]
    result["val_images"], result["skipped_images"] = len(loader.data) - skipped, skipped
    return result


def skipped_line(result: dict) -> list[str]:
    """The report's line about validation images that could not be read (none when all were scored)."""
    skipped = result.get("skipped_images", 0)
    if not skipped:
        return []
    return [f"{skipped} validation image(s) could not be read and were left out: the figures above score the other "
            f"{result['val_images']}"]


def headline_lines(result: dict, detector: str) -> list[str]:
    """What the trainer and `vilscale eval` print: ``box AP: NN.N`` (and ``mask AP``) and the detail lines."""
    lines = []
    for prefix, label in (("box", "box"), ("mask", "mask")):
        if f"{prefix}_AP" not in result:
            continue
        lines.append(f"{label} AP: {100 * result[f'{prefix}_AP']:.1f}")
        lines.append(f"{label} " + "  ".join(f"{name} {100 * result[f'{prefix}_{name}']:.1f}"
                                            for name in AP_NAMES[1:]))
    return lines + skipped_line(result)


# ----------------------------------------------------------------------------------------------------
# the task protocol (see vilscale.tasks)
# ----------------------------------------------------------------------------------------------------

class DetectionTask:
    """The ``task: detection`` side of the task protocol: ``model.detector`` retinanet or mask_rcnn on COCO-format
    data (``data.train_annotations``/``train_images``, ``data.val_annotations``/``val_images``)."""

    name = "detection"
    init_note = "dropped (the classifier's final norm and head; FPN and detection heads start fresh)"

    def __init__(self, spec):
        self.spec = spec
        self.headline = HEADLINES[spec.model.detector]
        self.device = torch.device("cpu")
        self._parsed: dict[str, dict] = {}

    @property
    def masks(self) -> bool:
        return self.spec.model.detector == "mask_rcnn"

    # ---- model ---------------------------------------------------------------------------------------

    def create_model(self) -> nn.Module:
        return build_detector(self.spec)

    @staticmethod
    def init_target(model: nn.Module) -> nn.Module:
        return model.body

    engine_precision = "fp32"
    """DeepSpeed keeps fp32 weights; ``train.precision`` is the compute dtype of the detector's autocast islands
    (``vilscale.tasks.precision``)."""

    @staticmethod
    def place(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
        """``model`` (fp32 weights) on ``device``, its islands computing in ``precision`` (for evaluation)."""
        from vilscale.tasks.precision import COMPUTE_DTYPES, set_compute_dtype

        return set_compute_dtype(model.to(device=device, dtype=torch.float32), COMPUTE_DTYPES[precision])

    @staticmethod
    def flops_per_image(model: nn.Module) -> dict[str, float]:
        return {}  # images differ in size: MFU is not reported for detection

    # ---- data ------------------------------------------------------------------------------------------

    def _content(self, annotations: str) -> dict:
        """An instances JSON, parsed once per task (pre-flight, categories and loaders share it)."""
        if annotations not in self._parsed:
            from vilscale.data.coco import read_coco_json

            self._parsed[annotations] = read_coco_json(annotations)
        return self._parsed[annotations]

    def categories(self) -> list[tuple[int, str]]:
        """The training annotations' categories: labels 1..K in both splits follow them."""
        from vilscale.data.coco import categories_of

        return categories_of(self._content(self.spec.data.train_annotations))

    def data_sizes(self) -> dict:
        """For `vilscale plan`: usable training images (after the training filters) and validation images."""
        from vilscale.data.coco import CocoData

        data = self.spec.data
        train = CocoData(data.train_images, data.train_annotations, train=True, masks=False,
                         categories=self.categories(), content=self._content(data.train_annotations))
        val = len(self._content(data.val_annotations).get("images", [])) if data.val_annotations else 0
        return {"train_samples": len(train), "val_samples": val, "shard_sizes": None}

    def micro_batches_per_epoch(self, train_samples: int, world_size: int) -> int:
        """Micro-batches every rank reads per epoch (CocoLoader's)."""
        from vilscale.data.coco import train_batches_per_rank

        return train_batches_per_rank(train_samples, world_size, self.spec.train.micro_batch)

    def _loader(self, ctx, *, train: bool, batch_size: int):
        from vilscale.data.coco import CocoData, CocoLoader
        from vilscale.tasks import decode_workers

        data = self.spec.data
        images, annotations = ((data.train_images, data.train_annotations) if train
                               else (data.val_images, data.val_annotations))
        split = CocoData(images, annotations, train=train, masks=self.masks, categories=self.categories(),
                         content=self._content(annotations))
        if train and ctx.rank == 0:
            print(f"[vilscale] {annotations}: {split.stats.line()}", flush=True)
        return CocoLoader(split, rank=ctx.rank, world_size=ctx.world_size, batch_size=batch_size,
                          seed=self.spec.train.seed, train=train, num_workers=decode_workers(self, ctx),
                          hflip=self.spec.augment.hflip if train else 0.0,
                          decode_error_limit=data.decode_error_limit)

    def train_loader(self, ctx):
        return self._loader(ctx, train=True, batch_size=self.spec.train.micro_batch)

    def val_loader(self, ctx, *, batch_size: int | None = None):
        if not self.spec.data.val_annotations:
            return None
        return self._loader(ctx, train=False, batch_size=batch_size or self.spec.eval.batch_size)

    # ---- training ----------------------------------------------------------------------------------------

    def setup(self, ctx) -> None:
        self.device = ctx.device

    def losses(self, engine, batch, *, micro_step: int):
        """(torchvision's dict of losses, fp32, indices) of one micro-batch."""
        images, targets, indices = batch
        images = [image.to(self.device, torch.float32) / 255 for image in images]
        targets = [{key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                    for key, value in target.items()} for target in targets]
        return engine(images, targets), indices

    # ---- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, loader, ctx, *, out_dir: Path | None = None) -> dict:
        return evaluate(model, loader, self.spec, ctx, out_dir=out_dir)

    def report(self, result: dict) -> list[str]:
        return headline_lines(result, self.spec.model.detector)

    @staticmethod
    def log_line(result: dict) -> str:
        line = f"box AP {100 * result['box_AP']:.1f} (AP50 {100 * result['box_AP50']:.1f})"
        if "mask_AP" in result:
            line += f", mask AP {100 * result['mask_AP']:.1f} (AP50 {100 * result['mask_AP50']:.1f})"
        if result.get("skipped_images"):
            line += f" ({result['skipped_images']} unreadable image(s) left out)"
        return line

    # ---- pre-flight ----------------------------------------------------------------------------------------

    def check(self, world_size: int) -> None:
        """Before any rank starts: COCO JSON, images present, train and val categories equal,
        model.num_classes equal to the category count, enough images for one step on every rank."""
        from vilscale.data.coco import CocoData, check_coco_folder

        data, spec = self.spec.data, self.spec
        if not data.train_annotations or not data.train_images:
            raise ValueError("task=detection needs data.train_annotations (a COCO instances JSON) and "
                             "data.train_images (its image folder); write them with `vilscale prepare digits-coco OUT` "
                             "or point them at COCO's instances_train2017.json and train2017/")
        train = check_coco_folder(self._content(data.train_annotations), data.train_annotations, data.train_images,
                                  what="data.train_annotations")
        if data.val_annotations:
            if not data.val_images:
                raise ValueError("data.val_annotations is set but data.val_images is empty; give the val image folder")
            val = check_coco_folder(self._content(data.val_annotations), data.val_annotations, data.val_images,
                                    what="data.val_annotations")
            if [c for c, _ in val] != [c for c, _ in train]:
                only_val = sorted({c for c, _ in val} - {c for c, _ in train})[:5]
                only_train = sorted({c for c, _ in train} - {c for c, _ in val})[:5]
                raise ValueError(f"the category ids of {data.val_annotations} and {data.train_annotations} differ "
                                 f"(only in val: {only_val}, only in train: {only_train}), so labels would not match "
                                 "and AP would be wrong; use annotation files with the same categories")
        if spec.model.num_classes != len(train):
            raise ValueError(f"model.num_classes={spec.model.num_classes} but {data.train_annotations} has "
                             f"{len(train)} categories; set model.num_classes={len(train)}")
        usable = len(CocoData(data.train_images, data.train_annotations, train=True, masks=False, categories=train,
                              content=self._content(data.train_annotations)))
        per_step = spec.train.micro_batch * spec.grad_accum(world_size) * world_size
        if usable < per_step:
            raise ValueError(f"{data.train_annotations} has {usable} usable training images, fewer than one step "
                             f"of {per_step} (train.micro_batch x grad_accum x {world_size} rank(s)); lower "
                             "train.micro_batch or use fewer ranks")
