"""COCO-format data for detection: `vilscale prepare digits-coco` writes real COCO (pycocotools reads it, boxes
and masks come from the strokes), the loader is disjoint per rank, seeded per epoch and resumes bit for bit,
training leaves crowd regions, sub-pixel boxes and empty images out (and counts them), and the detectors on
the ViL backbone produce torchvision's losses and detections at any input size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vilscale.data.coco import CocoData, CocoLoader, write_digits_coco

REPO = Path(__file__).resolve().parents[1]


def _batches(loader, count=None):
    out = []
    for batch in loader:
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def test_prepare_digits_coco_writes_coco_that_pycocotools_reads(digits_coco):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    for split in ("train", "val"):
        coco = COCO(str(digits_coco / split / "annotations.json"))
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [str(d) for d in range(10)]
        for image in coco.loadImgs(coco.getImgIds()):
            assert (digits_coco / split / "images" / image["file_name"]).is_file()
        for ann in coco.loadAnns(coco.getAnnIds()):
            rle = coco.annToRLE(ann)
            mask = mask_utils.decode(rle)
            assert mask.sum() == ann["area"] > 0
            ys, xs = np.nonzero(mask)  # the box is the strokes' extent
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    train = json.loads((digits_coco / "train" / "annotations.json").read_text())
    counts = np.bincount([len([a for a in train["annotations"] if a["image_id"] == i["id"]]) for i in train["images"]])
    assert counts[0] == 0 and counts[1:].sum() == len(train["images"]) and len(counts) >= 4  # 1-4 digits per canvas


def test_the_same_seed_writes_the_same_data(tmp_path):
    from vilscale.data.coco import DigitsCocoSettings

    settings = DigitsCocoSettings(train_images=6, val_images=3, seed=3)
    first, second = write_digits_coco(tmp_path / "a", settings), write_digits_coco(tmp_path / "b", settings)
    for split in ("train", "val"):
        a, b = json.loads(first[split].read_text()), json.loads(second[split].read_text())
        assert a["annotations"] == b["annotations"] and a["images"] == b["images"]
    other = write_digits_coco(tmp_path / "c", DigitsCocoSettings(train_images=6, val_images=3, seed=4))
    assert json.loads(other["train"].read_text())["annotations"] != \
        json.loads(first["train"].read_text())["annotations"]


def _loader(data, rank, world, *, batch=4, seed=0, train=True, hflip=0.5):
    return CocoLoader(data, rank=rank, world_size=world, batch_size=batch, seed=seed, train=train, hflip=hflip)


def test_ranks_read_disjoint_parts_in_a_seeded_order_per_epoch(digits_coco):
    data = CocoData(digits_coco / "train" / "images", digits_coco / "train" / "annotations.json", train=True,
                    masks=False)
    seen = []
    for rank in range(2):
        loader = _loader(data, rank, 2)
        loader.set_epoch(0)
        indices = torch.cat([batch[2] for batch in loader]).tolist()
        assert len(indices) == len(loader) * 4 == len(data) // 8 * 4
        seen.append(set(indices))
    assert not seen[0] & seen[1]
    again = _loader(data, 0, 2)
    again.set_epoch(0)
    assert set(torch.cat([b[2] for b in again]).tolist()) == seen[0]  # seeded
    again.set_epoch(1)
    assert torch.cat([b[2] for b in again]).tolist() != sorted(seen[0])  # another order next epoch
    val = CocoData(digits_coco / "val" / "images", digits_coco / "val" / "annotations.json", train=False, masks=False)
    loaders = [_loader(val, rank, 7, train=False) for rank in range(7)]  # 120 images: 18 on ranks 0, 17 on the rest
    parts = [torch.cat([b[2] for b in loader]).tolist() for loader in loaders]
    assert sorted(i for part in parts for i in part if i >= 0) == list(range(len(val)))  # every image exactly once
    assert {len(part) for part in parts} == {18} and {len(loader) for loader in loaders} == {5}  # same batch counts
    assert parts[0].count(-1) == 0 and all(part.count(-1) == 1 for part in parts[1:])  # fillers say so
    assert torch.cat([b[2] for b in loaders[1]]).tolist() == parts[1]  # and again at the next evaluation


def test_a_resumed_epoch_yields_bit_identical_batches(digits_coco):
    data = CocoData(digits_coco / "train" / "images", digits_coco / "train" / "annotations.json", train=True,
                    masks=True)
    loader = _loader(data, 1, 2)
    loader.set_epoch(2)
    uninterrupted = _batches(loader)
    first = _loader(data, 1, 2)
    first.set_epoch(2)
    _batches(first, 3)
    state = first.state_dict()
    resumed = _loader(data, 1, 2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as it travels through a checkpoint
    rest = _batches(resumed)
    assert len(rest) == len(uninterrupted) - 3
    flipped = 0
    for (images_a, targets_a, idx_a), (images_b, targets_b, idx_b) in zip(uninterrupted[3:], rest):
        assert torch.equal(idx_a, idx_b)
        for a, b, ta, tb in zip(images_a, images_b, targets_a, targets_b):
            assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["masks"], tb["masks"])
        for image, index in zip(images_a, idx_a.tolist()):
            plain, _ = data.load(data.usable.index(index), flip=False)
            flipped += int(not torch.equal(image, plain))
    assert 0 < flipped < sum(len(b[2]) for b in rest)  # hflip 0.5: some flipped, some not


def test_reading_batches_leaves_the_global_random_stream_alone(digits_coco):
    """The stream dropout and Mask R-CNN's samplers draw from is restored from a checkpoint; an iterator started
    after the restore must not draw from it (it did: the DataLoader's base seed, one draw that a resumed run
    makes at another point of the stream, so its dropout masks differed from the uninterrupted run's)."""
    data = CocoData(digits_coco / "train" / "images", digits_coco / "train" / "annotations.json", train=True,
                    masks=False)
    for train in (True, False):
        torch.manual_seed(5)
        before = torch.get_rng_state()
        next(iter(_loader(data, 0, 2, train=train)))
        assert torch.equal(torch.get_rng_state(), before), train


def test_flipped_boxes_and_masks_move_with_the_image(digits_coco):
    data = CocoData(digits_coco / "train" / "images", digits_coco / "train" / "annotations.json", train=True,
                    masks=True)
    image, target = data.load(0, flip=False)
    flipped, flipped_target = data.load(0, flip=True)
    width = image.shape[-1]
    assert torch.equal(flipped, image.flip(-1)) and torch.equal(flipped_target["masks"], target["masks"].flip(-1))
    expected = target["boxes"].clone()
    expected[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    assert torch.equal(flipped_target["boxes"], expected)
    for mask, box in zip(flipped_target["masks"], flipped_target["boxes"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()


def test_crowd_regions_subpixel_boxes_and_empty_images_are_counted_and_left_out(digits_coco, tmp_path):
    content = json.loads((digits_coco / "val" / "annotations.json").read_text())
    anns = content["annotations"]
    first_image = anns[0]["image_id"]
    anns[0]["iscrowd"] = 1  # a crowd region
    anns[1]["bbox"] = [anns[1]["bbox"][0], anns[1]["bbox"][1], 0.5, anns[1]["bbox"][3]]  # under one pixel
    empty_id = content["images"][-1]["id"]
    content["annotations"] = [a for a in anns if a["image_id"] != empty_id]  # an image without annotations
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(content))
    data = CocoData(digits_coco / "val" / "images", path, train=True, masks=True)
    assert (data.stats.crowd, data.stats.degenerate, data.stats.images_without_annotations) == (1, 1, 1)
    assert len(data) == len(content["images"]) - 1 and empty_id not in [data.image_ids[i] for i in data.usable]
    position = [data.image_ids[i] for i in data.usable].index(first_image)
    _, target = data.load(position, flip=False)
    crowd_box = torch.tensor(anns[0]["bbox"][:2])
    assert not any(torch.equal(box[:2], crowd_box) for box in target["boxes"])  # the crowd region is not a target
    val = CocoData(digits_coco / "val" / "images", path, train=False, masks=False)
    assert len(val) == len(content["images"])  # evaluation reads every image, COCOeval handles crowds


def test_an_unreadable_image_is_replaced_counted_and_the_batch_count_kept(digits_coco, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(digits_coco / "val" / "images", images)
    content = json.loads((digits_coco / "val" / "annotations.json").read_text())
    broken = content["images"][2]["file_name"]
    (images / broken).write_bytes(b"not a jpeg")
    data = CocoData(images, digits_coco / "val" / "annotations.json", train=True, masks=False)
    loader = _loader(data, 0, 1, batch=4)
    batches = _batches(loader)
    assert len(batches) == len(loader) and all(len(b[0]) == 4 for b in batches)
    assert loader.decode_errors == 1
    assert 2 not in torch.cat([b[2] for b in batches]).tolist()  # dataset index of the broken image


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_detectors_give_torchvision_losses_and_detections_at_any_size(detector, one_torch_thread):
    from vilscale.orchestration.config import spec_from_dict
    from vilscale.tasks.detection import build_detector

    spec = spec_from_dict({"run_dir": "/tmp/unused", "task": "detection", "data": {"min_size": [80], "max_size": 120},
                           "model": {"name": "vil_nano", "img_size": 96, "window": 3, "num_classes": 10,
                                     "detector": detector, "anchor_sizes": [8, 16, 32, 64, 128], "fpn_channels": 32,
                                     "proposals_per_image": 50, "drop_path_rate": 0.0}})
    torch.manual_seed(0)
    model = build_detector(spec)
    images = [torch.rand(3, 90, 117), torch.rand(3, 100, 75)]  # odd sizes: resized, padded to the stride
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([3]),
                "masks": torch.zeros(1, 90, 117, dtype=torch.uint8)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 100, 75, dtype=torch.uint8)}]  # an image without objects trains too
    targets[0]["masks"][0, 12:50, 10:40] = 1
    losses = model(images, targets)
    expected = {"classification", "bbox_regression"} if detector == "retinanet" else {
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    body = [(name, p.grad) for name, p in model.named_parameters() if ".body." in name]
    assert body and all(grad is not None and grad.abs().sum() > 0 for _, grad in body), \
        [name for name, grad in body if grad is None or not grad.abs().sum() > 0]
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for output, image in zip(outputs, images):  # boxes in the input image's own coordinates
        assert output["boxes"].shape[1] == 4 and (output["boxes"][:, 2] <= image.shape[2] + 1e-3).all()
        if detector == "mask_rcnn":
            assert output["masks"].shape[-2:] == image.shape[-2:]
    assert model.shift_mode == "full"
    excluded = model.no_weight_decay()  # the ViL body's exclusions under the detector's names; FPN and heads decay
    assert excluded == {f"detector.backbone.body.{name}" for name in model.body.no_weight_decay()}
    assert any(name.endswith("pos_embed.row_embed") for name in excluded)
    assert not any(".fpn." in name or ".head." in name for name in excluded)


@pytest.mark.slow
def test_the_backbone_runs_at_detection_resolution(one_torch_thread):
    """800 x 1333 (COCO's test size): every stage map, global tokens dropped, the sizes the strides give."""
    from vilscale.model import create_model

    model = create_model("vil_tiny", backbone=True, attn_backend="chunked", img_size=224).eval()
    with torch.no_grad():
        maps = model(torch.rand(1, 3, 800, 1344))  # 1333 padded to the total stride, as the detector does
    assert [tuple(m.shape) for m in maps] == [(1, 48, 200, 336), (1, 96, 100, 168), (1, 192, 50, 84),
                                             (1, 384, 25, 42)]


@pytest.mark.slow
def test_prepare_digits_coco_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "digits-coco", str(tmp_path / "out"),
                             "--train-images", "4", "--val-images", "2"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out" / "train" / "images").glob("*.jpg"))) == 4
    bad = subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "digits-coco", str(tmp_path / "x"),
                          "--canvas", "20"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--canvas must be >= 48" in bad.stderr and not (tmp_path / "x").exists()


def test_multi_scale_training_and_activation_checkpointing_reach_the_detector(one_torch_thread):
    from vilscale.orchestration.config import spec_from_dict
    from vilscale.tasks.detection import build_detector

    spec = spec_from_dict({"run_dir": "/tmp/unused", "task": "detection",
                           "data": {"min_size": [64, 96], "max_size": 96},
                           "model": {"name": "vil_nano", "img_size": 96, "window": 2, "num_classes": 10,
                                     "anchor_sizes": [8, 16, 32, 64, 128], "fpn_channels": 32}})
    model = build_detector(spec)
    assert model.detector.transform.min_size == (64, 96)  # torchvision draws one per image in training
    torch.manual_seed(0)
    sizes = set()
    for _ in range(8):
        images, _ = model.detector.transform([torch.rand(3, 96, 96)])
        sizes.add(images.image_sizes[0])
    assert sizes == {(64, 64), (96, 96)}
    assert model.set_grad_checkpointing(True) == 3  # vil_nano's blocks, one per stage
    target = [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([2])}]
    losses = model([torch.rand(3, 96, 96)], target)
    sum(losses.values()).backward()
    stages = [(name, p.grad) for name, p in model.named_parameters() if ".body.stages." in name]
    assert stages and all(grad is not None and grad.abs().sum() > 0 for _, grad in stages), \
        [name for name, grad in stages if grad is None or not grad.abs().sum() > 0]


@pytest.mark.slow
def test_a_small_labelled_set_draws_its_training_canvases_from_few_digits(tmp_path):
    from vilscale.data.coco import first_of_each_class

    assert first_of_each_class([3, 1, 3, 3, 1, 2, 1], 2) == [0, 1, 2, 4, 5]
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "digits-coco", str(tmp_path / "out"),
                             "--train-images", "6", "--val-images", "2", "--train-digits-per-class", "3"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    info = {split: json.loads((tmp_path / "out" / split / "annotations.json").read_text())["info"]["description"]
            for split in ("train", "val")}
    assert info == {"train": "vilscale digits-coco train (seed 0, from 30 digits)",
                    "val": "vilscale digits-coco val (seed 0)"}
    same = subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "digits-coco", str(tmp_path / "all"),
                           "--train-images", "6", "--val-images", "2"], capture_output=True, text=True, cwd=REPO)
    assert same.returncode == 0, same.stderr
    assert (tmp_path / "out" / "val" / "images" / "val_000000.jpg").read_bytes() == \
        (tmp_path / "all" / "val" / "images" / "val_000000.jpg").read_bytes()
    assert (tmp_path / "out" / "train" / "images" / "train_000000.jpg").read_bytes() != \
        (tmp_path / "all" / "train" / "images" / "train_000000.jpg").read_bytes()
    bad = subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "digits-coco", str(tmp_path / "x"),
                          "--train-digits-per-class", "0"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "--train-digits-per-class 0 must be >= 1" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_an_unreadable_validation_image_is_left_out_of_evaluation_never_scored_twice(digits_coco, tmp_path):
    """Before, the next image took its place, so that image's detections were counted twice (extra false positives).
    Now the broken image is skipped, counted, and every other image is scored once."""
    from vilscale.orchestration.config import load_spec
    from vilscale.orchestration.training.distributed import RankContext
    from vilscale.tasks import make_task

    images = tmp_path / "images"
    shutil.copytree(digits_coco / "val" / "images", images)
    annotations = digits_coco / "val" / "annotations.json"
    content = json.loads(annotations.read_text())
    broken = content["images"][2]
    (images / broken["file_name"]).write_bytes(b"not a jpeg")
    spec = load_spec(REPO / "jobs" / "digits_retinanet.yaml", [
        f"data.train_annotations={annotations}", f"data.train_images={images}", f"data.val_annotations={annotations}",
        f"data.val_images={images}", "model.detections_per_image=5", "model.attn_backend=chunked",
        f"run_dir={tmp_path / 'run'}"])
    task = make_task(spec)
    torch.manual_seed(0)
    model = task.create_model()
    model.detector.score_thresh = 0.0  # every image gets its 5 detections, so each scored pass shows
    ctx = RankContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    result = task.evaluate(model, task.val_loader(ctx, batch_size=8), ctx, out_dir=tmp_path / "eval")
    per_image: dict[int, int] = {}
    for detection in json.loads((tmp_path / "eval" / "bbox.json").read_text()):
        per_image[detection["image_id"]] = per_image.get(detection["image_id"], 0) + 1
    assert broken["id"] not in per_image
    assert max(per_image.values()) <= 5, {i: n for i, n in per_image.items() if n > 5}  # one pass per image
    assert len(per_image) == len(content["images"]) - 1
    assert result["skipped_images"] == 1 and result["val_images"] == len(content["images"]) - 1
    assert "1 validation image(s) could not be read and were left out" in "\n".join(task.report(result))
