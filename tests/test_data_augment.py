"""Batch augmentation: reproducible from (seed, rank, step), soft targets that sum to one, mixup/cutmix and
label smoothing as the paper's recipe defines them, every part switchable off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vilscale.data.augment import BatchAugment, normalize, one_hot_smoothed, soft_target_cross_entropy
from vilscale.data.config import AugmentConfig

OFF = dict(hflip=0.0, randaugment=False, color_jitter=0.0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0,
           label_smoothing=0.0)


def _batch(n=8, size=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return images, labels


def test_full_recipe_is_reproducible_from_seed_rank_and_step():
    images, labels = _batch()
    augment = BatchAugment(AugmentConfig(), num_classes=10, seed=3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a_x, a_y = augment(images, labels, step=7)
    assert torch.equal(torch.rand(1), before), "the augmentation consumed the global torch RNG"
    augment(images, labels, step=8)  # calls in between must not matter
    b_x, b_y = BatchAugment(AugmentConfig(), num_classes=10, seed=3)(images, labels, step=7)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    c_x, _ = augment(images, labels, step=9)
    d_x, _ = BatchAugment(AugmentConfig(), num_classes=10, seed=3, rank=1)(images, labels, step=7)
    assert not torch.equal(a_x, c_x) and not torch.equal(a_x, d_x)
    assert a_x.dtype == torch.float32 and a_x.shape == images.shape
    assert a_y.shape == (8, 10) and torch.allclose(a_y.sum(1), torch.ones(8))


def test_everything_off_is_plain_normalisation_and_one_hot():
    images, labels = _batch()
    x, y = BatchAugment(AugmentConfig(**OFF), num_classes=10, seed=0)(images, labels, step=0)
    assert torch.allclose(x, normalize(images), atol=1e-6)
    assert torch.equal(y, F.one_hot(labels, 10).float())


def test_label_smoothing_targets():
    y = one_hot_smoothed(torch.tensor([2, 0]), 5, 0.1)
    assert torch.allclose(y[0], torch.tensor([0.02, 0.02, 0.92, 0.02, 0.02]))
    logits = torch.randn(2, 5)
    assert torch.allclose(soft_target_cross_entropy(logits, y),
                          F.cross_entropy(logits, torch.tensor([2, 0]), label_smoothing=0.1), atol=1e-6)


def test_mixup_blends_images_and_targets_with_the_same_weight():
    images, labels = _batch(n=6)
    labels = torch.arange(6)
    config = AugmentConfig(**{**OFF, "mixup_alpha": 0.8})
    x, y = BatchAugment(config, num_classes=6, seed=1)(images, labels, step=3)
    lam = float(y[0, 0])  # sample 0 is mixed with sample 5
    assert torch.isclose(y[0, 5], torch.tensor(1 - lam)) and 0 < lam < 1
    expected = normalize(images[0:1]) * lam + normalize(images[5:6]) * (1 - lam)
    assert torch.allclose(x[0:1], expected, atol=1e-5)


def test_cutmix_pastes_a_box_whose_area_is_the_target_weight():
    images, _ = _batch(n=4, size=32)
    labels = torch.arange(4)
    config = AugmentConfig(**{**OFF, "cutmix_alpha": 1.0})
    x, y = BatchAugment(config, num_classes=4, seed=2)(images, labels, step=11)
    plain, partner = normalize(images[0:1])[0], normalize(images[3:4])[0]
    from_partner = (x[0] == partner).all(0) & (x[0] != plain).any(0)
    pasted = float(from_partner.float().mean())
    assert y[0, 3] == pytest.approx(pasted, abs=0.02), "the target weight must be the pasted area"
    assert torch.allclose(y.sum(1), torch.ones(4))


def test_switch_probability_picks_cutmix_or_mixup():
    images, labels = _batch(n=4, size=16)
    config = AugmentConfig(**{**OFF, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5})
    augment = BatchAugment(config, num_classes=10, seed=0)
    kinds = set()
    for step in range(30):
        x, _ = augment(images, labels, step)
        same_as_some_source = ((x[0] == normalize(images[0:1])[0]) | (x[0] == normalize(images[3:4])[0])).all()
        kinds.add("cutmix" if bool(same_as_some_source) else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_randaugment_and_erasing_change_images_and_jitter_only_without_randaugment():
    images, labels = _batch(n=16)
    ra = BatchAugment(AugmentConfig(**{**OFF, "randaugment": True}), num_classes=10, seed=0)
    x, _ = ra(images, labels, step=1)
    assert not torch.allclose(x, normalize(images)), "RandAugment changed nothing"
    assert ra._jitter is None  # timm's rule: colour jitter only when RandAugment is off
    jitter = BatchAugment(AugmentConfig(**{**OFF, "color_jitter": 0.4}), num_classes=10, seed=0)
    assert not torch.allclose(jitter(images, labels, step=1)[0], normalize(images))
    erase = BatchAugment(AugmentConfig(**{**OFF, "random_erasing": 1.0}), num_classes=10, seed=0)
    erased, _ = erase(images, labels, step=1)
    assert ((erased == 0).all(1).flatten(1).sum(1) > 0).all(), "every image must get an erased (zero) box"


def test_validation_filler_labels_are_refused_with_a_hint():
    images, labels = _batch(n=2)
    with pytest.raises(ValueError, match="filler"):
        BatchAugment(AugmentConfig(), num_classes=10, seed=0)(images, torch.tensor([1, -1]), step=0)
