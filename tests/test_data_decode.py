"""The training decode path and read-time corruption.

- `vilscale.data.cropdecode` decodes only the rows and columns a crop box needs, at 1/2-1/8 scale when the
  box is at least twice the output: its pixels equal the same resampling of the fully decoded image up to
  the JPEG decoder's own rounding, and differ from an exact float64 area resampling of the full image by a
  bounded amount at every DCT scale; a box shifted by a few pixels is measurably further away (so geometry
  is tested, not only smoothness).
- The loader's training batches with and without crop decoding use the same boxes; validation pixels are
  exactly FFCV's whole-image decode plus OpenCV resize.
- A JPEG damaged inside a shard after the checksum was cached (mtime kept) is replaced by the next good
  sample of its shard, counted, logged once; validation leaves it out; too many stop the run; a damaged
  sample table stops the run before anything is decoded from it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vilscale.data import cropdecode
from vilscale.data.config import DataConfig
from vilscale.data.loader import ShardedLoader
from vilscale.data.manifest import DataError, load_manifest
from vilscale.data.samples import photo_imagefolder
from vilscale.data.writer import WriterSettings, prepare, scan_imagefolder

# ------------------------------------------------------------------------------------------- references


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode like the shard writer does (OpenCV, 4:2:0)."""
    import cv2

    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


def _full_decode(jpeg: bytes, height: int, width: int) -> np.ndarray:
    """FFCV's whole-image decode (libjpeg-turbo, fast DCT), as the validation path uses it."""
    from ffcv.libffcv import imdecode

    data = np.frombuffer(jpeg, dtype=np.uint8)
    out = np.empty(height * width * 3, dtype=np.uint8)
    assert imdecode(data, out, height, width, height, width, 0, 0, 1, 1, False, False) == 0
    return out.reshape(height, width, 3)


def _axis_matrix(start: float, stop: float, n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of the exact box [start, stop): area overlap when shrinking, bilinear when enlarging."""
    matrix = np.zeros((n_out, n_in))
    step = (stop - start) / n_out
    lo, hi = int(np.floor(start)), int(np.ceil(stop))
    for o in range(n_out):
        if step >= 1:
            a, b = start + o * step, start + (o + 1) * step
            for i in range(int(np.floor(a)), int(np.ceil(b))):
                matrix[o, i] = max(0.0, min(b, i + 1) - max(a, i))
        else:
            c = min(max(start + (o + 0.5) * step - 0.5, lo), hi - 1)
            i = int(np.floor(c))
            matrix[o, i] += 1 - (c - i)
            if c - i > 0:
                matrix[o, i + 1] += c - i
        matrix[o] /= matrix[o].sum()
    return matrix


def _reference(image: np.ndarray, box, size: int) -> np.ndarray:
    """The exact box resampled in float64 (the definition the C resampler approximates)."""
    top, left, height, width = box
    rows = _axis_matrix(top, top + height, image.shape[0], size)
    cols = _axis_matrix(left, left + width, image.shape[1], size)
    vertical = np.tensordot(rows, image.astype(np.float64), axes=(1, 0))  # (size, W, 3)
    return np.einsum("pw,owc->opc", cols, vertical)


@pytest.fixture(scope="module")
def photo():
    """A real photograph (scikit-learn's sample), 427 x 640."""
    from sklearn.datasets import load_sample_images

    return np.ascontiguousarray(load_sample_images().images[0])


@pytest.fixture(scope="module")
def big_photo(photo):
    """The photograph enlarged to 1708 x 2560, so that crops of it are decoded at 1/2, 1/4 and 1/8 scale."""
    from PIL import Image

    return np.asarray(Image.fromarray(photo).resize((2560, 1708), Image.BICUBIC))


# ----------------------------------------------------------------------------------------- decode path


@pytest.mark.parametrize("box", [(0, 0, 427, 640), (100, 37, 300, 301), (13, 250, 90, 70), (426, 639, 1, 1),
                                 (5, 3, 223, 224), (211, 402, 216, 238)])
@pytest.mark.budget(20)  # the crop decoder against the whole-image decode
def test_crop_decode_equals_the_same_resampling_of_the_whole_image(photo, box):
    """At scale 1 the only difference from decoding everything is libjpeg's chroma upsampling at the crop's left
    and right edges (it has no neighbour column there): every output pixel that reads neither the box's first nor
    its last source column is identical (so were those of 400 random boxes, when this was written)."""
    jpeg = _jpeg(photo)
    top, left, height, width = box
    assert cropdecode.crop_scale(height, width, 224, 224) == 1
    cropped = cropdecode.decode_box(jpeg, 427, 640, box, 224)
    whole = _full_decode(jpeg, 427, 640)
    out = np.empty((3, 224, 224), dtype=np.uint8)
    assert cropdecode.resize_box(whole, *box, out, 0) == cropdecode.OK
    difference = np.abs(cropped.astype(int) - out.transpose(1, 2, 0))
    reads_an_edge = _axis_matrix(left, left + width, 640, 224)[:, [left, left + width - 1]].sum(axis=1) > 0
    assert not difference[:, ~reads_an_edge].any(), "pixels away from the crop's edge columns differ"
    assert difference.mean() < 0.05 and np.percentile(difference, 99.9) <= 2, (difference.mean(), difference.max())
    exact = _reference(whole, box, 224)
    assert np.abs(out.transpose(1, 2, 0) - exact).max() <= 0.51, "the resampler must round the exact box resampling"


# libjpeg's reduced-size inverse DCTs are not an area average: the README promises "about 1-2 grey levels" on
# average. Measured on this (smooth, enlarged) photograph: 1.34 at 1/2; 1.28, 1.60 and 2.19 at 1/4, mostly a bias
# of about +1 in R and B. The 1000 x 1200 crop is the one case above 2 (issue #22); detailed photographs at their
# own size measure 1.8-5.2 at 1/2 (not tested here).
@pytest.mark.parametrize("box, scale, limit", [((300, 500, 500, 460), 2, 1.5), ((100, 200, 1000, 1200), 4, 2.25),
                                               ((0, 0, 1708, 2560), 4, 2.0), ((2, 1, 1706, 1800), 4, 2.0)])
def test_dct_scaled_decode_stays_close_to_the_exact_box(big_photo, box, scale, limit):
    jpeg = _jpeg(big_photo)
    assert cropdecode.crop_scale(box[2], box[3], 224, 224) == scale
    got = cropdecode.decode_box(jpeg, 1708, 2560, box, 224).astype(np.float64)
    whole = _full_decode(jpeg, 1708, 2560)
    exact = _reference(whole, box, 224)
    error = np.abs(got - exact).mean()
    assert error < limit, f"decoding at 1/{scale} moved the pixels by {error:.2f} grey levels on average"
    # A box shifted by half an output pixel's footprint is further away: the geometry is exact.
    top, left, height, width = box
    shift = max(1, width // 224 // 2)
    shifted = _reference(whole, (top, left + shift if left + shift + width <= 2560 else left - shift, height, width),
                         224)
    assert np.abs(got - shifted).mean() > error + 0.3


def test_eighth_scale_and_flip(big_photo):
    jpeg = _jpeg(big_photo)
    box = (0, 0, 1708, 1900)
    small = cropdecode.decode_box(jpeg, 1708, 2560, box, 96)
    assert cropdecode.crop_scale(1708, 1900, 96, 96) == 8
    assert np.abs(small - _reference(_full_decode(jpeg, 1708, 2560), box, 96)).mean() < 2.0
    assert np.array_equal(cropdecode.decode_box(jpeg, 1708, 2560, box, 96, flip=True), small[:, ::-1])


def test_grey_jpeg_and_tiny_boxes_decode(photo):
    grey = photo.mean(axis=2).astype(np.uint8)
    import cv2

    ok, encoded = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 90])
    out = cropdecode.decode_box(encoded.tobytes(), 427, 640, (10, 10, 2, 3), 16)
    assert out.shape == (16, 16, 3) and (out[..., 0] == out[..., 1]).all()


def test_a_large_shrink_of_a_raw_image_is_exact():
    wide = np.random.default_rng(0).integers(0, 256, (8, 16000, 3), dtype=np.uint8)  # 1000 source pixels per output
    out = np.empty((3, 16, 16), dtype=np.uint8)
    assert cropdecode.resize_box(wide, 0, 0, 8, 16000, out, 0) == cropdecode.OK
    assert np.abs(out.transpose(1, 2, 0) - _reference(wide, (0, 0, 8, 16000), 16)).max() <= 0.51


def test_damaged_jpegs_are_reported_not_decoded(photo):
    jpeg = bytearray(_jpeg(photo))
    with pytest.raises(DataError, match="JPEG size differs"):
        cropdecode.decode_box(bytes(jpeg), 400, 640, (0, 0, 100, 100), 32)
    with pytest.raises(DataError, match="crop box outside"):
        cropdecode.decode_box(bytes(jpeg), 427, 640, (400, 0, 100, 100), 32)
    header = bytearray(jpeg)
    header[:4] = b"\0\0\0\0"
    with pytest.raises(DataError, match="corrupt JPEG data"):
        cropdecode.decode_box(bytes(header), 427, 640, (0, 0, 427, 640), 32)
    # Damage that breaks the entropy-coded stream's syntax is found; (bytes that still parse as Huffman codes
    # decode to wrong pixels without an error, in any JPEG decoder: the README says so).
    middle = bytearray(jpeg)
    middle[len(jpeg) // 2: len(jpeg) // 2 + 64] = b"\xff\xd9" * 32
    with pytest.raises(DataError, match="corrupt JPEG data"):
        cropdecode.decode_box(bytes(middle), 427, 640, (0, 0, 427, 640), 32)
    truncated = bytes(jpeg[: len(jpeg) * 2 // 3])
    with pytest.raises(DataError, match="corrupt JPEG data"):
        cropdecode.decode_box(truncated, 427, 640, (0, 0, 427, 640), 32)
    # rows below the crop are never read, so damage there does not matter to a crop of the top
    assert cropdecode.decode_box(truncated, 427, 640, (0, 0, 100, 640), 32).shape == (32, 32, 3)


# ------------------------------------------------------------------------------------------ the loader


@pytest.fixture(scope="module", autouse=True)
def _private_checksum_cache(private_checksum_cache):
    yield


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """16 photographs stored as JPEG in 2 shards of 8."""
    source = photo_imagefolder(tmp_path_factory.mktemp("photos"), num_classes=2, per_class=8, min_side=64,
                               max_side=300, seed=3)
    out = tmp_path_factory.mktemp("jpeg_shards")
    settings = WriterSettings(max_side=0, compress_probability=1.0, page_size=2 << 20)
    prepare(scan_imagefolder(source), out, num_shards=2, settings=settings, workers=2, progress=False)
    return out


CONFIG = DataConfig(img_size=64, num_workers=2)


def _loader(path, **kwargs):
    defaults = dict(rank=0, world_size=1, batch_size=4, seed=7, train=True, config=CONFIG, return_indices=True)
    return ShardedLoader(Path(path) / "manifest.json", **{**defaults, **kwargs})


def _epoch(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


pytestmark = pytest.mark.slow


def test_training_crops_with_and_without_crop_decoding_differ_only_by_resampling(jpeg_shards):
    cropped = _epoch(_loader(jpeg_shards))
    whole = _epoch(_loader(jpeg_shards, config=DataConfig(img_size=64, num_workers=2, crop_decode=False)))
    assert len(cropped) == len(whole) == 4
    for (a, la, ia), (b, lb, ib) in zip(cropped, whole):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        assert a.shape == b.shape == (4, 3, 64, 64) and a.is_contiguous()
        difference = (a.float() - b.float()).abs().mean().item()
        assert difference < 4.0, f"crop decoding moved the pixels by {difference:.2f} grey levels on average"


def test_validation_pixels_are_ffcv_whole_image_decode_and_opencv_resize(jpeg_shards):
    from ffcv.libffcv import resize_crop
    from ffcv.reader import Reader

    from vilscale.data.pipeline import center_boxes

    manifest = load_manifest(jpeg_shards / "manifest.json")
    batches = _epoch(_loader(jpeg_shards, train=False))
    checked = 0
    for images, _, indices in batches:
        for image, index in zip(images, indices.tolist()):
            shard = int(np.searchsorted(manifest.shard_offsets, index, side="right") - 1)
            local = index - manifest.shard_offsets[shard]
            reader = Reader(str(manifest.shards[shard].path))
            meta = reader.metadata["f0"][local]
            size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == meta["data_ptr"]][0])
            with open(manifest.shards[shard].path, "rb") as handle:
                handle.seek(int(meta["data_ptr"]))
                jpeg = handle.read(size)
            whole = _full_decode(jpeg, int(meta["height"]), int(meta["width"]))
            top, left, side, _, _ = center_boxes(np.array([meta["height"]]), np.array([meta["width"]]),
                                                 ratio=CONFIG.val_resize_ratio)[0]
            expected = np.empty((64, 64, 3), dtype=np.uint8)
            resize_crop(whole, top, top + side, left, left + side, expected)
            assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(expected))
            checked += 1
    assert checked == 16


# ------------------------------------------------------------------------------ corruption at read time


def _damage(manifest_dir: Path, shard: int, local: int, *, table: bool = False) -> int:
    """Overwrite the start of sample ``local``'s JPEG (or its sample-table entry) in place, keeping the file's
    mtime, so that the cached checksum verification still trusts the shard. Returns its global index."""
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    manifest = load_manifest(manifest_dir / "manifest.json")
    path = manifest.shards[shard].path
    reader = Reader(str(path))
    stat = path.stat()
    with open(path, "r+b") as handle:
        if table:
            entry = HeaderType.itemsize + reader.field_descriptors.nbytes + local * reader.metadata.dtype.itemsize
            image_field = reader.metadata.dtype.fields["f0"]
            handle.seek(entry + image_field[1] + image_field[0].fields["data_ptr"][1])
            handle.write(np.uint64(1 << 40).tobytes())
        else:
            handle.seek(int(reader.metadata["f0"]["data_ptr"][local]))
            handle.write(b"\0" * 16)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return manifest.shard_offsets[shard] + local


@pytest.fixture
def damaged_copy(jpeg_shards, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(jpeg_shards, copy)
    _loader(copy)  # verifies and caches the checksums of the intact shards
    return copy


def test_a_jpeg_damaged_after_verification_is_replaced_counted_and_logged_once(damaged_copy, caplog):
    bad = _damage(damaged_copy, shard=0, local=5)
    caplog.set_level(logging.WARNING, logger="vilscale.data.loader")
    loader = _loader(damaged_copy)  # the checksum cache still trusts the shard: nothing is noticed yet
    first = _epoch(loader)
    indices = torch.cat([b[2] for b in first]).tolist()
    assert bad not in indices and indices.count(bad + 1) == 2, "the next sample of the shard takes its place"
    assert sorted(set(indices)) == sorted(set(range(16)) - {bad})
    assert loader.decode_errors == 1
    assert loader.decode_error_samples == {str(load_manifest(damaged_copy / "manifest.json").shards[0].path): (5,)}
    second = _epoch(loader)
    assert loader.decode_errors == 2, "every failed read counts"
    messages = [r.getMessage() for r in caplog.records if "failed to decode" in r.getMessage()]
    assert len(messages) == 1 and "sample 5 (global index 5)" in messages[0] and "replaced by sample 6" in messages[0]
    assert "shard-00000.beton" in messages[0]
    # the replacement is part of the seeded order: a fresh loader reads exactly the same batches
    again = _loader(damaged_copy)
    for got, want in zip(_epoch(again) + _epoch(again), first + second):
        assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_validation_leaves_a_damaged_jpeg_out(damaged_copy):
    bad = _damage(damaged_copy, shard=1, local=2)
    loader = _loader(damaged_copy, train=False)
    labels = torch.cat([b[1] for b in _epoch(loader)])
    indices = torch.cat([b[2] for b in _epoch(loader)])
    assert sorted(indices[indices >= 0].tolist()) == sorted(set(range(16)) - {bad})
    assert int((labels < 0).sum()) == 1 and loader.decode_errors == 2


def test_a_shard_with_too_many_damaged_jpegs_stops_the_run_naming_it(damaged_copy):
    for local in (1, 2, 3):
        _damage(damaged_copy, shard=0, local=local)
    path = load_manifest(damaged_copy / "manifest.json").shards[0].path
    config = DataConfig(img_size=64, num_workers=2, decode_error_limit=2)
    with pytest.raises(DataError, match=rf"shard {path}: 3 samples failed to decode.*decode_error_limit=2"):
        _epoch(_loader(damaged_copy, config=config))


def test_a_damaged_sample_table_stops_the_run_naming_the_shard(damaged_copy):
    _damage(damaged_copy, shard=1, local=4, table=True)
    path = load_manifest(damaged_copy / "manifest.json").shards[1].path
    with pytest.raises(DataError, match=rf"shard {path} has a damaged sample table .*first at sample 4"):
        _epoch(_loader(damaged_copy))


def test_decode_error_limit_is_validated():
    with pytest.raises(ValueError, match="data.decode_error_limit=-1"):
        DataConfig(decode_error_limit=-1)
