"""ADE20K-format data for semantic segmentation: `vilscale prepare digits-coco` writes label maps that agree with its
COCO masks, reduce_zero_label moves the labels as ADE20K needs, the training transforms move image and label map
together and cap one class's share of a crop, and the loader is disjoint per rank, seeded per epoch, resumes bit
for bit and replaces unreadable files, counting them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vilscale.data.ade import AdeData, AdeLoader, TrainAugment

REPO = Path(__file__).resolve().parents[1]

IGNORE = 255


def _data(digits_coco, split="train", *, train=True, reduce_zero_label=False, **augment):
    settings = TrainAugment(**{"crop_size": 64, "ignore_index": IGNORE, **augment})
    return AdeData(digits_coco / split / "images", digits_coco / split / "masks", train=train,
                   reduce_zero_label=reduce_zero_label, ignore_index=IGNORE, augment=settings)


def _loader(data, rank, world, *, batch=4, seed=0, train=True, hflip=0.5):
    return AdeLoader(data, rank=rank, world_size=world, batch_size=batch, seed=seed, train=train, hflip=hflip)


def test_label_maps_hold_each_digit_as_its_category_on_its_strokes(digits_coco):
    from pycocotools.coco import COCO

    coco = COCO(str(digits_coco / "val" / "annotations.json"))
    for image in coco.loadImgs(coco.getImgIds()):
        expected = np.zeros((image["height"], image["width"]), dtype=np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            expected[coco.annToMask(ann) > 0] = ann["category_id"]  # category id = digit + 1
        stored = np.asarray(Image.open(digits_coco / "val" / "masks" / image["file_name"].replace(".jpg", ".png")))
        assert np.array_equal(stored, expected), image["file_name"]


def test_reduce_zero_label_makes_background_ignore_and_shifts_the_digits(digits_coco):
    plain, reduced = _data(digits_coco, "val", train=False), _data(digits_coco, "val", train=False,
                                                                   reduce_zero_label=True)
    stored = torch.from_numpy(np.asarray(Image.open(plain.masks / f"{plain.name(0)}.png")).astype(np.int64))
    _, target = plain.load(0)
    assert torch.equal(target["mask"], stored)  # evaluation keeps the label map at its own size
    _, target = reduced.load(0)
    assert torch.equal(target["mask"][stored == 0], torch.full_like(stored[stored == 0], IGNORE))
    assert torch.equal(target["mask"][stored > 0], stored[stored > 0] - 1)
    assert (stored > 0).any()


def test_evaluation_resizes_the_image_to_the_crop_side(digits_coco):
    data = _data(digits_coco, "val", train=False, crop_size=48)
    image, target = data.load(3)
    assert image.shape == (3, 48, 48) and target["mask"].shape == (96, 96)


def test_a_training_sample_is_a_crop_whose_flip_moves_image_and_labels_together(digits_coco):
    data = _data(digits_coco, scale_range=(1.0, 2.0))  # no padding (that stays right and bottom, after the flip)
    for key in [(0, 0, p) for p in range(6)]:
        image, target = data.load(key[2], flip=False, key=key)
        flipped, flipped_target = data.load(key[2], flip=True, key=key)
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and target["mask"].shape == (64, 64)
        assert torch.equal(flipped, image.flip(-1)) and torch.equal(flipped_target["mask"], target["mask"].flip(-1))
    plain, _ = data.read(0)
    scales = {tuple(data.load(0, key=(0, epoch, 0))[0].float().mean(dim=(1, 2)).tolist()) for epoch in range(4)}
    assert len(scales) == 4 and plain.shape == (3, 96, 96)  # another resize, crop and colour every epoch


def test_a_small_image_is_padded_with_ignore(digits_coco):
    data = _data(digits_coco, crop_size=64, scale_range=(0.25, 0.25), photometric=False)  # 96 -> 16 pixels
    image, target = data.load(0, key=(0, 0, 0))
    assert image.shape == (3, 64, 64)
    assert (target["mask"][16:, :] == IGNORE).all() and (target["mask"][:, 16:] == IGNORE).all()
    assert (target["mask"][:16, :16] != IGNORE).all()
    assert torch.equal(image[:, 20, 20], torch.tensor(TrainAugment().pad_colour, dtype=torch.uint8))


def test_crops_are_drawn_again_while_one_class_holds_more_than_the_cap(tmp_path):
    """64x64 maps, class 0 in columns 0-39, class 1 in 40-63; a 32 crop keeps class 0 under 75% only when it starts
    at column 17 or later (16 of 33 positions): with the cap almost every crop does, without it about half."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[:, 40:] = 1
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(labels).save(tmp_path / "masks" / "a.png")

    def share_of_class_0(cap):
        data = AdeData(tmp_path / "images", tmp_path / "masks", train=True, reduce_zero_label=False,
                       ignore_index=IGNORE, augment=TrainAugment(crop_size=32, scale_range=(2.0, 2.0),
                                                                 cat_max_ratio=cap, photometric=False))
        return [(data.load(0, key=(0, epoch, 0))[1]["mask"] == 0).float().mean().item() for epoch in range(40)]

    capped, free = share_of_class_0(0.75), share_of_class_0(1.0)
    assert sum(share < 0.75 for share in capped) >= 39
    assert 10 <= sum(share < 0.75 for share in free) <= 30


def test_ranks_read_disjoint_parts_in_a_seeded_order_and_resume_bit_for_bit(digits_coco):
    data = _data(digits_coco, "val")  # training transforms on the 120 val canvases (fewer to read)
    parts = []
    for rank in range(2):
        loader = _loader(data, rank, 2, batch=8)
        loader.set_epoch(1)
        parts.append(set(torch.cat([indices for _, _, indices in loader]).tolist()))
        assert len(parts[-1]) == len(loader) * 8 == len(data) // 16 * 8
    assert not parts[0] & parts[1]

    loader = _loader(data, 1, 2, batch=8)
    loader.set_epoch(2)
    uninterrupted = list(loader)
    first = _loader(data, 1, 2, batch=8)
    first.set_epoch(2)
    for count, _ in enumerate(first, start=1):
        if count == 3:
            break
    resumed = _loader(data, 1, 2, batch=8)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as it travels through a checkpoint
    rest = list(resumed)
    assert len(rest) == len(uninterrupted) - 3 > 0
    for (images_a, targets_a, indices_a), (images_b, targets_b, indices_b) in zip(uninterrupted[3:], rest):
        assert torch.equal(indices_a, indices_b)
        for a, b, ta, tb in zip(images_a, images_b, targets_a, targets_b):
            assert torch.equal(a, b) and torch.equal(ta["mask"], tb["mask"])
    other_epoch = _loader(data, 1, 2, batch=8)
    other_epoch.set_epoch(3)
    assert torch.cat([i for _, _, i in other_epoch]).tolist() != torch.cat([i for _, _, i in uninterrupted]).tolist()


def test_validation_reads_every_image_once_across_ranks(digits_coco):
    data = _data(digits_coco, "val", train=False)
    loaders = [_loader(data, rank, 7, train=False) for rank in range(7)]  # 120 images: 18 on rank 0, 17 on the rest
    parts = [torch.cat([indices for _, _, indices in loader]).tolist() for loader in loaders]
    assert sorted(i for part in parts for i in part if i >= 0) == list(range(len(data)))
    assert {len(part) for part in parts} == {18} and all(part.count(-1) == 1 for part in parts[1:])


@pytest.mark.parametrize("broken", ["image", "mask"])
def test_an_unreadable_file_is_replaced_counted_and_the_batch_count_kept(digits_coco, tmp_path, broken):
    shutil.copytree(digits_coco / "val", tmp_path / "val")
    data = _data(tmp_path, "val")
    name = data.files[2].stem
    folder, suffix = ("images", "jpg") if broken == "image" else ("masks", "png")
    path = tmp_path / "val" / folder / f"{name}.{suffix}"
    path.write_bytes(b"not an image")
    loader = _loader(data, 0, 1, batch=4)
    batches = list(loader)
    assert len(batches) == len(loader) and all(len(images) == 4 for images, _, _ in batches)
    assert loader.decode_errors == 1
    assert 2 not in torch.cat([indices for _, _, indices in batches]).tolist()


def test_an_unreadable_validation_image_is_left_out_of_the_confusion_matrix_never_counted_twice(digits_coco,
                                                                                              tmp_path):
    """Before, the next image took its place and its pixels entered the confusion matrix twice."""
    from vilscale.orchestration.config import load_spec
    from vilscale.orchestration.training.distributed import RankContext
    from vilscale.tasks import make_task

    shutil.copytree(digits_coco / "val", tmp_path / "val")
    data = _data(tmp_path, "val", train=False)
    name = data.files[2].stem
    (tmp_path / "val" / "images" / f"{name}.jpg").write_bytes(b"not an image")
    val = tmp_path / "val"
    spec = load_spec(REPO / "jobs" / "digits_semfpn.yaml", [
        f"data.train_images={val / 'images'}", f"data.train_masks={val / 'masks'}", f"data.val_images={val / 'images'}",
        f"data.val_masks={val / 'masks'}", "model.attn_backend=chunked", f"run_dir={tmp_path / 'run'}"])
    task = make_task(spec)
    ctx = RankContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    result = task.evaluate(task.create_model(), task.val_loader(ctx, batch_size=8), ctx, out_dir=tmp_path / "eval")
    readable = [i for i in range(len(data)) if i != 2]
    assert result["scored_pixels"] == sum(int(data.read(i)[1].numel()) for i in readable)  # no ignore in digits
    assert result["skipped_images"] == 1 and result["val_images"] == len(data) - 1
    assert sorted(p.stem for p in (tmp_path / "eval" / "predictions").glob("*.png")) == sorted(
        data.files[i].stem for i in readable)
    assert "1 validation image(s) could not be read" in "\n".join(task.report(result))
