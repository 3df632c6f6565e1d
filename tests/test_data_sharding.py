"""Which samples each rank reads (pure functions, no FFCV): disjoint, complete, balanced, seeded orders,
equal step counts, page-friendly locality; plus the data config's validation."""

from __future__ import annotations

import numpy as np
import pytest

from vilscale.data.config import AugmentConfig, DataConfig
from vilscale.data.sharding import assign_pieces, epoch_order, segments, steps_per_epoch

SHARD_LAYOUTS = {
    "one": [1000],
    "uneven": [5, 0, 17, 3, 250, 1, 1, 90],
    "equal": [64] * 13,
    "tiny": [1, 2, 3],
}


def _covered(sizes, world_size):
    """Global indices of every rank (from the pieces), checked disjoint and complete."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    per_rank = []
    for rank in range(world_size):
        pieces = assign_pieces(sizes, world_size, rank)
        per_rank.append(np.concatenate([np.arange(offsets[p.shard] + p.start, offsets[p.shard] + p.stop)
                                        for p in pieces] + [np.empty(0, int)]))
    return per_rank


@pytest.mark.parametrize("layout", SHARD_LAYOUTS)
@pytest.mark.parametrize("world_size", range(1, 9))
def test_assignment_is_disjoint_complete_and_balanced(layout, world_size):
    sizes = SHARD_LAYOUTS[layout]
    per_rank = _covered(sizes, world_size)
    everything = np.concatenate(per_rank)
    assert len(everything) == sum(sizes)
    assert len(np.unique(everything)) == sum(sizes), "two ranks read the same sample"
    counts = [len(r) for r in per_rank]
    assert max(counts) - min(counts) <= 1


def test_assignment_at_1024_ranks_and_4096_shards():
    rng = np.random.default_rng(0)
    sizes = rng.integers(2000, 4000, size=4096)  # ~12M samples, ImageNet-21K scale
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.full(int(offsets[-1]), -1, dtype=np.int32)
    counts, shards_per_rank = [], []
    for rank in range(1024):
        pieces = assign_pieces(sizes, 1024, rank)
        shards_per_rank.append(len(pieces))
        counts.append(sum(len(p) for p in pieces))
        for p in pieces:
            span = owner[offsets[p.shard] + p.start: offsets[p.shard] + p.stop]
            assert (span == -1).all(), f"rank {rank} overlaps another rank in shard {p.shard}"
            span[:] = rank
    assert (owner >= 0).all(), "some samples belong to no rank"
    assert max(counts) - min(counts) <= 1
    # 4 shards per rank on average: a rank touches at most 2 partial shards beyond its whole ones.
    assert max(shards_per_rank) <= int(np.ceil(max(counts) / sizes.min())) + 2


def _rank_orders(sizes, world_size, **kwargs):
    return [epoch_order(sizes, world_size=world_size, rank=r, **kwargs) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_training_epoch_reads_every_sample_once_without_drop_last(world_size):
    sizes = SHARD_LAYOUTS["uneven"]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    orders = _rank_orders(sizes, world_size, batch_size=7, seed=3, epoch=2, train=True, drop_last=False, block=4,
                          window=2)
    assert len({o.steps for o in orders}) == 1, "ranks disagree on the number of steps"
    seen = []
    for rank, order in enumerate(orders):
        mine = offsets[order.shard] + order.local
        own = _covered(sizes, world_size)[rank]
        assert set(mine) == set(own), "a rank read a sample outside its range or missed one"
        real = len(own)
        assert len(np.unique(mine[:real])) == real, "the first pass over a rank's samples repeats one"
        seen.append(mine[:real])
    assert sorted(np.concatenate(seen)) == list(range(sum(sizes)))


def test_training_epoch_with_drop_last_is_full_batches_without_repeats():
    sizes, world_size, batch = SHARD_LAYOUTS["uneven"], 3, 16
    orders = _rank_orders(sizes, world_size, batch_size=batch, seed=0, epoch=0, train=True, drop_last=True)
    steps = steps_per_epoch(sum(sizes), world_size, batch, train=True, drop_last=True)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    everything = np.concatenate([offsets[o.shard] + o.local for o in orders])
    assert all(o.steps == steps and len(o.shard) == steps * batch for o in orders)
    assert len(np.unique(everything)) == len(everything) == world_size * steps * batch
    assert sum(sizes) - len(everything) < world_size * (batch + 1)


def test_order_is_seeded_by_seed_epoch_and_world_size():
    sizes = SHARD_LAYOUTS["equal"]
    kwargs = dict(world_size=2, rank=1, batch_size=8, train=True)
    a = epoch_order(sizes, seed=1, epoch=4, **kwargs)
    b = epoch_order(sizes, seed=1, epoch=4, **kwargs)
    assert np.array_equal(a.shard, b.shard) and np.array_equal(a.local, b.local)
    for other in (epoch_order(sizes, seed=1, epoch=5, **kwargs), epoch_order(sizes, seed=2, epoch=4, **kwargs)):
        assert not np.array_equal(a.local, other.local), "the order ignores the epoch or the seed"


def test_order_stays_inside_few_blocks_of_one_shard():
    """Page-cache friendliness: any stretch of `window` blocks' worth of reads touches few blocks."""
    block, window = 16, 4
    order = epoch_order([4096, 4096], world_size=1, rank=0, batch_size=32, seed=0, epoch=0, train=True,
                        block=block, window=window)
    stretch = block * window
    for begin in range(0, len(order.local) - stretch, stretch):
        shard = order.shard[begin:begin + stretch]
        blocks = {(s, loc // block) for s, loc in zip(shard, order.local[begin:begin + stretch])}
        assert len(blocks) <= window, f"reads {begin}..{begin + stretch} touch {len(blocks)} blocks"
    # and yet the order is far from sequential
    assert np.mean(np.diff(order.local[order.shard == order.shard[0]]) == 1) < 0.2


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_validation_reads_every_sample_exactly_once_in_sequence(world_size):
    sizes = [50, 37, 13]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    orders = _rank_orders(sizes, world_size, batch_size=16, seed=0, epoch=0, train=False)
    assert len({o.steps for o in orders}) == 1
    valid = [offsets[o.shard][o.valid] + o.local[o.valid] for o in orders]
    assert list(np.concatenate(valid)) == list(range(sum(sizes))), "not every sample once, in order"
    filler = sum(int((~o.valid).sum()) for o in orders)
    assert filler == orders[0].steps * 16 * world_size - sum(sizes)


def test_too_little_data_for_the_ranks_is_an_error_that_says_what_to_change():
    with pytest.raises(ValueError, match="lower the per-rank batch size"):
        steps_per_epoch(100, 8, 64, train=True, drop_last=True)
    assert steps_per_epoch(100, 8, 64, train=True, drop_last=False) == 1
    with pytest.raises(ValueError, match="fewer ranks"):
        steps_per_epoch(3, 8, 1, train=True, drop_last=False)
    # validation still works: ranks without a sample get one batch of filler
    orders = _rank_orders([3], 8, batch_size=2, seed=0, epoch=0, train=False)
    assert sorted(np.concatenate([o.local[o.valid] for o in orders])) == [0, 1, 2]


def test_segments_split_a_batch_by_shard():
    assert segments(np.array([2, 2, 2])) == [(0, 3)]
    assert segments(np.array([2, 2, 5, 5, 1])) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize(("cls", "field", "value", "fragment"), [
    (DataConfig, "img_size", 4, "data.img_size=4"),
    (DataConfig, "val_resize_ratio", 1.5, "data.val_resize_ratio=1.5"),
    (DataConfig, "std", (0.2, 0.0, 0.2), "data.std"),
    (AugmentConfig, "rrc_scale", (0.5, 0.1), "augment.rrc_scale=(0.5, 0.1)"),
    (AugmentConfig, "random_erasing", 1.5, "augment.random_erasing=1.5"),
    (AugmentConfig, "randaugment_magnitude", 12.0, "augment.randaugment_magnitude=12.0"),
    (AugmentConfig, "mixup_alpha", -1.0, "augment.mixup_alpha=-1.0"),
])
def test_config_errors_name_the_field_and_value(cls, field, value, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        cls(**{field: value})


def test_config_defaults_are_the_papers_recipe_and_every_part_can_be_off():
    paper = AugmentConfig()
    assert paper.rrc_scale == (0.08, 1.0) and paper.randaugment and paper.randaugment_magnitude == 9
    assert (paper.mixup_alpha, paper.cutmix_alpha, paper.switch_prob) == (0.8, 1.0, 0.5)
    assert (paper.random_erasing, paper.label_smoothing, paper.color_jitter) == (0.25, 0.1, 0.4)
    off = AugmentConfig(hflip=0, randaugment=False, color_jitter=0, random_erasing=0, mixup_alpha=0, cutmix_alpha=0,
                        label_smoothing=0)
    assert not off.mixes
    assert DataConfig().val_resize_ratio == pytest.approx(224 / 256)
