"""ctypes bindings of vilscale's crop decoder (`_cropdecode.c`), callable from Python and from numba code.

The training loader decodes, for each sample, only the rows and columns of the JPEG that its
RandomResizedCrop box needs, at 1/2, 1/4 or 1/8 scale in the DCT domain when the box is at least twice the
output size, and resamples the exact box to the output (area averaging when shrinking, bilinear when
enlarging), writing CHW pixels. See the C file for why libjpeg's API rather than FFCV's or TurboJPEG's.

Why a C extension and not PyTurboJPEG or FFCV's `imdecode` (chosen by measurement, one thread, on this
project's 2-core machine, q90 JPEGs of 256-640 px, ImageNet RandomResizedCrop boxes to 224):
- FFCV's crop path (TurboJPEG 2.x ``tjTransform``: a lossless re-encode of the cropped coefficients, then a
  decode) took 1.33 ms per image against 1.01 ms for FFCV's full decode: slower than not cropping, before
  any resizing. PyTurboJPEG wraps the same TurboJPEG API, whose only crop before libjpeg-turbo 3.0
  (``tj3SetCroppingRegion``) is that transform, and Debian 12 ships libjpeg-turbo 2.1; a Python call per
  image also cannot run inside numba's decode threads.
- libjpeg's ``jpeg_skip_scanlines`` / ``jpeg_crop_scanline`` / ``scale_denom`` (libjpeg-turbo >= 1.5) do what
  is needed, from a few hundred lines of C that numba calls without the GIL: 0.72 ms per image including the
  resampling, against 1.35-1.6 ms for the full decode plus OpenCV's INTER_AREA resize (0.5-0.75 ms of it).
  Skipped rows still cost their entropy decoding (libjpeg has to parse them), which bounds the gain.
The loader-level result is in benchmarks/results/data-cpu-2core.json.
"""

from __future__ import annotations

import ctypes
import importlib.util
from ctypes import c_int64, c_uint64, c_void_p

import numpy as np

from vilscale.data.manifest import DataError

OK, CORRUPT, SIZE_MISMATCH, BAD_BOX, NO_MEMORY = 0, 1, 2, 3, 4
STATUS_NAMES = {OK: "ok", CORRUPT: "corrupt JPEG data", SIZE_MISMATCH: "JPEG size differs from the sample table",
                BAD_BOX: "crop box outside the image", NO_MEMORY: "out of memory"}


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec("vilscale.data._cropdecode")
    if spec is None or spec.origin is None:
        raise DataError("vilscale's JPEG crop decoder (vilscale/data/_cropdecode.c) is not built; run `make setup`, "
                        "or `pip install --no-build-isolation -e .` in the vilscale checkout (it needs the libjpeg "
                        "headers: apt-get install libjpeg-dev)")
    return ctypes.CDLL(spec.origin)


_lib = _load()

_crop_decode = _lib.vil_crop_decode
_crop_decode.restype = c_int64
_crop_decode.argtypes = [c_void_p, c_uint64, c_int64, c_int64, c_int64, c_int64, c_int64, c_int64, c_void_p,
                         c_int64, c_int64, c_int64, c_void_p, c_uint64]

_resize_box = _lib.vil_resize_box
_resize_box.restype = c_int64
_resize_box.argtypes = [c_void_p, c_int64, c_int64, c_int64, c_int64, c_int64, c_int64, c_void_p, c_int64, c_int64,
                        c_int64]

_crop_scale = _lib.vil_crop_scale
_crop_scale.restype = c_int64
_crop_scale.argtypes = [c_int64, c_int64, c_int64, c_int64]

_hwc_to_chw = _lib.vil_hwc_to_chw
_hwc_to_chw.restype = None
_hwc_to_chw.argtypes = [c_void_p, c_int64, c_int64, c_void_p]


# These wrappers are plain Python over ctypes so that numba can compile them (as FFCV does with its own
# `imdecode`): arrays must be C-contiguous; `out` is (3, S, S) uint8.

def crop_decode(jpeg, height, width, top, left, crop_h, crop_w, out, flip, scratch):
    """Decode the box of a JPEG (height x width) into ``out`` (3, S, S); returns a status (0 = ok)."""
    return _crop_decode(jpeg.ctypes.data, jpeg.size, height, width, top, left, crop_h, crop_w, out.ctypes.data,
                        out.shape[1], out.shape[2], flip, scratch.ctypes.data, scratch.size)


def resize_box(image, top, left, crop_h, crop_w, out, flip):
    """Resample the box of a decoded (H, W, 3) image into ``out`` (3, S, S) as `crop_decode` does."""
    return _resize_box(image.ctypes.data, image.shape[0], image.shape[1], top, left, crop_h, crop_w, out.ctypes.data,
                       out.shape[1], out.shape[2], flip)


def hwc_to_chw(image, out):
    """(H, W, 3) -> ``out`` (3, H, W)."""
    _hwc_to_chw(image.ctypes.data, image.shape[0], image.shape[1], out.ctypes.data)


def crop_scale(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The DCT-domain scale denominator (1, 2, 4 or 8) `crop_decode` uses for a box of that size."""
    return int(_crop_scale(crop_h, crop_w, out_h, out_w))


def decode_box(jpeg: bytes | np.ndarray, height: int, width: int, box, size: int, flip: bool = False) -> np.ndarray:
    """`crop_decode` for one image from Python (tests, tools): returns (size, size, 3) uint8 or raises DataError."""
    data = np.frombuffer(jpeg, dtype=np.uint8) if isinstance(jpeg, bytes) else np.ascontiguousarray(jpeg)
    out = np.empty((3, size, size), dtype=np.uint8)
    scratch = np.empty(height * width * 3, dtype=np.uint8)
    top, left, crop_h, crop_w = (int(v) for v in box)
    status = crop_decode(data, height, width, top, left, crop_h, crop_w, out, int(flip), scratch)
    if status != OK:
        raise DataError(f"cannot decode the JPEG: {STATUS_NAMES.get(status, status)}")
    return out.transpose(1, 2, 0)
