"""One compiled FFCV decode pipeline, reused across every shard a process reads.

FFCV generates and numba-compiles its pipeline per `ffcv.loader.Loader` (7-18 s on a 2-core machine
before the first batch), and a `Loader` reads one file. The compiled stage functions, however, receive
the file only through their arguments: ``metadata`` (the shard's sample table), ``storage_state`` (for
the OS-cache manager: the shard's memory map and its sorted allocation table) and the output buffers.
All shards of a manifest share one field layout and one page size, so the same compiled functions
decode any of them. `CompiledPipeline` builds one template `Loader` (over any shard) only to obtain that
compiled code, and then runs it directly on whichever shard a batch comes from, with buffers of its
own; a batch that spans two shards is decoded in two segments into consecutive rows of the same buffer.
The code does not depend on batch or image sizes either, so it is generated once per process and
shared by all loaders (training and validation): the compilation is paid once per process, never per
shard, epoch or loader.

Cropping is decided outside the compiled code: the decoder reads one ``(top, left, height, width,
flip)`` row per sample from a buffer that the loader fills with numpy from a seeded generator. Crops and
flips are therefore reproducible from (seed, epoch, rank, step) whatever the decode threads do (FFCV's
own random crop draws from numba's per-thread generator, which no seed reaches), and an exactly resumed
run decodes bit-identical batches.

This relies on FFCV 1.0.2 internals (`Loader.graph`, `Loader.code`, the memory managers' ``state``);
setup.py pins that version.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

_COMPILE_LOCK = threading.Lock()


def _decoder_class():
    """Defined lazily: importing ffcv costs seconds of numba compilation, which `vilscale --help` must not pay."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class BoxCropDecoder(Operation):
        """Decode (JPEG or raw), crop the given box, resize to ``size`` x ``size``, flip if asked.

        Buffers: the output ``(size, size, 3)``, a decode buffer as large as the largest image of the
        manifest (not of the template shard), and one ``(top, left, height, width, flip)`` row per sample.
        """

        def __init__(self, size: int, max_height: int, max_width: int):
            super().__init__()
            self.size = int(size)
            self.max_pixels = np.uint64(max_height) * np.uint64(max_width)

        def declare_state_and_memory(self, previous_state):
            output_shape = (self.size, self.size, 3)
            return (replace(previous_state, jit_mode=True, shape=output_shape, dtype=np.dtype("<u1")),
                    (AllocationQuery(output_shape, np.dtype("<u1")),
                     AllocationQuery((self.max_pixels * np.uint64(3),), np.dtype("<u1")),
                     AllocationQuery((5,), np.dtype("<i8"))))

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, decode_storage, boxes = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        buffer = decode_storage[dst_ix]
                        imdecode_c(image_data, buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        image = image_data.reshape(height, width, 3)
                    top, left, crop_h, crop_w, flip = boxes[dst_ix]
                    out = destination[dst_ix]
                    resize_crop_c(image, top, top + crop_h, left, left + crop_w, out)
                    if flip:
                        last = out.shape[1] - 1
                        for y in range(out.shape[0]):
                            for x in range(out.shape[1] // 2):
                                for c in range(3):
                                    kept = out[y, x, c]
                                    out[y, x, c] = out[y, last - x, c]
                                    out[y, last - x, c] = kept
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return BoxCropDecoder


class ShardHandle:
    """A shard opened for reading: its FFCV reader (sample table) and memory manager."""

    def __init__(self, path: Path, os_cache: bool):
        from ffcv.memory_managers import OSCacheManager, ProcessCacheManager
        from ffcv.reader import Reader

        self.path = path
        self.reader = Reader(str(path))
        self.manager = OSCacheManager(self.reader) if os_cache else ProcessCacheManager(self.reader)

    @property
    def metadata(self) -> np.ndarray:
        return self.reader.metadata


_CODE_CACHE: dict[tuple, tuple] = {}


def _compiled_code(template_shard: Path, *, num_threads: int, os_cache: bool, page_size: int) -> tuple:
    """FFCV's generated stage functions for our pipeline, built once per process and reader kind.

    The stage functions do not depend on the batch size, crop size or image sizes (all of those live in the
    buffers passed at call time), nor on the shard for the OS-cache reader; FFCV's process-cache reader
    closes over the page size, so that is part of the key. numba compiles them at their first call.
    """
    key = (num_threads, os_cache, None if os_cache else page_size)
    with _COMPILE_LOCK:
        if key not in _CODE_CACHE:
            from ffcv.fields.basics import IntDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.pipeline.pipeline_spec import PipelineSpec

            decoder = _decoder_class()(8, 1, 1)  # sizes only shape the template's own (unused) buffers
            torch_threads = torch.get_num_threads()  # FFCV's Loader sets torch's thread count as a side effect
            template = Loader(str(template_shard), batch_size=1, num_workers=num_threads, os_cache=os_cache,
                              order=OrderOption.SEQUENTIAL, indices=[0], drop_last=False, batches_ahead=1,
                              pipelines={"image": PipelineSpec("image", decoder=decoder),
                                         "label": PipelineSpec("label", decoder=IntDecoder())})
            torch.set_num_threads(torch_threads)
            stages, _ = template.code
            _, code = template.graph.collect_requirements()
            _CODE_CACHE[key] = (stages, template.graph.leaf_nodes["image"].id, template.graph.leaf_nodes["label"].id,
                                tuple(code["shared"]))
        return _CODE_CACHE[key]


class CompiledPipeline:
    """Decode batches of samples from any shard of one manifest with FFCV's compiled pipeline.

    Args:
        template_shard: any shard of the manifest (an FFCV `Loader` is built over it once per process, only to
            generate the code).
        size: output side of the square crops.
        max_height, max_width: the largest stored image among the shards that will be read.
        batch_size: the most samples decoded at once.
        num_threads: numba decode threads.
        os_cache: which FFCV memory manager the shards are read through.
        page_size: the shards' FFCV page size.
    """

    def __init__(self, template_shard: Path, *, size: int, max_height: int, max_width: int, batch_size: int,
                 num_threads: int, os_cache: bool, page_size: int):
        self.stages, self._image_id, self._label_id, self._shared_ids = _compiled_code(
            template_shard, num_threads=num_threads, os_cache=os_cache, page_size=page_size)
        self.batch_size, self.size = batch_size, size
        self._images = np.empty((batch_size, size, size, 3), dtype=np.uint8)
        self._decode = np.empty((batch_size, max(max_height, 1) * max(max_width, 1) * 3), dtype=np.uint8)
        self._boxes = np.zeros((batch_size, 5), dtype=np.int64)
        self._labels = np.empty((batch_size, 1), dtype=np.int64)

    def decode_segment(self, shard: ShardHandle, storage_state, local_indices: np.ndarray, boxes: np.ndarray,
                       begin: int) -> None:
        """Decode ``local_indices`` of ``shard`` into rows ``[begin, begin + n)`` of the batch buffers."""
        end = begin + len(local_indices)
        self._boxes[begin:end] = boxes
        args = {f"memory_{self._image_id}": (self._images[begin:end], self._decode[begin:end], self._boxes[begin:end]),
                f"memory_{self._label_id}": self._labels[begin:end],
                **{f"shared_memory_{k}": None for k in self._shared_ids},
                "batch_indices": np.ascontiguousarray(local_indices, dtype=np.uint64),
                "metadata": shard.metadata, "storage_state": storage_state}
        for stage, outputs in self.stages:
            for node_id, result in zip(outputs, stage(**args)):
                args[f"result_{node_id}"] = result

    def batch(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the first ``count`` decoded rows: images (count, size, size, 3) uint8, labels (count,) int64."""
        return self._images[:count], self._labels[:count].reshape(-1)


def random_resized_boxes(heights: np.ndarray, widths: np.ndarray, *, scale: tuple[float, float],
                         ratio: tuple[float, float], hflip: float, rng: np.random.Generator,
                         tries: int = 10) -> np.ndarray:
    """RandomResizedCrop boxes as torchvision draws them (10 tries, then a centred fallback), plus a flip flag.

    Returns (n, 5) int64 rows ``(top, left, height, width, flip)``.
    """
    n = len(heights)
    h = heights.astype(np.float64)[:, None]
    w = widths.astype(np.float64)[:, None]
    target = h * w * rng.uniform(scale[0], scale[1], (n, tries))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, tries)))
    crop_w = np.round(np.sqrt(target * aspect))
    crop_h = np.round(np.sqrt(target / aspect))
    fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
    first = np.argmax(fits, axis=1)
    rows = np.arange(n)
    cw, chh = crop_w[rows, first], crop_h[rows, first]
    found = fits.any(axis=1)
    hh, ww = h[:, 0], w[:, 0]
    # Fallback: the largest centred crop whose aspect ratio is inside `ratio`.
    in_ratio = ww / hh
    fb_w = np.where(in_ratio < ratio[0], ww, np.where(in_ratio > ratio[1], np.round(hh * ratio[1]), ww))
    fb_h = np.where(in_ratio < ratio[0], np.round(ww / ratio[0]), hh)
    fb_h = np.where(in_ratio > ratio[1], hh, fb_h)
    cw = np.where(found, cw, np.maximum(fb_w, 1))
    chh = np.where(found, chh, np.maximum(fb_h, 1))
    top = np.where(found, np.floor(rng.random(n) * (hh - chh + 1)), (hh - chh) // 2)
    left = np.where(found, np.floor(rng.random(n) * (ww - cw + 1)), (ww - cw) // 2)
    flip = rng.random(n) < hflip
    return np.stack([top, left, chh, cw, flip], axis=1).astype(np.int64)


def center_boxes(heights: np.ndarray, widths: np.ndarray, *, ratio: float) -> np.ndarray:
    """Centre square crops of side ``ratio`` x the shorter side (the 224/256 evaluation protocol)."""
    side = np.maximum((ratio * np.minimum(heights, widths)).astype(np.int64), 1)
    top = (heights.astype(np.int64) - side) // 2
    left = (widths.astype(np.int64) - side) // 2
    return np.stack([top, left, side, side, np.zeros_like(side)], axis=1)
