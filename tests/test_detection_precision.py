"""Mixed precision in detection, as the field does it: in a bf16 run the backbone, FPN and heads compute in bf16
while anchors, box coding, RoIAlign, losses, NMS, mask pasting and the detections stay fp32.

The perfect-detector test is the reason: at 800x1333 a bf16 coordinate moves in steps of 4-8 px, so a detector
whose boxes are decoded in bf16 loses a quarter of its AP (74 instead of 99.7 for a perfect one), and torchvision's
NMS has no bf16 kernel at all (the whole-model bf16 cast crashed in the RPN at step 1)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from vilscale.orchestration.config import load_spec
from vilscale.tasks import make_task
from vilscale.tasks.detection import coco_ap, to_coco_results
from vilscale.tasks.precision import LowPrecision

REPO = Path(__file__).resolve().parents[1]
COCO_RETINANET = REPO / "jobs" / "coco_retinanet_vil_small_1x.yaml"
DIGITS_MASK_RCNN = REPO / "jobs" / "digits_mask_rcnn.yaml"
HEIGHT, WIDTH = 800, 1333  # COCO's test size


def _ground_truth(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` boxes (x1, y1, x2, y2) that do not overlap, sides 12-480 px (small, medium and large in COCO's
    terms), inside an 800x1333 image, and their labels 1..5."""
    from torchvision.ops import box_iou

    generator = torch.Generator().manual_seed(seed)
    boxes: list[torch.Tensor] = []
    while len(boxes) < count:
        side = float(torch.exp(torch.empty(1).uniform_(2.5, 6.2, generator=generator)))
        aspect = float(torch.empty(1).uniform_(0.5, 2.0, generator=generator))
        w, h = side * aspect ** 0.5, side / aspect ** 0.5
        x = float(torch.empty(1).uniform_(1, WIDTH - w - 1, generator=generator))
        y = float(torch.empty(1).uniform_(1, HEIGHT - h - 1, generator=generator))
        box = torch.tensor([[x, y, x + w, y + h]])
        if not boxes or box_iou(box, torch.cat(boxes)).max() < 0.2:
            boxes.append(box)
    labels = torch.randint(1, 6, (count,), generator=generator)
    return torch.cat(boxes), labels


class _Levels(LowPrecision, nn.Module):
    """Stands in for the ViL backbone + FPN (whose cost at 800x1333 would be the whole test): zero maps of the
    FPN's shapes (strides 8-128, 256 channels), fp32 as the real island returns them."""

    def __init__(self):
        super().__init__()
        self.out_channels = 256
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the island its device

    def forward(self, images: torch.Tensor) -> OrderedDict:
        height, width = images.shape[-2:]
        return OrderedDict((str(i), images.new_zeros(images.shape[0], 256, -(-height // s), -(-width // s)))
                           for i, s in enumerate((8, 16, 32, 64, 128)))


class _PerfectHead(LowPrecision, nn.Module):
    """RetinaNet's head with the answers: for every anchor matched to a ground-truth box (IoU >= 0.5, and each box's
    best anchor, as RetinaNet's matcher assigns them), the box's regression code and a confident score for its class.
    Its outputs are rounded to the compute dtype, as a real head's convolutions in that dtype would give them."""

    def __init__(self, codes: torch.Tensor, logits: torch.Tensor):
        super().__init__()
        self.codes, self.logits = codes, logits
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, features):
        dtype = self.compute_dtype
        return {"cls_logits": self.logits[None].to(dtype), "bbox_regression": self.codes[None].to(dtype)}


def _perfect_detector_ap(precision: str, tmp_path: Path) -> dict[str, float]:
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import box_iou

    spec = load_spec(COCO_RETINANET, [f"train.precision={precision}", "model.attn_backend=chunked"])
    task = make_task(spec)
    model = task.create_model()
    detector = model.detector
    detector.backbone = _Levels()
    boxes, labels = _ground_truth(40)

    images = torch.zeros(1, 3, HEIGHT, WIDTH)
    padded = torch.zeros(1, 3, HEIGHT, -(-WIDTH // 32) * 32)
    anchors = detector.anchor_generator(ImageList(padded, [(HEIGHT, WIDTH)]),
                                        list(_Levels()(padded).values()))[0]  # fp32, as the detector makes them
    iou = box_iou(boxes, anchors)  # (boxes, anchors)
    best, match = iou.max(dim=0)
    positive = best >= 0.5
    positive[iou.argmax(dim=1)] = True
    match[iou.argmax(dim=1)] = torch.arange(len(boxes))
    codes = detector.box_coder.encode_single(boxes[match], anchors)
    logits = torch.full((len(anchors), spec.model.num_classes + 1), -10.0)
    logits[positive, labels[match[positive]]] = 10.0
    detector.head = _PerfectHead(codes, logits)
    model = task.place(model, torch.device("cpu"), precision)  # what `vilscale eval` and the trainer's evaluation do

    model.eval()
    with torch.no_grad():
        output = model([images[0]])[0]
    assert output["boxes"].dtype == torch.float32 and output["scores"].dtype == torch.float32
    categories = {label: label for label in range(1, 6)}
    results, _ = to_coco_results([output], [1], categories, masks=False)
    truth = {"images": [{"id": 1, "height": HEIGHT, "width": WIDTH, "file_name": "x.jpg"}],
             "categories": [{"id": c, "name": str(c)} for c in range(1, 6)],
             "annotations": [{"id": i + 1, "image_id": 1, "category_id": int(label), "iscrowd": 0,
                              "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                              "area": float((b[2] - b[0]) * (b[3] - b[1]))}
                             for i, (b, label) in enumerate(zip(boxes, labels))]}
    annotations = tmp_path / f"truth-{precision}.json"
    annotations.write_text(json.dumps(truth))
    return coco_ap(annotations, results, "bbox")


def test_a_perfect_detector_at_800x1333_loses_less_than_half_an_ap_point_in_bf16(tmp_path):
    fp32 = _perfect_detector_ap("fp32", tmp_path)
    bf16 = _perfect_detector_ap("bf16", tmp_path)
    assert fp32["AP"] > 0.99 and fp32["APs"] > 0.98, fp32  # the boxes include small ones (sides from 12 px)
    assert bf16["AP"] > fp32["AP"] - 0.005, (bf16, fp32)
    assert bf16["APs"] > fp32["APs"] - 0.005, (bf16, fp32)


@pytest.mark.parametrize("detector", ["mask_rcnn", "retinanet"])
def test_bf16_detection_keeps_coordinates_losses_and_nms_in_fp32(detector):
    """The digits detectors in a bf16 run: fp32 weights, a backbone that computes in bf16, fp32 anchors, RoIAlign
    features, losses and detections, and NMS that runs (every score kept, so it has work to do)."""
    spec = load_spec(DIGITS_MASK_RCNN, ["train.precision=bf16", f"model.detector={detector}",
                                        "model.attn_backend=chunked"])
    task = make_task(spec)
    torch.manual_seed(0)
    model = task.place(task.create_model(), torch.device("cpu"), "bf16")
    det = model.detector
    seen: dict[str, list[torch.dtype]] = {}

    def record(name):
        def hook(module, args, output):
            tensors = output if isinstance(output, list | tuple) else list(output.values()) \
                if isinstance(output, dict) else [output]
            seen.setdefault(name, []).extend(t.dtype for t in tensors if isinstance(t, torch.Tensor))
        return hook

    for layer in det.backbone.body.modules():  # the backbone's matrix products
        if isinstance(layer, nn.Linear):
            layer.register_forward_hook(record("backbone products"))
    det.backbone.register_forward_hook(record("fpn levels"))
    anchors = det.anchor_generator if detector == "retinanet" else det.rpn.anchor_generator
    anchors.register_forward_hook(record("anchors"))
    if detector == "mask_rcnn":
        det.roi_heads.box_roi_pool.register_forward_hook(record("roi align"))
        det.roi_heads.mask_roi_pool.register_forward_hook(record("roi align"))
        det.roi_heads.score_thresh = 0.0
    else:
        det.score_thresh = 0.0
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    targets = []
    for _ in images:
        mask = torch.zeros(2, 96, 96, dtype=torch.uint8)
        mask[0, 10:50, 10:40] = 1
        mask[1, 60:90, 50:70] = 1
        targets.append({"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0], [50.0, 60.0, 70.0, 90.0]]),
                        "labels": torch.tensor([3, 7]), "masks": mask})
    targets[1]["masks"] = targets[1]["masks"][:, :80]
    losses = model(images, targets)
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses.values()), losses
    sum(losses.values()).backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert set(seen["backbone products"]) == {torch.bfloat16}  # the backbone computes in bf16
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert all(dtype == torch.float32 for name, dtypes in seen.items() if name != "backbone products"
               for dtype in dtypes), seen
    assert set(seen) >= {"fpn levels", "anchors"} | ({"roi align"} if detector == "mask_rcnn" else set())
    for output in outputs:
        assert len(output["boxes"]) > 0  # NMS ran on fp32 boxes and kept some
        assert all(v.dtype == torch.float32 for k, v in output.items() if k != "labels")


def test_fp16_is_refused_for_the_dense_tasks_with_the_fix():
    from vilscale.orchestration.config import SpecError

    for job in ("digits_mask_rcnn.yaml", "digits_semfpn.yaml"):
        with pytest.raises(SpecError, match="train.precision='fp16' is not supported for task=.*Use train.precision="
                                            "bf16"):
            load_spec(REPO / "jobs" / job, ["train.precision=fp16"])
