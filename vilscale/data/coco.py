"""COCO-format detection data: an image folder and a COCO instances JSON, read with pycocotools through
torchvision's ``CocoDetection`` and ``wrap_dataset_for_transforms_v2``, and a distributed loader with the
guarantees of the classification loader (disjoint per rank, seeded per epoch, exact resume).

What the loader yields per batch: a list of ``uint8`` image tensors ``(3, H, W)``, a list of target dicts
(``boxes`` XYXY float in pixels, ``labels`` contiguous 1..K, ``masks`` ``(N, H, W)`` uint8 when asked for,
``image_id``), and the dataset indices. Resizing and normalisation are the detector's own
(torchvision's ``GeneralizedRCNNTransform``); the loader only flips, with transforms v2, so boxes and masks
move with the image.

Training follows torchvision's detection references: crowd regions are left out of the targets, boxes
narrower or lower than one pixel are dropped (``SanitizeBoundingBoxes``), and images left without any
usable annotation are not trained on; each is counted (``CocoData.stats``) and logged once. Evaluation
reads every image, with all of its annotations left to COCOeval.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.datasets import CocoDetection, VisionDataset

from vilscale.data.manifest import DataError


@dataclass
class CocoStats:
    """What reading the annotations left out (training) or found (both)."""

    images: int = 0
    annotations: int = 0
    crowd: int = 0
    degenerate: int = 0
    images_without_annotations: int = 0

    def line(self) -> str:
        return (f"{self.images} images, {self.annotations} annotations; left out of training: {self.crowd} crowd "
                f"regions, {self.degenerate} boxes under 1 pixel, {self.images_without_annotations} images "
                "without a usable annotation")


def read_coco_json(path: str | Path) -> dict:
    """The parsed instances JSON, or a DataError saying why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a COCO instances JSON (annotations.json)")
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not COCO JSON: {error}") from None
    if not isinstance(content, dict) or not all(isinstance(content.get(key), list)
                                                for key in ("images", "annotations", "categories")):
        raise DataError(f"{path} is not COCO instances JSON: it needs lists 'images', 'annotations' and "
                        "'categories'")
    return content


def categories_of(content: dict) -> list[tuple[int, str]]:
    """(category id, name) sorted by id: the contiguous labels 1..K follow this order."""
    return sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in content["categories"])


def check_coco_folder(content: dict, annotations: str | Path, images: str | Path, *,
                      what: str) -> list[tuple[int, str]]:
    """Pre-flight on a parsed instances JSON (``read_coco_json``): every image it names exists in ``images``;
    returns its categories."""
    folder = Path(images)
    if not folder.is_dir():
        raise DataError(f"{what}: image folder {folder} does not exist")
    missing = [image["file_name"] for image in content["images"] if not (folder / image["file_name"]).is_file()]
    if missing:
        raise DataError(f"{what}: {len(missing)} of {len(content['images'])} images named in {annotations} are "
                        f"missing from {folder}, e.g. {missing[:3]}")
    if not content["categories"]:
        raise DataError(f"{what}: {annotations} lists no categories")
    return categories_of(content)


class CocoData:
    """One split: ``CocoDetection`` wrapped for transforms v2, labels remapped to 1..K.

    Args:
        images: the image folder.
        annotations: the COCO instances JSON.
        train: training filters (crowd, degenerate boxes, images without annotations).
        masks: decode instance masks (Mask R-CNN).
        categories: the (id, name) list labels are numbered by (the training split's, so val agrees).
        content: ``annotations`` already parsed by ``read_coco_json`` (COCO's train JSON is about 450 MB: it is
            parsed once and shared, pycocotools' index included).
    """

    def __init__(self, images: str | Path, annotations: str | Path, *, train: bool, masks: bool,
                 categories: list[tuple[int, str]] | None = None, content: dict | None = None):
        from torchvision.datasets import wrap_dataset_for_transforms_v2

        content = read_coco_json(annotations) if content is None else content
        self.annotations_path = Path(annotations)
        self.categories = categories or categories_of(content)
        self.label_of = {cat_id: index + 1 for index, (cat_id, _) in enumerate(self.categories)}
        self.category_of = {label: cat_id for cat_id, label in self.label_of.items()}
        self.train, self.masks = train, masks
        base = ParsedCocoDetection(images, content)
        keys = ("image_id", "boxes", "labels", "iscrowd") + (("masks",) if masks else ())
        self.dataset = wrap_dataset_for_transforms_v2(base, target_keys=keys)
        self.image_ids = list(base.ids)
        self.stats = CocoStats(images=len(self.image_ids), annotations=len(content["annotations"]))
        self.usable = list(range(len(self.image_ids)))
        if train:
            self.usable = self._training_images(base.coco)

    def _training_images(self, coco) -> list[int]:
        usable = []
        for index, image_id in enumerate(self.image_ids):
            good = 0
            for ann in coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    self.stats.crowd += 1
                elif ann["bbox"][2] < 1 or ann["bbox"][3] < 1:
                    self.stats.degenerate += 1
                elif ann["category_id"] in self.label_of:
                    good += 1
            if good:
                usable.append(index)
            else:
                self.stats.images_without_annotations += 1
        return usable

    def __len__(self) -> int:
        return len(self.usable)

    @property
    def source(self) -> Path:
        """What the split is read from, for messages."""
        return self.annotations_path

    def dataset_index(self, position: int) -> int:
        """The index of the ``position``-th usable image in the annotation file's sorted image ids."""
        return self.usable[position]

    def describe(self, position: int) -> str:
        return f"image {self.image_ids[self.usable[position]]} of {self.annotations_path}"

    def blank(self):
        """(image, target) of a slot that holds no image (a filler, or an evaluation image that cannot be read): a
        small black image without objects, whose predictions are dropped (its index is negative)."""
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": -1}
        if self.masks:
            target["masks"] = torch.zeros(0, 32, 32, dtype=torch.uint8)
        return torch.zeros(3, 32, 32, dtype=torch.uint8), target

    def load(self, position: int, *, flip: bool):
        """(uint8 image (3, H, W), target) of the ``position``-th usable image."""
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        image, target = self.dataset[self.usable[position]]
        image = v2.functional.pil_to_tensor(image) if not isinstance(image, torch.Tensor) else image
        image = tv_tensors.Image(image)
        image_id = int(self.image_ids[self.usable[position]])
        boxes = target.get("boxes")
        if boxes is None:  # an image without annotations (evaluation)
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=image.shape[-2:])
        labels = torch.as_tensor([self.label_of.get(int(c), 0) for c in target.get("labels", [])], dtype=torch.int64)
        sample = {"boxes": boxes, "labels": labels}
        if self.masks:
            masks = target.get("masks")
            sample["masks"] = masks if masks is not None else tv_tensors.Mask(
                torch.zeros(0, *image.shape[-2:], dtype=torch.uint8))
        if self.train:
            keep = torch.as_tensor(target.get("iscrowd", [0] * len(labels)), dtype=torch.bool).logical_not()
            keep &= labels > 0
            sample = {key: tv_tensors.wrap(value[keep], like=value) if isinstance(value, tv_tensors.TVTensor)
                      else value[keep] for key, value in sample.items()}
            if flip:
                image, sample = v2.functional.horizontal_flip(image), {
                    key: v2.functional.horizontal_flip(value) for key, value in sample.items()}
            image, sample = v2.SanitizeBoundingBoxes(min_size=1)(image, sample)
        out = {"boxes": sample["boxes"].as_subclass(torch.Tensor).float(), "labels": sample["labels"],
               "image_id": image_id}
        if self.masks:
            out["masks"] = sample["masks"].as_subclass(torch.Tensor).to(torch.uint8)
        return image.as_subclass(torch.Tensor), out


class ParsedCocoDetection(CocoDetection):
    """torchvision's ``CocoDetection`` over an instances JSON that is already parsed (its own constructor would
    read and parse the file again): the same ``root``, ``coco`` and ``ids`` its constructor sets."""

    def __init__(self, images: str | Path, content: dict):
        VisionDataset.__init__(self, str(images))
        self.coco = COCO()
        self.coco.dataset = content
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self.coco.createIndex()
        self.ids = list(sorted(self.coco.imgs.keys()))


FILLER = -1  # a validation slot that only evens out the ranks; its predictions are dropped
SKIPPED = -2  # a validation image that could not be read: left out of the evaluation (and counted), never replaced


class _Positions(torch.utils.data.Dataset):
    """The positions a rank reads this epoch (``positions[start:]``), each loaded by ``data.load(position,
    **draws[i])`` (its random augmentation, drawn by the loader). In training an image that cannot be read is
    replaced by the next readable one of the rank's list (the same replacement after a resume, and every rank keeps
    its number of batches); in evaluation (``replace`` False) it is skipped: its slot gets ``data.blank()`` as a
    filler does, so the image is never scored twice. The failures are returned."""

    def __init__(self, data, positions: list[int], draws: list[dict], start: int, *, replace: bool = True):
        self.data, self.positions, self.draws, self.start = data, positions, draws, start
        self.replace = replace

    def __len__(self) -> int:
        return len(self.positions) - self.start

    def __getitem__(self, item: int):
        failures = []
        position = self.positions[self.start + item]
        if position == FILLER:  # evens out the ranks' evaluation batches
            return FILLER, self.data.blank(), []
        if not self.replace:
            try:
                return position, self.data.load(position, **self.draws[self.start + item]), []
            except OSError as error:  # PIL's unreadable or truncated images
                return SKIPPED, self.data.blank(), [(position, f"{type(error).__name__}: {str(error)[:200]}")]
        for offset in range(len(self.positions)):
            index = (self.start + item + offset) % len(self.positions)
            position = self.positions[index]
            try:
                return position, self.data.load(position, **self.draws[index]), failures
            except OSError as error:  # PIL's unreadable or truncated images
                failures.append((position, f"{type(error).__name__}: {str(error)[:200]}"))
        raise DataError(f"no image of this rank's part of {self.data.source} can be read")


def _collate(items):
    return items


def train_batches_per_rank(images: int, world_size: int, batch_size: int) -> int:
    """Training batches per rank and epoch: equal disjoint parts, the remainder of fewer than
    ``world_size x batch_size`` images left out."""
    return images // (world_size * batch_size)


@dataclass
class CocoLoader:
    """A rank's batches of one split.

    Training: every epoch a seeded permutation of the usable images (``seed``, ``epoch``), cut into
    ``world_size`` disjoint equal parts (the remainder of fewer than ``world_size x batch`` images is left
    out, a different few each epoch); each image's flip is drawn from (seed, epoch, image), so a resumed
    epoch yields bit-identical batches whatever the worker scheduling. ``state_dict`` holds the epoch and
    the batches consumed. Validation: every image exactly once across ranks (rank r reads r, r + world, ...),
    unflipped; ranks with one image fewer repeat their first one as filler, with index -1 (every rank runs the
    same number of forward passes, which ZeRO-3's parameter gathering needs).

    ``data`` is any split with ``__len__``, ``load(position, **draws)``, ``dataset_index``, ``describe`` and
    ``source``; a subclass that augments more than a flip overrides ``_draw`` (``vilscale.data.ade``).
    """

    data: CocoData
    rank: int
    world_size: int
    batch_size: int
    seed: int
    train: bool
    num_workers: int = 0
    hflip: float = 0.5
    decode_error_limit: int = 10
    epoch: int = 0
    batches_done: int = 0
    decode_errors: int = 0
    skipped: int = 0
    """Evaluation: images of this rank's part that could not be read in the latest pass (left out, not scored)."""
    _logged: set = field(default_factory=set)

    def __len__(self) -> int:
        if self.train:
            return train_batches_per_rank(len(self.data), self.world_size, self.batch_size)
        per_rank = -(-len(self.data) // self.world_size)  # the same on every rank (fillers make up the rest)
        return -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "decode_errors": self.decode_errors}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.decode_errors = int(state.get("decode_errors", 0))

    def positions(self) -> list[int]:
        """This rank's positions of the current epoch, in reading order."""
        if not self.train:
            mine = list(range(self.rank, len(self.data), self.world_size))
            return mine + [FILLER] * (-(-len(self.data) // self.world_size) - len(mine))
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data))
        per_rank = len(self) * self.batch_size
        return order[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()

    def _flip(self, position: int) -> bool:
        if not self.train or self.hflip <= 0:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, position, 1]).random() < self.hflip)

    def _draw(self, position: int) -> dict:
        """The keyword arguments of ``data.load`` for ``position`` this epoch: its random augmentation, a function
        of (seed, epoch, position) only, so a resumed epoch draws the same whatever the worker scheduling."""
        return {"flip": self._flip(position) if position != FILLER else False}

    def __iter__(self):
        if not self.train:
            self.batches_done, self.skipped = 0, 0  # an evaluation always reads the whole split
        positions = self.positions()
        dataset = _Positions(self.data, positions, [self._draw(p) for p in positions],
                             start=self.batches_done * self.batch_size, replace=self.train)
        # The DataLoader draws its workers' base seed when an iterator starts. From the global stream that draw
        # would shift every later dropout mask and detector sampling by one, and a resumed run starts its
        # iterator at another point of that stream than the uninterrupted run did: its own generator instead.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                                             num_workers=self.num_workers, collate_fn=_collate,
                                             persistent_workers=False, generator=generator)
        for batch in loader:
            images, targets, indices = [], [], []
            for position, (image, target), failures in batch:
                for failed, error in failures:
                    self._bad(failed, error)
                images.append(image)
                targets.append(target)
                indices.append(self.data.dataset_index(position) if position >= 0 else -1)
                self.skipped += position == SKIPPED
            self.batches_done += 1
            yield images, targets, torch.as_tensor(indices, dtype=torch.int64)

    def _bad(self, position: int, error: str) -> None:
        self.decode_errors += 1
        what = self.data.describe(position)
        if what not in self._logged:
            self._logged.add(what)
            instead = ("the next readable image of this rank takes its place" if self.train else
                       "it is left out of the evaluation (counted in its report)")
            print(f"[vilscale] {what} cannot be read ({error}); {instead}", file=sys.stderr, flush=True)
        if self.decode_errors > self.decode_error_limit:
            raise DataError(f"{self.decode_errors} images of {self.data.source} could not be read "
                            f"(data.decode_error_limit={self.decode_error_limit}); check the image folder")


# ----------------------------------------------------------------------------------------------------
# digits-coco: canvases of real handwritten digits, in COCO format
# ----------------------------------------------------------------------------------------------------

DIGIT_THRESHOLD = 96  # grey level (of 255) above which a pixel of an upscaled digit is stroke


@dataclass(frozen=True)
class DigitsCocoSettings:
    canvas: int = 96
    """Side of the square canvases (pixels)."""
    digits_per_image: tuple[int, int] = (1, 4)
    """Inclusive range of digits placed on a canvas."""
    digit_side: tuple[int, int] = (20, 44)
    """Inclusive range of the side a digit's 8x8 image is upscaled to."""
    train_images: int = 600
    val_images: int = 120
    seed: int = 0
    train_digits_per_class: int | None = None
    """Draw the training canvases from only this many training digits of each class (the first of the class in
    the classification demo's training split): a small labelled set, whose writers the validation canvases
    (drawn from every validation digit) never share. None: every training digit."""


def _place_digits(rng: np.random.Generator, sources: list[np.ndarray], labels: list[int],
                  settings: DigitsCocoSettings):
    """One canvas (uint8 H x W) and its objects [(label, x0, y0, mask H x W bool)] without overlaps."""
    from PIL import Image

    side = settings.canvas
    canvas = np.zeros((side, side), dtype=np.uint8)
    taken = np.zeros((side, side), dtype=bool)
    objects = []
    wanted = int(rng.integers(settings.digits_per_image[0], settings.digits_per_image[1] + 1))
    for _ in range(wanted * 20):
        if len(objects) == wanted:
            break
        which = int(rng.integers(len(sources)))
        size = int(rng.integers(settings.digit_side[0], settings.digit_side[1] + 1))
        digit = np.asarray(Image.fromarray(sources[which]).resize((size, size), Image.BILINEAR))
        y0, x0 = (int(v) for v in rng.integers(0, side - size + 1, size=2))
        if taken[y0:y0 + size, x0:x0 + size].any():
            continue
        taken[y0:y0 + size, x0:x0 + size] = True
        canvas[y0:y0 + size, x0:x0 + size] = np.maximum(canvas[y0:y0 + size, x0:x0 + size], digit)
        mask = np.zeros((side, side), dtype=bool)
        mask[y0:y0 + size, x0:x0 + size] = digit > DIGIT_THRESHOLD
        if mask.any():
            objects.append((labels[which], mask))
    return canvas, objects


def first_of_each_class(labels: list[int], per_class: int) -> list[int]:
    """Indices of the first ``per_class`` samples of every class in ``labels``, in their order."""
    seen: dict[int, int] = {}
    kept = []
    for index, label in enumerate(labels):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            kept.append(index)
    return kept


def write_digits_coco(out_dir: str | Path, settings: DigitsCocoSettings = DigitsCocoSettings()) -> dict[str, Path]:
    """``OUT/{train,val}/annotations.json`` and ``OUT/{train,val}/images/*.jpg``: canvases of the scikit-learn
    digits (train canvases from the classification demo's training digits, val canvases from its validation
    digits), boxes and masks (RLE) from the strokes, one category per digit. Deterministic for a seed.

    Also ``OUT/{train,val}/masks/*.png``, ADE20K-format label maps of the same canvases (same names, ``.png``):
    0 on the background and digit + 1 on its strokes, so category id = label value; ADE20K's
    ``data.reduce_zero_label`` makes the background "ignore" and the digits classes 0-9."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from vilscale.data.writer import scan_digits

    out = Path(out_dir)
    train_plan, val_plan = scan_digits(side=8)
    written = {}
    categories = [{"id": digit + 1, "name": str(digit), "supercategory": "digit"} for digit in range(10)]
    for split, plan, count, offset in (("train", train_plan, settings.train_images, 0),
                                       ("val", val_plan, settings.val_images, 1)):
        sources = [np.asarray(ref[1])[:, :, 0] for ref in plan.refs]
        labels = plan.labels
        if split == "train" and settings.train_digits_per_class is not None:
            kept = first_of_each_class(labels, settings.train_digits_per_class)
            sources, labels = [sources[i] for i in kept], [labels[i] for i in kept]
        rng = np.random.default_rng([settings.seed, offset])
        folder, label_folder = out / split / "images", out / split / "masks"
        folder.mkdir(parents=True, exist_ok=True)
        label_folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_index in range(count):
            canvas, objects = _place_digits(rng, sources, labels, settings)
            name = f"{split}_{image_index:06d}.jpg"
            Image.fromarray(np.repeat(canvas[:, :, None], 3, axis=2)).save(folder / name, quality=95)
            label_map = np.zeros(canvas.shape, dtype=np.uint8)
            for label, mask in objects:
                label_map[mask] = label + 1
            Image.fromarray(label_map).save(label_folder / f"{Path(name).stem}.png")
            image_id = image_index + 1
            images.append({"id": image_id, "file_name": name, "height": settings.canvas, "width": settings.canvas})
            for label, mask in objects:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                x0, y0, w, h = (float(v) for v in mask_utils.toBbox(rle))
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                    "bbox": [x0, y0, w, h], "area": float(mask.sum()), "iscrowd": 0,
                                    "segmentation": {"size": [settings.canvas, settings.canvas],
                                                     "counts": rle["counts"].decode("ascii")}})
        path = out / split / "annotations.json"
        drawn = f", from {len(sources)} digits" if len(sources) < len(plan.refs) else ""
        description = f"vilscale digits-coco {split} (seed {settings.seed}{drawn})"
        path.write_text(json.dumps({"info": {"description": description},
                                    "images": images, "annotations": annotations, "categories": categories}))
        written[split] = path
    return written
