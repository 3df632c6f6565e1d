"""`ShardedLoader`: a rank's view of a sharded FFCV dataset, with exact mid-epoch resume.

Design (why it pays FFCV's compilation once per rank and process):
- FFCV reads one .beton per `Loader`, and every new `Loader` pays 7-18 s of numba compilation before its
  first batch on a 2-core machine. A loader per shard per epoch would spend most of an ImageNet-21K epoch
  compiling; even a loader per owned shard kept across epochs costs (shards / ranks) compilations.
- Instead each process compiles one decode pipeline, shared by its training and validation loaders, and
  runs that compiled code on any shard (`vilscale.data.pipeline.CompiledPipeline`): the compiled functions
  take the shard's sample table and memory map as arguments. Start-up is one compilation per process plus
  opening a shard's table the first time it is read (milliseconds), whatever the number of shards, epochs,
  loaders or iterations.
- Which samples a rank reads and in what order is decided in numpy (`vilscale.data.sharding`): a stable,
  balanced, contiguous range of the shards laid end to end, visited each epoch in a seeded order of
  shuffled blocks of consecutive samples (page-cache friendly), identical on every run with the same
  (seed, epoch, world size). Crops and flips are drawn from a generator seeded by (seed, epoch, rank,
  step). Resuming at step k of epoch e therefore reproduces the remaining batches bit for bit.
- A background thread decodes up to `batches_ahead` batches ahead; numba's decode threads release the
  GIL. The decoder writes CHW pixels; every batch is copied out of FFCV's buffers into a fresh tensor (pinned
  when the device is CUDA), so a batch stays valid however long the trainer keeps it.
- Training decodes only the part of each JPEG its crop needs (`vilscale.data.cropdecode`); validation decodes
  whole images and resizes them exactly as FFCV does.

Bytes that rot inside a shard after its checksum was verified (the verification is cached by path, size
and mtime, so it does not see them) surface when a JPEG fails to decode. Such a training sample is
replaced, in the same row of the batch, by the next sample of the same shard that decodes (its crop drawn
from (seed, epoch, rank, step, row), so an exactly resumed run replaces it identically), and a validation
sample is left out of the metric (label and index -1, as filler). Each failure is counted in
`decode_errors` (per shard in `decode_error_samples`) and logged once per sample; a shard with more than
``data.decode_error_limit`` bad samples stops the run with a `DataError` naming it.

Remainders (see `vilscale.data.sharding`): training with ``drop_last`` yields ``len(loader)`` full
batches per rank and skips the few samples left over (different ones each epoch); without it the last
batch is filled from the start of the rank's order. Validation reads every sample exactly once across the
ranks, sequentially; the last batches are filled up to full size with entries whose label (and index) is
-1, which the metric must ignore: ``valid = labels >= 0``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vilscale.data.config import AugmentConfig, DataConfig
from vilscale.data.manifest import DataError, load_manifest, verify_shard
from vilscale.data.pipeline import (
    MODE_CROP,
    MODE_EXACT,
    CompiledPipeline,
    ShardHandle,
    center_boxes,
    random_resized_boxes,
)
from vilscale.data.sharding import EpochOrder, assign_pieces, epoch_order, segments, steps_per_epoch
from vilscale.devices import resolve_device

log = logging.getLogger(__name__)

_STATE_KEYS = ("epoch", "batches_done", "seed", "world_size", "batch_size", "num_samples", "train")


class ShardedLoader:
    """Batches of one rank: ``(images, labels)`` or ``(images, labels, indices)`` with ``return_indices``.

    ``images`` is a uint8 ``(B, 3, S, S)`` tensor on ``device``; ``labels`` int64 ``(B,)`` (-1 marks
    validation filler); ``indices`` int64 ``(B,)`` are global sample indices in the manifest (-1 for filler).

    Args:
        manifest_path: a manifest.json written by `vilscale prepare` (or its folder).
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of data-parallel ranks.
        batch_size: samples per batch on this rank.
        seed: seed of the order, crops and flips (the same on every rank).
        train: training (shuffled, random crops) or validation (sequential, centre crops).
        config: where and how to read.
        augment: crop and flip settings of training (`AugmentConfig` defaults when None).
        device: where batches are delivered ("cpu", "cuda", "cuda:1", a torch.device).
        return_indices: also yield the global sample indices.
    """

    def __init__(self, manifest_path, *, rank: int, world_size: int, batch_size: int, seed: int, train: bool,
                 config: DataConfig, augment: AugmentConfig | None = None, device="cpu",
                 return_indices: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size} is not valid; need 0 <= rank < world_size")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if config.img_size == 0:
            raise ValueError("config.img_size is 0 (the job spec's 'same as the model'); give the loader a size")
        self.manifest = load_manifest(manifest_path)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.train, self.config = int(seed), bool(train), config
        self.augment = augment or AugmentConfig()
        self.device = resolve_device(device)
        self.return_indices = return_indices
        self._steps = steps_per_epoch(self.manifest.num_samples, world_size, batch_size, train=self.train,
                                      drop_last=config.drop_last)
        self._offsets = np.asarray(self.manifest.shard_offsets, dtype=np.int64)
        self._my_shards = sorted({p.shard for p in assign_pieces(self.manifest.shard_sizes, world_size, rank)})
        if config.verify_checksums:
            for index in self._my_shards:
                verify_shard(self.manifest.shards[index])
        self._handles: dict[int, ShardHandle] = {}
        self._pipeline: CompiledPipeline | None = None
        self._epoch = 0
        self._batches_done = 0
        self._decode_errors = 0
        self._bad_samples: dict[int, dict[int, str]] = {}  # shard -> {local index: reason}

    # ----------------------------------------------------------------------------------------- facts

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    @property
    def num_samples(self) -> int:
        """Samples in the whole dataset (all ranks)."""
        return self.manifest.num_samples

    def __len__(self) -> int:
        """Batches per epoch, identical on every rank."""
        return self._steps

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def decode_errors(self) -> int:
        """Samples that failed to decode since this loader was made (each failed read counts, every epoch):
        what ``vilscale_data_decode_errors_total`` exports."""
        return self._decode_errors

    @property
    def decode_error_samples(self) -> dict[str, tuple[int, ...]]:
        """The samples found not to decode, per shard: ``{shard path: (local index, ...)}``."""
        return {str(self.manifest.shards[shard].path): tuple(sorted(bad))
                for shard, bad in sorted(self._bad_samples.items())}

    # ----------------------------------------------------------------------------------------- state

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next. Setting the epoch the loader is already in keeps its position (after
        `load_state_dict`, the usual ``set_epoch(e)`` then continues mid-epoch)."""
        if epoch != self._epoch:
            self._epoch, self._batches_done = int(epoch), 0

    def state_dict(self) -> dict:
        """Where the loader stands: the next batch is batch ``batches_done`` of ``epoch`` (the same on every rank),
        and the samples this rank found not to decode (``bad_samples``: so that a resumed run replaces them as
        the uninterrupted one did)."""
        epoch, done = self._epoch, self._batches_done
        if done >= self._steps:
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_samples": self.num_samples, "train": self.train,
                "bad_samples": {shard: dict(bad) for shard, bad in self._bad_samples.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}; pass what ShardedLoader.state_dict() returned")
        mine = self.state_dict()
        if state["batches_done"]:  # at an epoch boundary any layout and dataset may follow
            for key in ("seed", "world_size", "batch_size", "num_samples", "train"):
                if state[key] != mine[key]:
                    raise ValueError(
                        f"loader state has {key}={state[key]!r} but this loader has {key}={mine[key]!r}; a mid-epoch "
                        f"resume needs the same seed, world size, per-rank batch size and dataset (these can change "
                        f"only at an epoch boundary)")
        if not 0 <= state["batches_done"] <= self._steps:
            raise ValueError(f"loader state batches_done={state['batches_done']} is outside [0, {self._steps}]")
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])
        if state["num_samples"] == mine["num_samples"] and state["world_size"] == mine["world_size"]:
            self._bad_samples = {int(shard): {int(local): str(reason) for local, reason in bad.items()}
                                 for shard, bad in state.get("bad_samples", {}).items()}

    # ----------------------------------------------------------------------------------------- reading

    def order(self, epoch: int) -> EpochOrder:
        """What this rank reads in ``epoch`` (also usable without decoding anything)."""
        return epoch_order(self.manifest.shard_sizes, world_size=self.world_size, rank=self.rank,
                           batch_size=self.batch_size, seed=self.seed, epoch=epoch if self.train else 0,
                           train=self.train, drop_last=self.config.drop_last, block=self.config.shuffle_block,
                           window=self.config.shuffle_window)

    def _handle(self, shard: int) -> ShardHandle:
        if shard not in self._handles:
            self._handles[shard] = ShardHandle(self.manifest.shards[shard].path, self.config.os_cache)
        return self._handles[shard]

    def _ensure_pipeline(self) -> CompiledPipeline:
        if self._pipeline is None:
            if not self._my_shards:
                raise DataError(f"rank {self.rank} owns no sample of {self.manifest.path}")
            infos = [self.manifest.shards[i] for i in self._my_shards]
            max_h = max(s.max_height for s in infos)
            max_w = max(s.max_width for s in infos)
            if not (max_h and max_w):  # a manifest without the sizes: read them from the sample tables
                tables = [self._handle(i).metadata["f0"] for i in self._my_shards]
                max_h = max(int(t["height"].max(initial=1)) for t in tables)
                max_w = max(int(t["width"].max(initial=1)) for t in tables)
            template = next(s.path for s in infos if s.num_samples > 0)
            self._pipeline = CompiledPipeline(template, size=self.config.img_size, max_height=max_h, max_width=max_w,
                                              batch_size=self.batch_size, num_threads=self.config.num_workers,
                                              os_cache=self.config.os_cache,
                                              page_size=int(self.manifest.writer.get("page_size", 0)))
        return self._pipeline

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if not self.train:
            self._batches_done = 0  # validation always reads the whole set
        elif self._batches_done >= self._steps:  # the previous epoch was read to its end
            self._epoch, self._batches_done = self._epoch + 1, 0
        epoch, first = self._epoch, self._batches_done
        order = self.order(epoch)
        producer = _Producer(self, order, epoch, first)
        try:
            for step in range(first, order.steps):
                batch = producer.next()
                self._batches_done = step + 1
                yield batch
        finally:
            producer.close()
        if self.train and self._epoch == epoch and self._batches_done >= order.steps:
            self._epoch, self._batches_done = epoch + 1, 0

    @property
    def _decode_mode(self) -> int:
        return MODE_CROP if self.train and self.config.crop_decode else MODE_EXACT

    def _record_failure(self, shard: int, local: int, reason: str) -> bool:
        """Count a failed decode; True the first time this sample fails (log it then). Raises `DataError` when the
        shard has more bad samples than the limit."""
        self._decode_errors += 1
        bad = self._bad_samples.setdefault(shard, {})
        first = local not in bad
        bad[local] = reason
        if len(bad) > self.config.decode_error_limit:
            path = self.manifest.shards[shard].path
            listed = ", ".join(str(i) for i in sorted(bad)[:10]) + (" ..." if len(bad) > 10 else "")
            raise DataError(f"shard {path}: {len(bad)} samples failed to decode while reading (samples {listed}; "
                            f"{reason}), more than data.decode_error_limit={self.config.decode_error_limit}: the "
                            f"shard was damaged after it was verified. Run `vilscale prepare` with the same arguments "
                            f"again (it re-hashes every shard and rewrites those whose checksum fails) or restore it")
        return first

    def _boxes(self, handle: ShardHandle, local: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        image_meta = handle.metadata["f0"][local]
        heights, widths = image_meta["height"].astype(np.int64), image_meta["width"].astype(np.int64)
        if self.train:
            return random_resized_boxes(heights, widths, scale=self.augment.rrc_scale, ratio=self.augment.rrc_ratio,
                                        hflip=self.augment.hflip, rng=rng)
        return center_boxes(heights, widths, ratio=self.config.val_resize_ratio)


class _Producer:
    """Decodes the batches of one epoch in a background thread, in order, into a bounded queue."""

    _DONE = object()

    def __init__(self, loader: ShardedLoader, order: EpochOrder, epoch: int, first_step: int):
        self.loader, self.order, self.epoch, self.first_step = loader, order, epoch, first_step
        self.queue: queue.Queue = queue.Queue(maxsize=loader.config.batches_ahead)
        self.stop = threading.Event()
        self.pin = loader.device.type == "cuda"
        self.thread = threading.Thread(target=self._run, name=f"vilscale-loader-rank{loader.rank}", daemon=True)
        self.thread.start()

    def _contexts(self):
        """Per shard: the memory context of this epoch's reads (FFCV's process cache wants the schedule)."""
        b = self.order.batch_size
        reads: dict[int, list[np.ndarray]] = {}
        for step in range(self.first_step, self.order.steps):
            rows = slice(step * b, (step + 1) * b)
            shard, local = self.order.shard[rows], self.order.local[rows]
            for begin, end in segments(shard):
                reads.setdefault(int(shard[begin]), []).append(local[begin:end].astype(np.uint64))
        return reads

    def _run(self) -> None:
        import numba

        loader = self.loader
        contexts = {}
        try:
            numba.set_num_threads(min(loader.config.num_workers, numba.config.NUMBA_NUM_THREADS))
            pipeline = loader._ensure_pipeline()
            reads = self._contexts()
            used = {shard: 0 for shard in reads}
            b = self.order.batch_size
            for step in range(self.first_step, self.order.steps):
                if self.stop.is_set():
                    return
                rows = slice(step * b, (step + 1) * b)
                shard, local, valid = self.order.shard[rows], self.order.local[rows].copy(), self.order.valid[rows]
                rng = np.random.default_rng([loader.seed, self.epoch, loader.world_size, loader.rank, step, 1]) \
                    if loader.train else None
                for begin, end in segments(shard):
                    index = int(shard[begin])
                    handle = loader._handle(index)
                    if index not in contexts:
                        contexts[index] = handle.manager.schedule_epoch(reads[index])
                        contexts[index].__enter__()
                    context = contexts[index]
                    context.start_batch(used[index])
                    used[index] += 1
                    boxes = loader._boxes(handle, local[begin:end], rng)
                    statuses = pipeline.decode_segment(handle, context.state, local[begin:end], boxes, begin,
                                                       mode=loader._decode_mode)
                    for row in begin + np.flatnonzero(statuses):
                        replaced = self._replace(pipeline, handle, index, int(local[row]), int(statuses[row - begin]),
                                                 step, int(row))
                        local[row] = replaced  # -1: the row is left out (`local` is this batch's copy)
                    if used[index] == len(reads[index]) and not loader.config.os_cache:
                        contexts.pop(index).__exit__(None, None, None)  # free the shard's page buffers
                images, labels = pipeline.batch(len(shard))
                images = torch.from_numpy(images)
                if self.pin:
                    out_images = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
                    out_images.copy_(images)
                else:
                    out_images = images.clone()
                out_labels = torch.from_numpy(labels.copy())
                indices = torch.from_numpy(loader._offsets[shard] + local)
                left_out = ~valid | (local < 0)
                if left_out.any():
                    invalid = torch.from_numpy(left_out)
                    out_labels[invalid] = -1
                    indices[invalid] = -1
                self._put((out_images, out_labels, indices))
            self._put(self._DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(error)
        finally:
            for context in contexts.values():
                context.__exit__(None, None, None)

    def _replace(self, pipeline: CompiledPipeline, handle: ShardHandle, shard: int, local: int, status: int,
                 step: int, row: int) -> int:
        """Deal with a sample that failed to decode into ``row``: training decodes the next good sample of the
        same shard into the row and returns its local index; validation returns -1 (the row is left out)."""
        from vilscale.data.cropdecode import STATUS_NAMES

        loader = self.loader
        path = loader.manifest.shards[shard].path
        reason = STATUS_NAMES.get(status, f"status {status}")
        first = loader._record_failure(shard, local, reason)
        if not loader.train:
            if first:
                log.warning("shard %s sample %d (global index %d) failed to decode (%s); left out of validation",
                            path, local, loader._offsets[shard] + local, reason)
            return -1
        size = loader.manifest.shards[shard].num_samples
        rng = np.random.default_rng([loader.seed, self.epoch, loader.world_size, loader.rank, step, row, 2])
        candidate = local
        for _ in range(size - 1):
            candidate = (candidate + 1) % size
            if candidate in loader._bad_samples.get(shard, {}):
                continue
            indices = np.array([candidate], dtype=np.uint64)
            box = loader._boxes(handle, indices, rng)
            context = handle.manager.schedule_epoch([indices])  # its pages may not be in this epoch's plan
            context.__enter__()
            try:
                context.start_batch(0)
                status = int(pipeline.decode_segment(handle, context.state, indices, box, row,
                                                     mode=loader._decode_mode)[0])
            finally:
                context.__exit__(None, None, None)
            if status == 0:
                if first:
                    log.warning("shard %s sample %d (global index %d) failed to decode (%s); replaced by sample %d "
                                "of the same shard", path, local, loader._offsets[shard] + local, reason, candidate)
                return candidate
            candidate_reason = STATUS_NAMES.get(status, f"status {status}")
            if loader._record_failure(shard, candidate, candidate_reason):
                log.warning("shard %s sample %d (global index %d) failed to decode (%s), found while replacing "
                            "sample %d", path, candidate, loader._offsets[shard] + candidate, candidate_reason, local)
        raise DataError(f"shard {path}: no sample decodes; run `vilscale prepare` again to rewrite it")

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[torch.Tensor, ...]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._DONE:
            raise AssertionError("the loader's producer ended before the epoch did")
        images, labels, indices = item
        device = self.loader.device
        if device.type == "cuda":
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            indices = indices.to(device, non_blocking=True)
        elif device.type != "cpu":
            images, labels, indices = images.to(device), labels.to(device), indices.to(device)
        if self.loader.return_indices:
            return images, labels, indices
        return images, labels

    def close(self) -> None:
        self.stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=30)


def open_loaders(config: DataConfig, *, rank: int, world_size: int, batch_size: int, seed: int,
                 augment: AugmentConfig | None = None, device="cpu",
                 val_batch_size: int | None = None) -> tuple[ShardedLoader | None, ShardedLoader | None]:
    """The training and validation loaders of ``config`` (None where its manifest is "")."""
    train = val = None
    if config.train_manifest:
        train = ShardedLoader(Path(config.train_manifest), rank=rank, world_size=world_size, batch_size=batch_size,
                              seed=seed, train=True, config=config, augment=augment, device=device)
    if config.val_manifest:
        val = ShardedLoader(Path(config.val_manifest), rank=rank, world_size=world_size,
                            batch_size=val_batch_size or batch_size, seed=seed, train=False, config=config,
                            device=device)
    return train, val
