"""ADE20K-format semantic segmentation data: a folder of images and a folder of same-named PNG label maps
(``a.jpg`` -> ``a.png``, one class index per pixel), read with the guarantees of the other loaders: disjoint per
rank, seeded per epoch, exact resume, unreadable files counted and replaced (``CocoLoader``'s sampling and state,
not a copy of them).

Training follows the ADE20K recipe of mmsegmentation (the one PVT's Semantic FPN numbers come from), each step
with torchvision's transforms v2 on an ``Image`` and a ``Mask`` together, so a resize, crop or flip can never
move one without the other:

- resize: shorter side ``crop_size x r``, longer side at most ``4 x crop_size x r`` (mmsegmentation's
  ``img_scale=(2048, 512)``), ``r`` uniform in ``data.scale_range`` (0.5, 2.0); label maps by nearest neighbour;
- random crop ``crop_size`` square, drawn again (up to 10 times) while one class holds more than
  ``data.cat_max_ratio`` (0.75) of the crop's labelled pixels;
- horizontal flip (``augment.hflip``);
- photometric distortion (``augment.photometric_distortion``): brightness +-32, contrast x [0.5, 1.5] before or
  after the colour changes, saturation x [0.5, 1.5], hue +-18 degrees of OpenCV's 180, each with probability 0.5;
- padding to the crop: the image with the mean colour (mmsegmentation pads the normalised image with 0), the
  label map with ``ignore_index``.

Every random choice of a sample comes from (seed, epoch, position), so a resumed epoch yields bit-identical batches
whatever the worker scheduling. Evaluation resizes the image alone (shorter side ``crop_size``, longer at most
``4 x crop_size``) and keeps the label map at its own size: predictions are scored at the original resolution.

``data.reduce_zero_label`` (ADE20K): label 0 ("other") becomes ``ignore_index`` and every other label moves down by
one. Pre-flight (``check_ade_folder``) reads every label map once (in threads) and remembers what it found under
$VILSCALE_CACHE_DIR, keyed by the files' names, sizes and times.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vilscale.data.coco import FILLER, CocoLoader
from vilscale.data.manifest import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CROP_TRIES = 10  # mmsegmentation's RandomCrop


def image_files(folder: str | Path) -> list[Path]:
    """The images of a folder, sorted by name (the dataset's index order)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def mask_path(masks: str | Path, image: Path) -> Path:
    return Path(masks) / f"{image.stem}.png"


def map_labels(labels: np.ndarray | torch.Tensor, *, reduce_zero_label: bool, ignore_index: int):
    """Label-map values -> class indices: with ``reduce_zero_label``, 0 becomes ``ignore_index`` and the rest move
    down by one (``ignore_index`` itself stays)."""
    if not reduce_zero_label:
        return labels
    ignored = (labels == 0) | (labels == ignore_index)
    out = labels - 1
    out[ignored] = ignore_index
    return out


def read_label_map(path: Path) -> np.ndarray:
    """A PNG label map as an integer array (H, W); an RGB(A) image is not a label map."""
    from PIL import Image

    with Image.open(path) as handle:
        if handle.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise DataError(f"{path} is a {handle.mode} image, not a label map (one class index per pixel, PNG mode L, "
                            "P or 16-bit)")
        return np.asarray(handle)


def resize_for_eval(image: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Evaluation's input: shorter side ``crop_size``, longer side at most ``4 x crop_size`` (uint8 (3, H, W))."""
    from torchvision.transforms.v2 import functional as F

    height, width = image.shape[-2:]
    factor = min(4 * crop_size / max(height, width), crop_size / min(height, width))
    size = [max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))]
    return F.resize(image, size, antialias=True) if size != [height, width] else image


@dataclass(frozen=True)
class TrainAugment:
    """The ADE20K training recipe's settings (see the module docstring)."""

    crop_size: int = 512
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    ignore_index: int = 255
    pad_colour: tuple[int, int, int] = (124, 116, 104)


def _photometric(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion on a uint8 (3, H, W) image, its draws from ``rng``."""
    from torchvision.transforms.v2 import functional as F

    out = image.float()
    if rng.integers(2):
        out = (out + float(rng.uniform(-32, 32))).clamp(0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(x):
        return (x * float(rng.uniform(0.5, 1.5))).clamp(0, 255) if rng.integers(2) else x

    if contrast_first:
        out = contrast(out)
    out = out / 255
    if rng.integers(2):
        out = F.adjust_saturation(out, float(rng.uniform(0.5, 1.5)))
    if rng.integers(2):
        out = F.adjust_hue(out, float(rng.integers(-18, 18)) / 180)
    out = out * 255
    if not contrast_first:
        out = contrast(out)
    return out.round().clamp(0, 255).to(torch.uint8)


def train_transform(image: torch.Tensor, labels: torch.Tensor, *, flip: bool, rng: np.random.Generator,
                    settings: TrainAugment) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, crop (with the class-share cap), flip, photometric distortion and padding of one training sample:
    uint8 image (3, H, W) and int64 class indices (H, W) in, a ``crop_size`` square of each out."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    crop = settings.crop_size
    image, mask = tv_tensors.Image(image), tv_tensors.Mask(labels)
    height, width = mask.shape[-2:]
    ratio = float(rng.uniform(*settings.scale_range))
    factor = min(4 * crop * ratio / max(height, width), crop * ratio / min(height, width))
    size = [max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))]
    image, mask = F.resize(image, size, antialias=True), F.resize(mask, size)
    crop_h, crop_w = min(crop, size[0]), min(crop, size[1])
    for _ in range(CROP_TRIES):
        top, left = int(rng.integers(size[0] - crop_h + 1)), int(rng.integers(size[1] - crop_w + 1))
        if settings.cat_max_ratio >= 1.0:
            break
        window = mask[top:top + crop_h, left:left + crop_w]
        _, counts = torch.unique(window[window != settings.ignore_index], return_counts=True)
        if len(counts) > 1 and counts.max().item() / counts.sum().item() < settings.cat_max_ratio:
            break
    image, mask = F.crop(image, top, left, crop_h, crop_w), F.crop(mask, top, left, crop_h, crop_w)
    if flip:
        image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
    image = image.as_subclass(torch.Tensor)
    if settings.photometric:
        image = _photometric(image, rng)
    if (crop_h, crop_w) != (crop, crop):
        padding = [0, 0, crop - crop_w, crop - crop_h]  # left, top, right, bottom
        image = F.pad(image, padding, fill=list(settings.pad_colour))
        mask = F.pad(mask, padding, fill=settings.ignore_index)
    return image.contiguous(), mask.as_subclass(torch.Tensor).contiguous()


class AdeData:
    """One split: ``images`` and their same-named label maps in ``masks``.

    Args:
        images: the image folder.
        masks: the label-map folder.
        train: training transforms (``load(..., key=...)``) or evaluation's resize.
        reduce_zero_label: label 0 -> ignore, the rest down by one (ADE20K).
        ignore_index: the label neither trained nor scored.
        augment: the training recipe's settings (``TrainAugment``).
    """

    def __init__(self, images: str | Path, masks: str | Path, *, train: bool, reduce_zero_label: bool,
                 ignore_index: int, augment: TrainAugment):
        self.images, self.masks = Path(images), Path(masks)
        self.files = image_files(self.images)
        self.train, self.reduce_zero_label, self.ignore_index = train, reduce_zero_label, ignore_index
        self.augment = augment

    def __len__(self) -> int:
        return len(self.files)

    @property
    def source(self) -> Path:
        return self.images

    def dataset_index(self, position: int) -> int:
        return position

    def describe(self, position: int) -> str:
        return f"image {self.files[position].name} of {self.images} (or its label map in {self.masks})"

    def name(self, position: int) -> str:
        return self.files[position].stem

    def blank(self):
        """(image, target) of a slot that holds no image (a filler, or an evaluation image that cannot be read):
        a small black image whose pixels are all ``ignore_index`` (never scored; its index is negative anyway)."""
        return torch.zeros(3, 32, 32, dtype=torch.uint8), {
            "mask": torch.full((32, 32), self.ignore_index, dtype=torch.int64), "name": ""}

    def read(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 image (3, H, W), int64 class indices (H, W)) as stored, labels mapped; OSError when unreadable."""
        from PIL import Image

        path = self.files[position]
        with Image.open(path) as handle:
            image = torch.from_numpy(np.asarray(handle.convert("RGB")).copy()).permute(2, 0, 1)
        labels = read_label_map(mask_path(self.masks, path)).astype(np.int64)
        if labels.shape != tuple(image.shape[-2:]):
            raise DataError(f"{path.name} is {image.shape[2]}x{image.shape[1]} but its label map is "
                            f"{labels.shape[1]}x{labels.shape[0]}")
        labels = map_labels(torch.from_numpy(labels), reduce_zero_label=self.reduce_zero_label,
                            ignore_index=self.ignore_index)
        return image.contiguous(), labels

    def load(self, position: int, *, flip: bool = False, key: Sequence[int] | None = None):
        """(uint8 image, target) of one sample: target ``{"mask": int64 (H, W), "name": stem}``. Training (``key``
        given: seed, epoch, position): a ``crop_size`` square of each; evaluation: the image resized, the labels as
        stored."""
        image, labels = self.read(position)
        if key is not None:
            image, labels = train_transform(image, labels, flip=flip, rng=np.random.default_rng([*key, 2]),
                                            settings=self.augment)
        else:
            image = resize_for_eval(image, self.augment.crop_size)
        return image, {"mask": labels, "name": self.name(position)}


class AdeLoader(CocoLoader):
    """A rank's batches of one ADE-format split: ``CocoLoader``'s order, rank parts, fillers, resume state and
    unreadable-file replacement, with each training sample's whole augmentation drawn from (seed, epoch, position).
    Yields (list of uint8 images, list of targets ``{"mask", "name"}``, dataset indices)."""

    def _draw(self, position: int) -> dict:
        if position == FILLER or not self.train:
            return {"flip": False, "key": None}
        return {"flip": self._flip(position), "key": (self.seed, self.epoch, position)}


# ----------------------------------------------------------------------------------------------------
# pre-flight: every image has a label map of its size, with labels that are classes or ignore
# ----------------------------------------------------------------------------------------------------

@dataclass
class FolderSummary:
    """What one scan of a split found (cached by the folders' fingerprint)."""

    images: int
    missing: list[str]
    """Images without a label map."""
    mismatched: list[list]
    """[image name, "WxH" of the image, "WxH" of the label map] per pair of different sizes."""
    not_label_maps: list[list]
    """[label map name, PIL mode] of colour images where a label map should be."""
    unreadable: list[str]
    """Files that could not be read (the loader replaces them, counting)."""
    first_with_value: dict[int, str]
    """Every label value stored, with the first label map (by name) that holds it."""


def _cache_file(images: Path, masks: Path, files: list[Path]) -> Path:
    digest = hashlib.sha256()
    for folder in (images, masks):
        digest.update(str(folder.resolve()).encode())
    for image in files:
        for path in (image, mask_path(masks, image)):
            try:
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            except OSError:
                digest.update(f"{path.name}:absent;".encode())
    root = Path(os.environ.get("VILSCALE_CACHE_DIR", Path.home() / ".cache" / "vilscale"))
    return root / "label-maps" / f"{digest.hexdigest()[:32]}.json"


def _scan_pair(image: Path, masks: Path):
    from PIL import Image

    label_path = mask_path(masks, image)
    if not label_path.is_file():
        return ("missing", image.name)
    try:
        with Image.open(image) as handle:
            image_size = handle.size
        with Image.open(label_path) as handle:
            if handle.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                return ("colour", [label_path.name, handle.mode])
            labels = np.asarray(handle)
            mask_size = handle.size
    except OSError:
        return ("unreadable", image.name)
    if image_size != mask_size:
        return ("size", [image.name, "{}x{}".format(*image_size), "{}x{}".format(*mask_size)])
    values = np.flatnonzero(np.bincount(labels.ravel())) if labels.dtype == np.uint8 else np.unique(labels)
    return ("ok", [int(v) for v in values])


def scan_folder(images: str | Path, masks: str | Path, *, workers: int = 16) -> FolderSummary:
    """Read every image header and label map of a split once (or the cached summary of the same files)."""
    images, masks = Path(images), Path(masks)
    files = image_files(images)
    cache = _cache_file(images, masks, files)
    if cache.is_file():
        try:
            raw = json.loads(cache.read_text())
            raw["first_with_value"] = {int(k): v for k, v in raw["first_with_value"].items()}
            return FolderSummary(**raw)
        except (OSError, ValueError, TypeError, KeyError):
            pass  # a damaged cache entry: scan again
    summary = FolderSummary(images=len(files), missing=[], mismatched=[], not_label_maps=[], unreadable=[],
                            first_with_value={})
    with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        for image, (kind, detail) in zip(files, pool.map(lambda path: _scan_pair(path, masks), files)):
            if kind == "missing":
                summary.missing.append(detail)
            elif kind == "colour":
                summary.not_label_maps.append(detail)
            elif kind == "unreadable":
                summary.unreadable.append(detail)
            elif kind == "size":
                summary.mismatched.append(detail)
            else:
                for value in detail:
                    summary.first_with_value.setdefault(value, f"{image.stem}.png")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(summary.__dict__))
        temporary.replace(cache)
    except OSError:
        pass  # no cache here: the next launch scans again
    return summary


def check_ade_folder(images: str, masks: str, *, what: str, num_classes: int, ignore_index: int,
                     reduce_zero_label: bool) -> FolderSummary:
    """Pre-flight of one split (raises DataError with one line): folders present, an image folder with images,
    every image with a same-named label map of its size, every stored label a class (after ``reduce_zero_label``)
    or ``ignore_index``."""
    images_key, masks_key = f"data.{what}_images", f"data.{what}_masks"
    for key, folder in ((images_key, images), (masks_key, masks)):
        if not Path(folder).is_dir():
            wanted = "images" if "images" in key else "label maps"
            raise DataError(f"{key}={folder!r} is not a folder; give the split's {wanted}")
    summary = scan_folder(images, masks)
    if not summary.images:
        raise DataError(f"{images_key}={images!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if summary.missing:
        raise DataError(f"{len(summary.missing)} of {summary.images} images in {images} have no label map in {masks} "
                        f"(the same name, .png), e.g. {summary.missing[:3]}")
    if summary.not_label_maps:
        name, mode = summary.not_label_maps[0]
        raise DataError(f"{len(summary.not_label_maps)} file(s) in {masks} are colour images, not label maps (e.g. "
                        f"{name}, mode {mode}); write one class index per pixel (PNG mode L, P or 16-bit)")
    if summary.mismatched:
        name, image_size, mask_size = summary.mismatched[0]
        raise DataError(f"{len(summary.mismatched)} image(s) in {images} differ in size from their label maps in "
                        f"{masks}, e.g. {name}: image {image_size}, label map {mask_size}")
    bad = []
    for value, first in sorted(summary.first_with_value.items()):
        mapped = int(map_labels(np.array([value]), reduce_zero_label=reduce_zero_label, ignore_index=ignore_index)[0])
        if mapped != ignore_index and not 0 <= mapped < num_classes:
            bad.append((value, first))
    if bad:
        value, first = bad[-1]
        shift = " after data.reduce_zero_label's shift" if reduce_zero_label else ""
        mapped = map_labels(np.array([value]), reduce_zero_label=reduce_zero_label, ignore_index=ignore_index)
        needed = int(mapped[0]) + 1
        raise DataError(f"{masks} holds label value {value} (e.g. in {first}), which{shift} is neither a class of "
                        f"model.num_classes={num_classes} nor data.ignore_index={ignore_index}; set "
                        f"model.num_classes={needed}, or data.ignore_index / data.reduce_zero_label to match the data")
    return summary
