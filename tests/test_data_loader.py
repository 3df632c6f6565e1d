"""The sharded FFCV loader on real shards: exact mid-epoch resume, disjoint ranks, validation exactly once,
decoded pixels equal to the source, seeded crops and flips, checksum errors naming the shard.

FFCV's pipeline is compiled once per process (the first batch of the first loader pays it, ~10 s on two
cores); every other loader in this module reuses it, so the tests share module-scoped shards.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from vilscale.data import manifest as manifest_module
from vilscale.data.config import AugmentConfig, DataConfig
from vilscale.data.loader import ShardedLoader
from vilscale.data.manifest import DataError
from vilscale.data.samples import photo_imagefolder
from vilscale.data.writer import WriterSettings, prepare, prepare_digits, scan_digits, scan_imagefolder

pytestmark = pytest.mark.slow

DIGITS = DataConfig(img_size=32, num_workers=2, val_resize_ratio=1.0)


@pytest.fixture(scope="module", autouse=True)
def _private_checksum_cache(private_checksum_cache):
    yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(out, num_shards=3, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    source = photo_imagefolder(tmp_path_factory.mktemp("photos"), num_classes=2, per_class=5, min_side=64,
                               max_side=200)
    out = tmp_path_factory.mktemp("photo_shards")
    settings = WriterSettings(max_side=0, compress_probability=0.5, page_size=2 << 20)
    prepare(scan_imagefolder(source), out, num_shards=2, settings=settings, workers=2, progress=False)
    return source, out


def _loader(path, **kwargs):
    defaults = dict(rank=0, world_size=1, batch_size=32, seed=5, train=True, config=DIGITS, return_indices=True)
    return ShardedLoader(path, **{**defaults, **kwargs})


def _clone(batches):
    return [tuple(t.clone() for t in batch) for batch in batches]


@pytest.mark.budget(60)  # the quick tier's touch of the sharded loader (one numba compilation per process)
def test_exact_mid_epoch_resume(digits):
    manifest = digits / "train" / "manifest.json"
    reference = _loader(manifest, rank=1, world_size=2)
    reference.set_epoch(1)
    epoch1 = _clone(reference)
    next_epoch = _clone(reference)  # the loader moves on to epoch 2 by itself
    assert len(epoch1) == len(reference) == 1437 // 2 // 32

    interrupted = _loader(manifest, rank=1, world_size=2)
    interrupted.set_epoch(1)
    seen = []
    for step, batch in enumerate(interrupted):
        seen.append(batch[2].clone())
        if step == 2:
            break
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches_done"]) == (1, 3)

    resumed = _loader(manifest, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a trainer's epoch loop does after loading: must not rewind
    rest = _clone(resumed)
    assert len(rest) == len(epoch1) - 3
    for got, want in zip(rest, epoch1[3:]):
        for got_t, want_t in zip(got, want):
            assert torch.equal(got_t, want_t), "a resumed batch differs from the uninterrupted run"
    replayed = torch.cat(seen + [b[2] for b in rest])
    assert torch.equal(replayed, torch.cat([b[2] for b in epoch1])), "a sample was repeated or skipped"
    assert resumed.state_dict()["epoch"] == 2
    assert torch.equal(next(iter(resumed))[0], next_epoch[0][0])


def test_training_ranks_read_disjoint_samples_with_equal_steps(digits):
    manifest = digits / "train" / "manifest.json"
    world = 3
    loaders = [_loader(manifest, rank=r, world_size=world, batch_size=40) for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1
    indices = [torch.cat([b[2] for b in ld]) for ld in loaders]
    everything = torch.cat(indices)
    assert len(everything) == world * len(loaders[0]) * 40
    assert len(torch.unique(everything)) == len(everything), "two ranks read the same sample in one epoch"
    again = torch.cat([b[2] for b in loaders[0]])  # epoch 1 of rank 0: same samples, new order
    assert set(again.tolist()) | set(indices[0].tolist()) <= set(range(1437))
    assert not torch.equal(again, indices[0])


def test_validation_reads_every_sample_once_and_decodes_the_source_pixels(digits):
    manifest = digits / "val" / "manifest.json"
    world, batch = 3, 50
    loaders = [_loader(manifest, rank=r, world_size=world, batch_size=batch, train=False) for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1
    _, plan = scan_digits(32)
    writer_order = np.random.default_rng(0).permutation(len(plan.refs))  # the writer's shuffle (seed 0)
    seen = []
    for ld in loaders:
        for images, labels, indices in ld:
            valid = labels >= 0
            assert torch.equal(valid, indices >= 0)
            assert images.shape == (batch, 3, 32, 32) and images.dtype == torch.uint8
            for image, label, index in zip(images[valid], labels[valid], indices[valid]):
                source = writer_order[int(index)]
                assert int(label) == plan.labels[source]
                assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(plan.refs[source][1]))
            seen.append(indices[valid])
    assert sorted(torch.cat(seen).tolist()) == list(range(360))


def test_crops_of_jpeg_shards_match_pillow_and_flips_are_exact(photos):
    from PIL import Image

    source, out = photos
    square = AugmentConfig(rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=0.0)
    config = DataConfig(img_size=48, num_workers=2)
    plain = _loader(out / "manifest.json", batch_size=4, config=config, augment=square)
    flipped = _loader(out / "manifest.json", batch_size=4, config=config,
                      augment=AugmentConfig(rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=1.0))
    plan = scan_imagefolder(source)
    writer_order = np.random.default_rng(0).permutation(len(plan.refs))
    errors = []
    for (images, labels, indices), (flip_images, _, flip_indices) in zip(plain, flipped):
        assert torch.equal(indices, flip_indices)
        assert torch.equal(flip_images, images.flip(-1)), "hflip=1 must mirror exactly the unflipped crop"
        for image, label, index in zip(images, labels, indices):
            ref = plan.refs[writer_order[int(index)]]
            assert int(label) == plan.labels[writer_order[int(index)]]
            with Image.open(ref[1]) as photo:
                w, h = photo.size
                side = min(w, h)
                box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
                expected = np.asarray(photo.convert("RGB").crop(box).resize((48, 48), Image.BILINEAR), np.float32)
            errors.append(np.abs(image.permute(1, 2, 0).numpy().astype(np.float32) - expected).mean())
    assert len(errors) == 8  # 10 images, batch 4, drop_last
    assert max(errors) < 6, f"decoded crops differ from Pillow's by {max(errors):.1f} grey levels on average"


def test_random_crops_are_seeded_and_differ_between_steps(photos):
    _, out = photos
    config = DataConfig(img_size=40, num_workers=2)
    first = _clone(_loader(out / "manifest.json", batch_size=4, config=config, seed=9))
    second = _clone(_loader(out / "manifest.json", batch_size=4, config=config, seed=9))
    other = _clone(_loader(out / "manifest.json", batch_size=4, config=config, seed=10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert not all(torch.equal(a[0], c[0]) for a, c in zip(first, other))


def test_checksum_mismatch_names_the_shard_and_verification_is_cached(digits, tmp_path, monkeypatch):
    copy = tmp_path / "val"
    shutil.copytree(digits / "val", copy)
    calls = []
    real = manifest_module.sha256_of
    monkeypatch.setattr(manifest_module, "sha256_of", lambda path: calls.append(path) or real(path))
    _loader(copy / "manifest.json", train=False)
    assert len(calls) == 3
    _loader(copy / "manifest.json", train=False)
    assert len(calls) == 3, "an unchanged, verified shard was hashed again"
    shard = sorted(copy.glob("shard-*.beton"))[1]
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    shard.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=f"shard {shard}.*corrupt"):
        _loader(copy / "manifest.json", train=False)
    # a rank that does not read the damaged shard is not held up by it
    _loader(copy / "manifest.json", train=False, rank=0, world_size=3)


def test_state_from_another_world_size_is_refused_mid_epoch(digits):
    manifest = digits / "train" / "manifest.json"
    state = {**_loader(manifest, world_size=2).state_dict(), "batches_done": 4}
    with pytest.raises(ValueError, match="world_size=2 but this loader has world_size=4"):
        _loader(manifest, world_size=4).load_state_dict(state)
    at_boundary = {**state, "batches_done": 0, "epoch": 3}
    other = _loader(manifest, world_size=4)
    other.load_state_dict(at_boundary)
    assert other.epoch == 3


def test_process_cache_reads_the_same_batches_as_the_os_cache(digits):
    """os_cache=False (FFCV's per-process page cache, for data larger than RAM) compiles its own reader."""
    manifest = digits / "train" / "manifest.json"
    private = dataclasses.replace(DIGITS, os_cache=False)
    for train in (True, False):
        shared = _clone(_loader(manifest, rank=1, world_size=2, batch_size=50, train=train))
        own = _clone(_loader(manifest, rank=1, world_size=2, batch_size=50, train=train, config=private))
        assert len(own) == len(shared)
        assert all(torch.equal(x, y) for a, b in zip(own, shared) for x, y in zip(a, b))


@pytest.mark.gpu
def test_cuda_batches_equal_cpu_batches_and_augment_on_device(digits):
    from vilscale.data.augment import BatchAugment

    manifest = digits / "train" / "manifest.json"
    on_cpu = _clone(_loader(manifest, batch_size=64))
    on_gpu = list(_loader(manifest, batch_size=64, device="cuda"))
    assert on_gpu[0][0].device.type == "cuda" and on_gpu[0][0].is_contiguous()
    for got, want in zip(on_gpu, on_cpu):
        for got_t, want_t in zip(got, want):
            assert torch.equal(got_t.cpu(), want_t)
    augment = BatchAugment(AugmentConfig(), num_classes=10, seed=0)
    images, labels, _ = on_gpu[0]
    first = augment(images, labels, step=3)
    second = augment(images, labels, step=3)
    assert first[0].device.type == "cuda" and torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
