"""Write a dataset as FFCV shards plus a `manifest.json` (see `vilscale.data.manifest` for its layout).

Sources: an ImageFolder (one folder per class, ImageNet-1K's train/ and val/ layout), ImageNet-21K (a
folder of per-synset tar files such as ``n01440764.tar``, or per-synset folders) and scikit-learn's
handwritten digits (the quickstart data).

How it is written:
- The samples are shuffled once (seeded) and cut into ``num_shards`` shards of equal sample count, so every
  shard is a random mix of classes and a rank that reads a few shards still sees all classes.
- Shards are written in parallel, one shard per worker process at a time; each worker decodes its images
  with Pillow and hands them to FFCV's `RGBImageField` (resize to ``max_side``, JPEG or raw storage).
- What is stored is what the user gave (see `load_rgb`): EXIF orientation applied, 16-bit images scaled to
  8 bits over their full range, palette, grey, CMYK converted to RGB, alpha dropped.
- A corrupt or unreadable image is skipped and listed in the manifest's ``skipped``; it never aborts. So is a
  damaged ImageNet-21K tar: its readable members are kept, the tar and the members lost are listed, and every
  bad tar of the source is named in one run. Empty class folders (``empty_classes``) and files that are not
  images (``ignored``) are listed too.
- A shard is written under a temporary name and renamed when complete; a state file records every
  finished shard with its sha256. Running the same command again after an interruption keeps the
  finished shards whose checksum still matches and writes only the rest. The same source and settings
  give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vilscale.data.ffcv_import import import_ffcv
from vilscale.data.manifest import FORMAT, DataError, Manifest, load_manifest
from vilscale.files import atomic_write_json, sha256_of

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".gif", ".tif", ".tiff")
STATE_NAME = ".prepare-state.json"
MAX_FFCV_SIDE = 65535  # FFCV stores heights and widths as uint16


@dataclass(frozen=True, slots=True)
class WriterSettings:
    max_side: int = 512
    """Images whose longer side exceeds this are resized down to it (0: keep the original size)."""
    jpeg_quality: int = 90
    """JPEG quality of the stored images."""
    compress_probability: float = 1.0
    """Fraction of images stored as JPEG; the rest are stored raw (faster to decode, larger)."""
    page_size: int = 8 << 20
    """FFCV page size in bytes (a power of two >= 2 MiB, larger than any stored image)."""
    seed: int = 0
    """Seed of the sample shuffle and of the JPEG/raw choice."""

    def __post_init__(self):
        if self.max_side < 0:
            raise DataError(f"max_side={self.max_side} must be >= 0 (0 keeps the original size)")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"jpeg_quality={self.jpeg_quality} must be in [1, 100]")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise DataError(f"compress_probability={self.compress_probability} must be in [0, 1]")
        if self.page_size < (2 << 20) or self.page_size & (self.page_size - 1):
            raise DataError(f"page_size={self.page_size} must be a power of two >= 2 MiB")


@dataclass(slots=True)
class Plan:
    """Everything to write: one entry per candidate sample, before shuffling."""

    kind: str
    source: str
    classes: list[str]
    refs: list
    """Per sample: ("file", path) | ("tar", tar_path, offset, size) | ("array", uint8 HxWx3 ndarray)."""
    names: list[str]
    """Per sample: the name reported in `skipped` (path relative to the source, or tar:member)."""
    labels: list[int]
    approx_bytes: int
    """Rough size of the stored data (source file sizes), used by --shard-size-mb."""
    lost: list = field(default_factory=list)
    """Found while scanning: damaged tars and the members lost from them (``{"path", "reason"}``), listed under the
    manifest's ``skipped`` with the images that fail to decode."""
    ignored: list = field(default_factory=list)
    """Files (or tar members) that are not images by their extension (``{"path", "reason"}``)."""
    empty_classes: list = field(default_factory=list)
    """Class folders without a single image (they keep their class index)."""
    dropped_classes: list = field(default_factory=list)
    """Classes left out by `split_imagenet21k` (``{"class", "images"}``): too few images to keep."""
    processing: dict = field(default_factory=dict)
    """How `split_imagenet21k` made this plan (thresholds, seed, which split); recorded in the manifest's writer."""


# --------------------------------------------------------------------------------------------- sources

def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names in index order from a text file (one per line, '#' comments) or a manifest.json."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class list {path} does not exist; give a text file with one class name per line "
                        f"or a manifest.json written by `vilscale prepare`")
    if path.suffix == ".json":
        return list(load_manifest(path).classes)
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"class list {path} names no class")
    if len(set(names)) != len(names):
        raise DataError(f"class list {path} names a class twice")
    return names


def _check_source_dir(source: Path) -> None:
    if not source.exists():
        raise DataError(f"source {source} does not exist; give the folder that holds the images")
    if not source.is_dir():
        raise DataError(f"source {source} is not a folder")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


_NOT_AN_IMAGE = f"not an image file (its extension is not one of {', '.join(IMAGE_EXTENSIONS)})"


def _class_index(classes: list[str] | None, class_name: str, example: str, class_list_path: str | None):
    if classes is None:
        return None
    try:
        return classes.index(class_name)
    except ValueError:
        raise DataError(f"{example}: its class {class_name!r} is not in the class list {class_list_path}; add the "
                        f"class to the list or remove the files") from None


def scan_imagefolder(source: str | os.PathLike, class_list: str | None = None) -> Plan:
    """One sub-folder per class (searched recursively for images); files directly in `source` are ignored."""
    source = Path(source)
    _check_source_dir(source)
    classes = read_class_list(class_list) if class_list else None
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    found: dict[str, list[tuple[str, int]]] = {}
    ignored = []
    for folder in folders:
        files = []
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                if _is_image(name):
                    files.append((full, os.stat(full).st_size))
                else:
                    ignored.append({"path": os.path.relpath(full, source), "reason": _NOT_AN_IMAGE})
        found[folder.name] = files
        if files:
            _class_index(classes, folder.name, files[0][0], class_list)
    if classes is None:
        classes = [f.name for f in folders]
    if not any(found.values()):
        raise DataError(f"source {source} holds no images in class sub-folders (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)} in {len(folders)} folders); an ImageFolder has one folder per "
                        f"class with the images inside")
    refs, names, labels, total = [], [], [], 0
    for class_name, files in found.items():
        label = classes.index(class_name)
        for path, size in files:
            refs.append(("file", path))
            names.append(os.path.relpath(path, source))
            labels.append(label)
            total += size
    empty = [c for c in classes if not found.get(c)]
    return Plan("imagefolder", str(source.resolve()), classes, refs, names, labels, total, ignored=ignored,
                empty_classes=empty)


@dataclass(slots=True)
class TarScan:
    """What could be read from one tar: its image members, and what was lost or ignored."""

    members: list  # (name, data offset, size)
    lost: list  # {"path", "reason"}
    ignored: list  # {"path", "reason"}


def _end_of_archive(block: bytes) -> bool:
    return len(block) >= tarfile.BLOCKSIZE and not any(block[:tarfile.BLOCKSIZE])


def _next_header(handle, offset: int, size: int) -> int | None:
    """The offset of the next 512-byte block at or after ``offset`` that is a valid tar header (its checksum
    matches), or None."""
    while offset + tarfile.BLOCKSIZE <= size:
        block = os.pread(handle.fileno(), tarfile.BLOCKSIZE, offset)
        if any(block):
            try:
                tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
                return offset
            except tarfile.HeaderError:
                pass
        offset += tarfile.BLOCKSIZE
    return None


def _scan_tar(path: Path) -> TarScan:
    """Read a tar's member table, keeping every member that can be read.

    - A member whose data runs past the end of the file (a tar cut short inside it) is lost, and listed.
    - A damaged header is skipped: the scan resumes at the next block with a valid header checksum; the member
      whose header was damaged is lost (its name with it), and the byte range is listed.
    - A tar cut short exactly between two members lacks the end-of-archive marker (two zero blocks): that is
      detected and listed, but a tar records no member count, so how many members followed cannot be known.
    - A file that is not a tar at all is listed as lost whole.
    """
    scan = TarScan([], [], [])
    name = path.name
    try:
        size = path.stat().st_size
        archive = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError) as error:
        scan.lost.append({"path": name, "reason": f"not a readable tar file ({error}); nothing was read from it"})
        return scan
    with archive, open(path, "rb") as raw:
        while True:
            try:
                member = archive.next()
            except (tarfile.TarError, OSError) as error:  # cut short inside a member's data (listed below)
                scan.lost.append({"path": name, "reason": f"truncated tar: unreadable after byte {archive.offset} "
                                  f"({error}); the members before it were kept, members after that point (if any) "
                                  f"are lost and a tar does not record how many there were"})
                break
            if member is None:  # the end marker, the end of the file, or a header that does not parse
                offset = archive.offset
                if offset >= size:
                    scan.lost.append({"path": name, "reason": f"truncated tar: it ends after {len(scan.members)} "
                                      f"image(s) without the end-of-archive marker, so members after that point "
                                      f"(if any) are lost; a tar does not record how many there were"})
                    break
                if _end_of_archive(os.pread(raw.fileno(), tarfile.BLOCKSIZE, offset)):
                    break
                resume = _next_header(raw, offset + tarfile.BLOCKSIZE, size)
                where = f"bytes {offset}-{resume}" if resume is not None else f"bytes {offset}-{size}"
                scan.lost.append({"path": name, "reason": f"damaged tar: a header that does not parse at byte "
                                  f"{offset}; the member(s) stored in {where} are lost"
                                  + ("" if resume is not None else " (nothing readable after it)")})
                if resume is None:
                    break
                archive.offset = resume
                continue
            if not member.isfile():
                continue
            if member.offset_data + member.size > size:
                scan.lost.append({"path": f"{name}:{member.name}",
                                  "reason": f"lost: the tar is truncated inside this member "
                                            f"({size - member.offset_data} of {member.size} bytes present)"})
            elif _is_image(member.name):
                scan.members.append((member.name, member.offset_data, member.size))
            else:
                scan.ignored.append({"path": f"{name}:{member.name}", "reason": _NOT_AN_IMAGE})
    return scan


def scan_imagenet21k(source: str | os.PathLike, class_list: str | None = None, workers: int = 4) -> Plan:
    """Per-synset tar files (``n01440764.tar``) and/or per-synset folders; the synset is the class."""
    source = Path(source)
    _check_source_dir(source)
    classes = read_class_list(class_list) if class_list else None
    tars = sorted(p for p in source.iterdir() if p.is_file() and p.suffix == ".tar")
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not tars and not folders:
        raise DataError(f"source {source} holds neither per-synset .tar files nor per-synset folders")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        scans = list(pool.map(_scan_tar, tars))
    folder_plan = scan_imagefolder(source) if folders and any(
        _is_image(n) for f in folders for _, _, ns in os.walk(f) for n in ns) else None
    synsets = sorted({t.stem for t in tars} | {f.name for f in folders})
    for tar, scan in zip(tars, scans):
        if scan.members:
            _class_index(classes, tar.stem, str(tar), class_list)
    if classes is None:
        classes = synsets
    refs, names, labels, total = [], [], [], 0
    lost = [item for scan in scans for item in scan.lost]
    ignored = [item for scan in scans for item in scan.ignored]
    for tar, scan in zip(tars, scans):
        label = classes.index(tar.stem)
        for name, offset, size in scan.members:
            refs.append(("tar", str(tar), offset, size))
            names.append(f"{tar.name}:{name}")
            labels.append(label)
            total += size
    with_images = {tar.stem for tar, scan in zip(tars, scans) if scan.members}
    if folder_plan is not None:
        ignored.extend(folder_plan.ignored)
        for ref, name, label in zip(folder_plan.refs, folder_plan.names, folder_plan.labels):
            synset = folder_plan.classes[label]
            with_images.add(synset)
            refs.append(ref)
            names.append(name)
            labels.append(_class_index(classes, synset, ref[1], class_list or "(synsets)"))
            total += os.stat(ref[1]).st_size
    if not refs:
        problems = "".join(f"\n  {item['path']}: {item['reason']}" for item in lost[:10])
        raise DataError(f"source {source} holds no readable images in its {len(tars)} tar files and {len(folders)} "
                        f"folders{problems}")
    return Plan("imagenet21k", str(source.resolve()), classes, refs, names, labels, total, lost=lost,
                ignored=ignored, empty_classes=[c for c in classes if c not in with_images])


PAPER_MIN_IMAGES_PER_CLASS = 500
"""ImageNet-21K-P (Ridnik et al., 2021): classes with 500 or fewer images are dropped (fall11: 11,221 classes kept)."""
PAPER_VAL_PER_CLASS = 50
"""ImageNet-21K-P: 50 images of every kept class are held out for validation (fall11: 561,052 images)."""


def _image_key(name: str) -> str:
    """The image's path inside its class ("n01.tar:a/x.JPEG" and "n01/a/x.JPEG" both give "a/x.JPEG"), so the
    same tree as tars or as folders sorts, and so splits, the same way."""
    if ".tar:" in name:
        return name.split(".tar:", 1)[1]
    return name.replace(os.sep, "/").split("/", 1)[1]


def split_imagenet21k(plan: Plan, *, min_images_per_class: int | None, val_per_class: int,
                      seed: int = 0) -> tuple[Plan, Plan | None]:
    """ImageNet-21K as labs use it (ImageNet-21K-P): drop small classes, hold out a validation split.

    Every class with ``min_images_per_class`` or fewer images found by the scan is dropped (None keeps every
    class, empty ones included) and listed; the classes kept keep their order. From each kept class,
    ``val_per_class`` images are held out, chosen by a generator seeded with ``seed`` and the synset's name
    among the class's images sorted by their path inside the class: the same images whatever other classes
    exist and whether the tree is stored as tars or folders. Returns the training plan and the validation
    plan (None when ``val_per_class`` is 0), with one class list. Raises `DataError` before anything is
    written when the thresholds leave no class or leave a class without a training image.
    """
    for flag, value in (("--min-images-per-class", min_images_per_class), ("--val-per-class", val_per_class)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise DataError(f"{flag}={value} must be an integer >= 0")
    by_class: dict[int, list[int]] = {label: [] for label in range(len(plan.classes))}
    for i, label in enumerate(plan.labels):
        by_class[label].append(i)
    kept = [label for label in by_class
            if min_images_per_class is None or len(by_class[label]) > min_images_per_class]
    dropped = [{"class": plan.classes[label], "images": len(by_class[label])} for label in by_class
               if label not in set(kept)]
    if not kept:
        largest = max(len(samples) for samples in by_class.values())
        raise DataError(f"--min-images-per-class {min_images_per_class} drops all {len(plan.classes)} classes of "
                        f"{plan.source} (the largest has {largest} images); lower it below {largest}")
    if val_per_class:
        smallest = min(kept, key=lambda label: len(by_class[label]))
        if val_per_class >= len(by_class[smallest]):
            raise DataError(f"--val-per-class {val_per_class} leaves no training image in class "
                            f"{plan.classes[smallest]} ({len(by_class[smallest])} images); lower --val-per-class or "
                            f"set --min-images-per-class to {val_per_class} or more (it drops such classes)")
    classes = [plan.classes[label] for label in kept]
    rule = {"min_images_per_class": min_images_per_class, "val_per_class": val_per_class, "seed": seed}
    train, val = [], []
    for new_label, label in enumerate(kept):
        samples = sorted(by_class[label], key=lambda i: _image_key(plan.names[i]))
        synset = plan.classes[label]
        chosen = set()
        if val_per_class:
            rng = np.random.default_rng([seed, zlib.crc32(synset.encode())])
            chosen = {samples[j] for j in rng.choice(len(samples), size=val_per_class, replace=False)}
        for i in samples:
            (val if i in chosen else train).append((i, new_label))

    def subset(picked: list[tuple[int, int]], split: str, *, listed: bool) -> Plan:
        picked.sort()
        return Plan(plan.kind, plan.source, classes, [plan.refs[i] for i, _ in picked],
                    [plan.names[i] for i, _ in picked], [label for _, label in picked],
                    int(plan.approx_bytes * len(picked) / max(1, len(plan.refs))),
                    lost=plan.lost if listed else [], ignored=plan.ignored if listed else [],
                    empty_classes=[c for c in plan.empty_classes if c in classes], dropped_classes=dropped,
                    processing={**rule, "split": split})

    return subset(train, "train", listed=True), subset(val, "val", listed=False) if val_per_class else None


DIGITS_VAL_SIZE = 360


def scan_digits(side: int = 32) -> tuple[Plan, Plan]:
    """scikit-learn's 1797 real handwritten digits (8x8, 17 grey levels), upscaled to ``side`` x ``side`` RGB.

    The split is fixed: a stratified 360-image validation set (random_state=0), the other 1437 for training.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if side < 8:
        raise DataError(f"digits side={side} must be >= 8")
    digits = load_digits()
    grey = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = []
    for image in grey:
        big = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
        images.append(np.repeat(big[:, :, None], 3, axis=2))
    index = np.arange(len(images))
    train_idx, val_idx = train_test_split(index, test_size=DIGITS_VAL_SIZE, random_state=0, stratify=digits.target)
    classes = [str(c) for c in range(10)]

    def plan(split: np.ndarray) -> Plan:
        split = np.sort(split)
        return Plan("digits", f"sklearn.datasets.load_digits (side {side})", classes,
                    [("array", images[i]) for i in split], [f"digits[{i}]" for i in split],
                    [int(digits.target[i]) for i in split], len(split) * side * side * 3)

    return plan(train_idx), plan(val_idx)


# --------------------------------------------------------------------------------------------- writing

def load_rgb(image) -> np.ndarray:
    """A Pillow image as the uint8 (H, W, 3) RGB array that is stored: what an image viewer shows.

    - EXIF orientation is applied (a photo taken upright is stored upright).
    - 16-bit and 32-bit integer images (PNG, TIFF) are scaled to 8 bits over their full 16-bit range
      (value / 257), not clipped (Pillow's own conversion clips them, turning them almost white).
    - Palette, grey, grey + alpha, CMYK and YCbCr images are converted to RGB; alpha is dropped (as
      torchvision's ImageFolder loader does).
    - Floating-point images have no defined range and are refused (the image is listed as skipped).
    """
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image).astype(np.uint32)
        if values.max(initial=0) > 65535:
            raise ValueError(f"a {image.mode} image with values above 65535 has no defined 8-bit scale")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise ValueError("floating-point images have no defined 8-bit range; convert them to 8 or 16-bit first")
    return np.asarray(image.convert("RGB"))


def _load_rgb(ref) -> np.ndarray:
    from PIL import Image

    kind = ref[0]
    if kind == "array":
        return ref[1]
    if kind == "file":
        with Image.open(ref[1]) as image:
            return load_rgb(image)
    if kind == "tar":
        _, tar_path, offset, size = ref
        with open(tar_path, "rb") as handle:
            data = os.pread(handle.fileno(), size, offset)
        if len(data) != size:
            raise OSError(f"tar member truncated ({len(data)} of {size} bytes)")
        with Image.open(io.BytesIO(data)) as image:
            return load_rgb(image)
    raise AssertionError(f"unknown reference kind {kind!r}")


_progress = None  # a multiprocessing counter of images handled, shared with the parent


def _init_worker(counter) -> None:
    global _progress
    _progress = counter


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.beton"


def _write_shard(task) -> dict:
    """Write one shard (in a worker process); returns its manifest entry and the images it skipped."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter, handle_sample

    index, out_dir, refs, names, labels, settings = task
    settings = WriterSettings(**settings)
    np.random.seed((settings.seed * 1_000_003 + index) % (2 ** 32))  # FFCV's JPEG-or-raw draw
    fields = {
        "image": RGBImageField(write_mode="proportion", max_resolution=settings.max_side or None,
                               jpeg_quality=settings.jpeg_quality,
                               compress_probability=settings.compress_probability),
        "label": IntField(),
    }
    final = Path(out_dir) / shard_name(index)
    temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    writer = DatasetWriter(str(temporary), fields, page_size=settings.page_size, num_workers=1)
    # Capacity for every candidate; corrupt images are skipped and the header gets the real count. The
    # unused tail of the metadata table is never read (data pointers in the file are absolute).
    writer.num_samples = len(refs)
    writer.prepare()
    skipped = []
    written = 0
    metadata = images = None
    try:
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        allocator = MemoryAllocator(str(temporary), writer.data_region_start, settings.page_size)
        with allocator:
            for ref, name, label in zip(refs, names, labels):
                try:
                    image = _load_rgb(ref)
                    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                        raise ValueError(f"unexpected image shape {image.shape}")
                    if not settings.max_side and max(image.shape[:2]) > MAX_FFCV_SIDE:
                        raise ValueError(f"side {max(image.shape[:2])} exceeds {MAX_FFCV_SIDE}; use --max-side")
                    handle_sample((image, label), written, metadata.dtype.names, metadata, allocator, fields)
                    written += 1
                except Exception as error:  # noqa: BLE001 - any unreadable image is skipped, never fatal
                    skipped.append({"path": name, "reason": f"{type(error).__name__}: {error}"})
                if _progress is not None:
                    with _progress.get_lock():
                        _progress.value += 1
        writer.header["num_samples"] = written
        writer.finalize(allocator.allocations)
        images = metadata["f0"][:written]
        max_height = int(images["height"].max()) if written else 0
        max_width = int(images["width"].max()) if written else 0
    except OSError as error:  # disk full, quota, I/O error: nothing of this shard is kept
        temporary.unlink(missing_ok=True)
        free = shutil.disk_usage(out_dir).free
        raise DataError(f"writing shard {final} failed: {error} ({free / 2**20:.1f} MiB free there); free space or "
                        f"choose another OUT, then run the same command again: finished shards are kept") from None
    finally:
        metadata = images = None  # release the views of the shared buffer before closing it
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
    digest = sha256_of(temporary)
    os.replace(temporary, final)
    return {"index": index, "entry": {"path": final.name, "num_samples": written, "sha256": digest,
                                      "max_height": max_height, "max_width": max_width}, "skipped": skipped}


def _plan_digest(plan: Plan, order: np.ndarray, num_shards: int, settings: WriterSettings) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT, plan.kind, plan.source, plan.classes, num_shards, asdict(settings)]
                             + ([plan.processing] if plan.processing else [])).encode())
    for i in order:
        digest.update(f"{plan.names[i]}\t{plan.labels[i]}\n".encode())
    return digest.hexdigest()


def num_shards_for(plan: Plan, *, num_shards: int | None, shard_size_mb: float | None) -> int:
    if num_shards is not None and shard_size_mb is not None:
        raise DataError("give --num-shards or --shard-size-mb, not both")
    if num_shards is None:
        size_mb = 256.0 if shard_size_mb is None else shard_size_mb
        if size_mb <= 0:
            raise DataError(f"--shard-size-mb={shard_size_mb} must be > 0")
        num_shards = max(1, int(np.ceil(plan.approx_bytes / (size_mb * 2 ** 20))))
    if num_shards < 1:
        raise DataError(f"--num-shards={num_shards} must be >= 1")
    return min(num_shards, len(plan.refs))


def write_shards(plan: Plan, out_dir: str | os.PathLike, *, num_shards: int, settings: WriterSettings,
                 workers: int = 0, overwrite: bool = False, progress: bool | None = None,
                 log=print) -> Manifest:
    """Write (or finish writing) `plan` as `num_shards` shards plus ``out_dir/manifest.json``.

    Args:
        plan: the samples, from one of the ``scan_*`` functions.
        out_dir: folder of the shards and the manifest (created if needed).
        num_shards: how many shards (of equal sample count, ±1).
        settings: the writer settings recorded in the manifest.
        workers: processes writing shards in parallel (0: one per CPU core).
        overwrite: when ``out_dir`` holds shards of a different source or settings, delete them instead of
            refusing.
        progress: show a progress bar (None: only when stderr is a terminal).
        log: where one-line status messages go.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(settings.seed).permutation(len(plan.refs))
    digest = _plan_digest(plan, order, num_shards, settings)
    state_path, manifest_path = out / STATE_NAME, out / "manifest.json"

    previous = None
    for path in (manifest_path, state_path):
        if path.is_file():
            try:
                content = json.loads(path.read_text())
            except ValueError:
                continue
            previous = content.get("writer", content).get("plan_digest")
            if previous is not None:
                break
    if previous is not None and previous != digest:
        if not overwrite:
            raise DataError(f"{out} already holds shards of another source or other settings; choose an empty "
                            f"folder or pass --overwrite to delete them")
        for stale in list(out.glob("shard-*.beton")) + [state_path, manifest_path]:
            stale.unlink(missing_ok=True)
    for stale in out.glob("*.tmp-*"):
        stale.unlink()

    done: dict[int, dict] = {}
    if previous == digest:
        old = json.loads(state_path.read_text()) if state_path.is_file() else None
        if old is None and manifest_path.is_file():
            old_manifest = json.loads(manifest_path.read_text())
            old = {"done": {str(i): {"entry": s, "skipped": [k for k in old_manifest["skipped"]
                                                              if k.get("shard") == i]}
                            for i, s in enumerate(old_manifest["shards"])}}
        for key, result in (old or {}).get("done", {}).items():
            shard_path = out / result["entry"]["path"]
            if shard_path.is_file() and sha256_of(shard_path) == result["entry"]["sha256"]:
                done[int(key)] = result
    if done:
        log(f"keeping {len(done)} finished shard(s) in {out} (checksums verified)")

    bounds = np.linspace(0, len(order), num_shards + 1).round().astype(np.int64)
    tasks = []
    for index in range(num_shards):
        if index in done:
            continue
        chosen = order[bounds[index]:bounds[index + 1]]
        tasks.append((index, str(out), [plan.refs[i] for i in chosen], [plan.names[i] for i in chosen],
                      [plan.labels[i] for i in chosen], asdict(settings)))
    to_write = sum(bounds[t[0] + 1] - bounds[t[0]] for t in tasks)

    def save_state():
        atomic_write_json(state_path, {"plan_digest": digest, "done": {str(k): v for k, v in done.items()}})

    save_state()
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    if tasks:
        # Importing ffcv compiles numba code at import time (seconds); do it once here, the forked workers inherit it.
        import ffcv.fields  # noqa: F401
        import ffcv.writer  # noqa: F401

        context = multiprocessing.get_context("fork")
        counter = context.Value("Q", 0)
        bar = tqdm(total=int(to_write), unit="img", desc=f"writing {len(tasks)} shard(s)", smoothing=0.1,
                   disable=None if progress is None else not progress, dynamic_ncols=True)
        with context.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(counter,)) as pool:
            pending = [pool.apply_async(_write_shard, (task,)) for task in tasks]
            while pending:
                time.sleep(0.1)
                bar.update(counter.value - bar.n)
                still = []
                for result in pending:
                    if result.ready():
                        finished = result.get()  # re-raises a worker's error
                        done[finished["index"]] = finished
                        save_state()
                    else:
                        still.append(result)
                pending = still
            bar.update(counter.value - bar.n)
        bar.close()

    shards, skipped = [], list(plan.lost)
    for index in range(num_shards):
        shards.append(done[index]["entry"])
        skipped.extend({**item, "shard": index} for item in done[index]["skipped"])
    manifest = {
        "format": FORMAT,
        "num_samples": sum(s["num_samples"] for s in shards),
        "classes": plan.classes,
        "shards": shards,
        "skipped": skipped,
        "empty_classes": plan.empty_classes,
        "ignored": plan.ignored,
        **({"dropped_classes": plan.dropped_classes} if plan.processing else {}),
        "writer": {"kind": plan.kind, "source": plan.source, "num_shards": num_shards, **asdict(settings),
                   **({"processing": plan.processing} if plan.processing else {}), "plan_digest": digest},
    }
    atomic_write_json(manifest_path, manifest)
    state_path.unlink(missing_ok=True)
    elapsed = time.perf_counter() - started
    log(f"{out / 'manifest.json'}: {manifest['num_samples']} images in {num_shards} shard(s), {len(plan.classes)} "
        f"classes ({len(plan.empty_classes)} empty), {len(skipped)} skipped, {len(plan.ignored)} non-image file(s) "
        f"ignored ({int(to_write)} written in {elapsed:.1f} s)")
    return load_manifest(manifest_path)


def prepare(plan: Plan, out_dir, *, num_shards: int | None = None, shard_size_mb: float | None = None,
            settings: WriterSettings | None = None, **kwargs) -> Manifest:
    """`write_shards` with the shard count chosen from --num-shards or --shard-size-mb (default 256 MB)."""
    settings = settings or WriterSettings()
    count = num_shards_for(plan, num_shards=num_shards, shard_size_mb=shard_size_mb)
    return write_shards(plan, out_dir, num_shards=count, settings=settings, **kwargs)


def prepare_digits(out_dir, *, side: int = 32, num_shards: int = 4, seed: int = 0,
                   **kwargs) -> tuple[Manifest, Manifest]:
    """The quickstart data: ``out_dir/train/manifest.json`` (1437 images) and ``out_dir/val/manifest.json`` (360)."""
    train_plan, val_plan = scan_digits(side)
    settings = WriterSettings(max_side=0, compress_probability=0.0, page_size=2 << 20, seed=seed)
    out = Path(out_dir)
    train = prepare(train_plan, out / "train", num_shards=num_shards, settings=settings, **kwargs)
    val = prepare(val_plan, out / "val", num_shards=num_shards, settings=settings, **kwargs)
    return train, val


def summarize_skipped(skipped: Sequence[dict], limit: int = 5) -> str:
    lines = [f"  {item['path']}: {item['reason']}" for item in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (see manifest.json)")
    return "\n".join(lines)
