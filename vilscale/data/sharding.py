"""Which samples each rank reads, and in what order: pure functions of the shard sizes, the world size,
the seed and the epoch (no files, no FFCV), so they are tested exhaustively on their own.

Assignment. The shards of a manifest are laid end to end as one sequence of `N` samples (the writer
shuffled the samples before cutting them into shards, so every shard is a random mix of classes). Rank
`r` of `W` owns one contiguous range of that sequence, of `N // W` or `N // W + 1` samples: mostly whole
shards, plus at most two partial shards at the ends of its range. The ranges are disjoint, cover every
sample, differ in size by at most one, and do not depend on the epoch, so a node's page cache keeps
holding the shards its ranks read (the global batch still mixes all ranks' samples every step).

Order. Each epoch a rank visits its pieces (one per shard it touches) in a shuffled order. Inside a
piece the samples are cut into blocks of `block` consecutive samples (about one FFCV page); the blocks
are shuffled, and then samples are shuffled freely inside windows of `window` consecutive blocks. At
any moment a rank reads from at most `window` blocks of one shard: page-cache and readahead friendly,
yet a different order every epoch. Everything is seeded by (seed, epoch, world size, rank).

Steps. Every rank takes the same number of steps. Training with `drop_last` takes `(N // W) // batch`
steps and skips the rest of each rank's order (fewer than `batch + 1` samples per rank; which ones
changes every epoch). Training without `drop_last` takes `ceil(ceil(N / W) / batch)` steps and fills the
last batch of a rank from the start of its own order (a few samples seen twice). Validation takes
`ceil(ceil(N / W) / batch)` steps in sequential order and marks the filler entries invalid (-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Piece:
    """Samples ``[start, stop)`` of shard ``shard`` (indices local to the shard)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def rank_bounds(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """Global range ``[lo, hi)`` of rank ``rank``: the first ``N % W`` ranks get one sample more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not valid for world_size={world_size}; need 0 <= rank < world_size")
    base, extra = divmod(num_samples, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def assign_pieces(shard_sizes: Sequence[int], world_size: int, rank: int) -> list[Piece]:
    """The pieces of shards that rank ``rank`` of ``world_size`` owns (disjoint, complete, balanced to ±1)."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ValueError(f"shard sizes must be a list of non-negative counts, got {shard_sizes!r}")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    lo, hi = rank_bounds(int(starts[-1]), world_size, rank)
    pieces = []
    first = int(np.searchsorted(starts, lo, side="right")) - 1
    for shard in range(max(first, 0), len(sizes)):
        if starts[shard] >= hi:
            break
        start = max(lo, int(starts[shard])) - int(starts[shard])
        stop = min(hi, int(starts[shard + 1])) - int(starts[shard])
        if stop > start:
            pieces.append(Piece(shard, start, stop))
    return pieces


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, *, train: bool, drop_last: bool) -> int:
    """Number of batches every rank yields per epoch (identical on all ranks)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    smallest, largest = num_samples // world_size, -(-num_samples // world_size)
    if train and drop_last:
        steps = smallest // batch_size
        if steps == 0:
            raise ValueError(
                f"{num_samples} training samples cannot fill one batch of {batch_size} on each of {world_size} "
                f"ranks; lower the per-rank batch size to at most {max(smallest, 1)}, use fewer ranks, or set "
                f"data.drop_last=false")
        return steps
    if smallest == 0 and (train or largest == 0):
        raise ValueError(f"{num_samples} samples cannot give every one of {world_size} ranks a sample; use fewer ranks")
    return -(-largest // batch_size)


def _shuffled_piece_order(n: int, block: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)``: blocks of ``block`` shuffled, then samples shuffled within windows."""
    position = np.arange(n, dtype=np.int64)
    num_blocks = -(-n // block)
    block_rank = np.empty(num_blocks, dtype=np.int64)
    block_rank[rng.permutation(num_blocks)] = np.arange(num_blocks)
    # Visit blocks in shuffled order, samples of a block contiguously.
    by_block = position[np.lexsort((position, block_rank[position // block]))]
    # Then shuffle freely inside each window of `window` visited blocks.
    window_of = np.arange(n, dtype=np.int64) // (block * window)
    return by_block[np.lexsort((rng.random(n), window_of))]


@dataclass(frozen=True, slots=True)
class EpochOrder:
    """What one rank reads in one epoch: ``steps * batch`` entries, batch ``k`` is entries ``[k*B, (k+1)*B)``.

    ``shard[i]``/``local[i]`` name the sample; ``valid[i]`` is False for validation filler entries (which
    repeat the rank's last real sample so the batch stays full, and must be ignored by the metric).
    """

    shard: np.ndarray  # (steps * B,) int64
    local: np.ndarray  # (steps * B,) int64
    valid: np.ndarray  # (steps * B,) bool
    steps: int
    batch_size: int


def epoch_order(shard_sizes: Sequence[int], *, world_size: int, rank: int, batch_size: int, seed: int, epoch: int,
                train: bool, drop_last: bool = True, block: int = 64, window: int = 8) -> EpochOrder:
    """The samples rank ``rank`` reads in ``epoch``, deterministic given (seed, epoch, world_size, rank)."""
    pieces = assign_pieces(shard_sizes, world_size, rank)
    steps = steps_per_epoch(int(np.sum(shard_sizes)), world_size, batch_size, train=train, drop_last=drop_last)
    if train:
        rng = np.random.default_rng([seed, epoch, world_size, rank])
        pieces = [pieces[i] for i in rng.permutation(len(pieces))]
        locals_ = [p.start + _shuffled_piece_order(len(p), block, window, rng) for p in pieces]
    else:
        locals_ = [np.arange(p.start, p.stop, dtype=np.int64) for p in pieces]
    shard = np.concatenate([np.full(len(p), p.shard, dtype=np.int64) for p in pieces] + [np.empty(0, np.int64)])
    local = np.concatenate(locals_ + [np.empty(0, np.int64)])
    wanted = steps * batch_size
    valid = np.ones(wanted, dtype=bool)
    if len(shard) >= wanted:
        shard, local = shard[:wanted], local[:wanted]
    elif train:
        # Fill up from the start of this rank's own order (np.resize repeats cyclically).
        shard, local = np.resize(shard, wanted), np.resize(local, wanted)
    else:
        valid[len(shard):] = False
        fill = wanted - len(shard)
        # Filler repeats a real sample (this rank's last, or the dataset's first if the rank has none).
        last_shard = int(shard[-1]) if len(shard) else int(np.flatnonzero(np.asarray(shard_sizes))[0])
        last_local = int(local[-1]) if len(local) else 0
        shard = np.concatenate([shard, np.full(fill, last_shard, dtype=np.int64)])
        local = np.concatenate([local, np.full(fill, last_local, dtype=np.int64)])
    return EpochOrder(shard=shard, local=local, valid=valid, steps=steps, batch_size=batch_size)


def segments(shard: np.ndarray) -> list[tuple[int, int]]:
    """Split one batch into runs ``[begin, end)`` that read the same shard (usually a single run)."""
    if len(shard) == 0:
        return []
    cuts = np.flatnonzero(np.diff(shard)) + 1
    bounds = [0, *cuts.tolist(), len(shard)]
    return list(zip(bounds[:-1], bounds[1:]))
