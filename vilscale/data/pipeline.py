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
flip, mode)`` row per sample from a buffer that the loader fills with numpy from a seeded generator. Crops
and flips are therefore reproducible from (seed, epoch, rank, step) whatever the decode threads do (FFCV's
own random crop draws from numba's per-thread generator, which no seed reaches), and an exactly resumed
run decodes bit-identical batches. Training decodes only the part of each JPEG that its box needs
(`MODE_CROP`, `vilscale.data.cropdecode`); validation decodes whole images and resizes with OpenCV exactly
as before (`MODE_EXACT`). The decoder writes each sample's status back into its row, so the loader can
replace a sample whose bytes no longer decode.

This relies on FFCV 1.0.2 internals (`Loader.graph`, `Loader.code`, the memory managers' ``state``);
setup.py pins that version.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vilscale.data.ffcv_import import import_ffcv
from vilscale.data.manifest import DataError
from vilscale.files import TransientIOError, retry_transient

_COMPILE_LOCK = threading.Lock()


# Columns of the per-sample box rows that the loader fills and the decoder reads (and writes STATUS back to).
TOP, LEFT, HEIGHT, WIDTH, FLIP, MODE, STATUS = range(7)
BOX_COLUMNS = 7
MODE_EXACT = 0
"""Decode the whole image, resize the box with OpenCV (INTER_AREA), as FFCV does: validation, whose pixels must
not change, and training with ``data.crop_decode`` off."""
MODE_CROP = 1
"""Decode only the rows and columns of the box, scaled in the DCT domain when the box is at least twice the
output size, and resample the exact box (`vilscale.data.cropdecode`): training."""


def _decoder_class():
    """Defined lazily: importing ffcv costs seconds, which `vilscale --help` must not pay."""
    import_ffcv()
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    from vilscale.data import cropdecode

    class BoxCropDecoder(Operation):
        """Decode (JPEG or raw), crop the given box, resize to ``size`` x ``size``, flip if asked; CHW output.

        Buffers: the output ``(3, size, size)``, a decode buffer as large as the largest image of the manifest
        (not of the template shard) plus one HWC output for OpenCV, and one row per sample
        ``(top, left, height, width, flip, mode, status)``: the decoder writes each sample's status (0, or a
        `vilscale.data.cropdecode` error code) back into the last column.
        """

        def __init__(self, size: int, max_height: int, max_width: int):
            super().__init__()
            self.size = int(size)
            self.max_pixels = np.uint64(max_height) * np.uint64(max_width)

        def declare_state_and_memory(self, previous_state):
            output_shape = (3, self.size, self.size)
            scratch = (self.max_pixels + np.uint64(self.size * self.size)) * np.uint64(3)
            return (replace(previous_state, jit_mode=True, shape=output_shape, dtype=np.dtype("<u1")),
                    (AllocationQuery(output_shape, np.dtype("<u1")),
                     AllocationQuery((scratch,), np.dtype("<u1")),
                     AllocationQuery((BOX_COLUMNS,), np.dtype("<i8"))))

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            crop_decode_c = Compiler.compile(cropdecode.crop_decode)
            resize_box_c = Compiler.compile(cropdecode.resize_box)
            hwc_to_chw_c = Compiler.compile(cropdecode.hwc_to_chw)
            corrupt = cropdecode.CORRUPT

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, decode_storage, boxes = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    box = boxes[dst_ix]
                    top, left, crop_h, crop_w, flip = box[0], box[1], box[2], box[3], box[4]
                    out = destination[dst_ix]
                    buffer = decode_storage[dst_ix]
                    status = 0
                    if box[5] == 1:  # MODE_CROP
                        if field["mode"] == jpg:
                            status = crop_decode_c(image_data, height, width, top, left, crop_h, crop_w, out, flip,
                                                   buffer)
                        else:
                            image = image_data.reshape(height, width, 3)
                            status = resize_box_c(image, top, left, crop_h, crop_w, out, flip)
                    else:  # MODE_EXACT
                        side = out.shape[1]
                        resized = buffer[buffer.shape[0] - 3 * side * side:].reshape(side, side, 3)
                        if field["mode"] == jpg:
                            if imdecode_c(image_data, buffer, height, width, height, width, 0, 0, 1, 1, False,
                                          False) != 0:
                                status = corrupt
                            image = buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                        else:
                            image = image_data.reshape(height, width, 3)
                        resize_crop_c(image, top, top + crop_h, left, left + crop_w, resized)
                        if flip:
                            last = resized.shape[1] - 1
                            for y in range(resized.shape[0]):
                                for x in range(resized.shape[1] // 2):
                                    for c in range(3):
                                        kept = resized[y, x, c]
                                        resized[y, x, c] = resized[y, last - x, c]
                                        resized[y, last - x, c] = kept
                        hwc_to_chw_c(resized, out)
                    box[6] = status
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return BoxCropDecoder


class ShardHandle:
    """A shard opened for reading: its FFCV reader (sample table) and memory manager.

    The sample table is checked when the shard is opened: the compiled decoder trusts its sizes and data
    pointers, so a damaged table must stop the run with a message, not read outside the file.
    """

    def __init__(self, path: Path, os_cache: bool):
        import_ffcv()
        from ffcv.memory_managers import OSCacheManager, ProcessCacheManager
        from ffcv.reader import Reader

        self.path = path
        try:
            self.reader = retry_transient(lambda: Reader(str(path)), what=f"opening shard {path}")
        except TransientIOError:
            raise
        except Exception as error:  # noqa: BLE001 - FFCV raises AssertionError/ValueError/OSError on bad headers
            raise DataError(f"shard {path} cannot be opened ({type(error).__name__}: {error}); run `vilscale "
                            f"prepare` again to rewrite it") from error
        self._check_table()
        self.manager = OSCacheManager(self.reader) if os_cache else ProcessCacheManager(self.reader)

    def _check_table(self) -> None:
        images = self.reader.metadata["f0"]
        ptrs, sizes = self.reader.alloc_table["ptr"], self.reader.alloc_table["size"]
        order = np.argsort(ptrs)
        found = np.searchsorted(ptrs[order], images["data_ptr"])
        known = (found < len(ptrs)) & (ptrs[order][np.minimum(found, len(ptrs) - 1)] == images["data_ptr"])
        size = np.where(known, sizes[order][np.minimum(found, len(ptrs) - 1)], 0)
        file_size = self.path.stat().st_size
        raw = images["mode"] == 1
        bad = ~known | (images["data_ptr"] + size > file_size) | (images["height"] == 0) | (images["width"] == 0) \
            | (images["mode"] > 1) \
            | (raw & (size < images["height"].astype(np.uint64) * images["width"].astype(np.uint64) * 3))
        if bad.any():
            raise DataError(f"shard {self.path} has a damaged sample table ({int(bad.sum())} of {len(images)} "
                            f"entries, first at sample {int(np.flatnonzero(bad)[0])}); run `vilscale prepare` "
                            f"again to rewrite it")

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
            import_ffcv()
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
        self._images = np.empty((batch_size, 3, size, size), dtype=np.uint8)
        # Pages of the whole-image part are touched only by MODE_EXACT (validation); np.empty leaves the rest
        # uncommitted.
        self._decode = np.empty((batch_size, (max(max_height, 1) * max(max_width, 1) + size * size) * 3),
                                dtype=np.uint8)
        self._boxes = np.zeros((batch_size, BOX_COLUMNS), dtype=np.int64)
        self._labels = np.empty((batch_size, 1), dtype=np.int64)

    def decode_segment(self, shard: ShardHandle, storage_state, local_indices: np.ndarray, boxes: np.ndarray,
                       begin: int, *, mode: int) -> np.ndarray:
        """Decode ``local_indices`` of ``shard`` with ``boxes`` (n, 5) into rows ``[begin, begin + n)`` of the batch
        buffers; returns the n statuses (0: decoded; else a `vilscale.data.cropdecode` error code)."""
        end = begin + len(local_indices)
        self._boxes[begin:end, :FLIP + 1] = boxes
        self._boxes[begin:end, MODE] = mode
        self._boxes[begin:end, STATUS] = -1
        args = {f"memory_{self._image_id}": (self._images[begin:end], self._decode[begin:end], self._boxes[begin:end]),
                f"memory_{self._label_id}": self._labels[begin:end],
                **{f"shared_memory_{k}": None for k in self._shared_ids},
                "batch_indices": np.ascontiguousarray(local_indices, dtype=np.uint64),
                "metadata": shard.metadata, "storage_state": storage_state}
        for stage, outputs in self.stages:
            for node_id, result in zip(outputs, stage(**args)):
                args[f"result_{node_id}"] = result
        return self._boxes[begin:end, STATUS].copy()

    def batch(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the first ``count`` decoded rows: images (count, 3, size, size) uint8, labels (count,) int64."""
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
