"""Configuration of the data path: where the shards are and how they are read (`DataConfig`), and the
paper's training augmentation (`AugmentConfig`).

Both are frozen keyword-only dataclasses whose fields are plain scalars or tuples of scalars, so a
YAML job spec maps onto them directly. Every field can be turned off (0 / False) where that makes
sense; the CPU demo turns most of the augmentation off.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOSSES = ("softmax", "semantic_softmax")


def _check(ok: bool, field: str, value, valid: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is not valid; {valid}")


def _check_pair(field: str, value, low: float, high: float) -> None:
    _check(isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value),
           field, value, "give a pair (low, high) of numbers")
    _check(low <= value[0] <= value[1] <= high, field, value, f"need {low} <= low <= high <= {high}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    train_manifest: str = ""
    """Path to the training shards' manifest.json (written by `vilscale prepare`); "" when not used."""
    val_manifest: str = ""
    """Path to the validation shards' manifest.json; "" when not used."""
    img_size: int = 0
    """Side of the square crops the loader produces (training and validation); 0 in a job spec means
    `model.img_size`, which it must equal when set."""
    num_workers: int = 2
    """Workers per rank that decode images: FFCV's decode threads (classification, at least 1) or DataLoader
    processes that read and decode images (detection, segmentation; 0 reads them in the rank's own process). Sized
    for a cluster node: a rank clamps it to the CPU cores it may use, saying so in one line."""
    os_cache: bool = True
    """True: read shards through the OS page cache (mmap; shared by the ranks of a node). False: each process
    reads the pages it needs into its own memory (for datasets much larger than RAM)."""
    drop_last: bool = True
    """Training remainder policy. True: every rank yields `len(loader)` full batches and the few samples left
    over (fewer than world_size x (batch + 1)) are skipped this epoch; which ones changes every epoch.
    False: the last batch of each rank is filled up with samples from the start of that rank's epoch order,
    so every sample is seen and a few are seen twice. Validation never drops anything."""
    val_resize_ratio: float = 224 / 256
    """Validation centre crop: crop side = ratio x shorter image side, then resized to `img_size`."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean (RGB, in [0, 1] units) subtracted after scaling uint8 images to [0, 1]."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation (RGB, in [0, 1] units) divided after subtracting the mean."""
    batches_ahead: int = 3
    """Batches each rank decodes ahead of the training loop."""
    shuffle_block: int = 64
    """Training order: a rank's samples are shuffled in blocks of this many consecutive samples of a shard
    (about one 8 MiB FFCV page of ImageNet JPEGs), so reads stay local inside a shard."""
    shuffle_window: int = 8
    """Training order: samples are shuffled freely inside a window of this many blocks."""
    crop_decode: bool = True
    """Training decodes only the rows and columns of each JPEG that its random crop needs, at 1/2, 1/4 or 1/8 scale
    when the crop is at least twice `img_size`, and resamples the exact crop box (area average, bilinear when
    enlarging). False: decode whole images and resize with OpenCV, as FFCV's own decoder does (slower; pixels
    differ only by the resampling). Validation always decodes whole images."""
    decode_error_limit: int = 10
    """Samples of one shard that may fail to decode while reading (bytes damaged after the manifest was
    written) before the run stops with a `DataError` naming the shard. Below it, a training sample that fails is
    replaced by the next good sample of its shard and a validation sample is left out (label -1); each is counted
    (`ShardedLoader.decode_errors`) and logged once. 0: the first failure stops the run."""
    train_annotations: str = ""
    """task=detection: the training split's COCO instances JSON (e.g. instances_train2017.json)."""
    train_images: str = ""
    """task=detection, segmentation: the folder of the training split's images (COCO's train2017/, ADE20K's
    images/training/)."""
    val_annotations: str = ""
    """task=detection: the validation split's COCO instances JSON; "" evaluates nothing."""
    val_images: str = ""
    """task=detection, segmentation: the folder of the validation split's images."""
    train_masks: str = ""
    """task=segmentation: the folder of the training split's label maps, one PNG per image with the image's name
    (ADE20K's annotations/training/: `a.jpg` -> `a.png`), one class index per pixel."""
    val_masks: str = ""
    """task=segmentation: the folder of the validation split's label maps; "" evaluates nothing."""
    reduce_zero_label: bool = False
    """task=segmentation: label 0 means "other" (ADE20K): it becomes `ignore_index` and every other label moves
    down by one (ADE20K's 1..150 -> classes 0..149)."""
    ignore_index: int = 255
    """task=segmentation: the label value neither trained nor scored (also what padding gets)."""
    crop_size: int = 512
    """task=segmentation: side of the square training crops; evaluation resizes the shorter side to it."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """task=segmentation: training resize: shorter side crop_size x r (longer side at most 4 x crop_size x r, as
    mmsegmentation's (2048, 512) scale), r uniform in this range."""
    cat_max_ratio: float = 0.75
    """task=segmentation: a training crop is drawn again (up to 10 times) while one class holds more than this
    share of its labelled pixels; 1.0 turns it off."""
    min_size: tuple[int, ...] = (800,)
    """task=detection: shorter image side after resizing; with several values training draws one per image
    (multi-scale training, the 3x schedule's (640, 672, ..., 800)) and evaluation uses the last."""
    max_size: int = 1333
    """task=detection: longer image side at most (the shorter side gives way)."""
    verify_checksums: bool = True
    """Check every shard this rank reads against the manifest's sha256 before the first epoch. A verified
    shard is remembered (by path, size and mtime) under $VILSCALE_CACHE_DIR (default ~/.cache/vilscale), so a
    restart does not hash it again."""
    hierarchy: str = ""
    """augment.loss=semantic_softmax: the class tree, a text file of CHILD PARENT class names per line (or
    Alibaba-MIIL's imagenet21k_miil_tree.pth); every name must be a class of the manifests. See
    `vilscale.tasks.hierarchy`."""

    def __post_init__(self):
        _check(isinstance(self.img_size, int) and (self.img_size >= 8 or self.img_size == 0), "data.img_size",
               self.img_size, "use an integer >= 8 (or 0: the model's img_size)")
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, "data.num_workers", self.num_workers,
               "use an integer >= 0 (classification needs at least 1)")
        _check(0.0 < self.val_resize_ratio <= 1.0, "data.val_resize_ratio", self.val_resize_ratio,
               "use a ratio in (0, 1], e.g. 0.875 (224/256)")
        for name in ("mean", "std"):
            value = getattr(self, name)
            _check(isinstance(value, tuple) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value),
                   f"data.{name}", value, "give three numbers (R, G, B) in [0, 1] units")
        _check(all(s > 0 for s in self.std), "data.std", self.std, "every standard deviation must be > 0")
        _check(isinstance(self.batches_ahead, int) and self.batches_ahead >= 1, "data.batches_ahead",
               self.batches_ahead, "use an integer >= 1")
        _check(isinstance(self.shuffle_block, int) and self.shuffle_block >= 1, "data.shuffle_block",
               self.shuffle_block, "use an integer >= 1")
        _check(isinstance(self.shuffle_window, int) and self.shuffle_window >= 1, "data.shuffle_window",
               self.shuffle_window, "use an integer >= 1")
        _check(len(self.min_size) >= 1 and all(isinstance(v, int) and v >= 16 for v in self.min_size),
               "data.min_size", self.min_size, "give one or more integers >= 16 (the shorter side after resizing)")
        _check(isinstance(self.max_size, int) and self.max_size >= max(self.min_size), "data.max_size",
               self.max_size, f"use an integer >= data.min_size ({max(self.min_size)})")
        _check(isinstance(self.decode_error_limit, int) and self.decode_error_limit >= 0, "data.decode_error_limit",
               self.decode_error_limit, "use an integer >= 0 (0: the first sample that fails to decode stops the run)")
        _check(isinstance(self.ignore_index, int) and 0 <= self.ignore_index <= 65535, "data.ignore_index",
               self.ignore_index, "use a label value in 0..65535 (ADE20K: 255)")
        _check(isinstance(self.crop_size, int) and self.crop_size >= 16, "data.crop_size", self.crop_size,
               "use an integer >= 16")
        _check_pair("data.scale_range", self.scale_range, 0.01, 100.0)
        _check(0.0 < self.cat_max_ratio <= 1.0, "data.cat_max_ratio", self.cat_max_ratio,
               "use a share in (0, 1] (1.0 turns the check off)")


@dataclass(frozen=True, kw_only=True, slots=True)
class AugmentConfig:
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range (fraction of the image), done in the FFCV decoder; (1.0, 1.0) with
    `rrc_ratio` (1.0, 1.0) gives a plain resize of the centre square."""
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = 0.5
    """Probability of a horizontal flip (done in the decoder); 0 turns it off."""
    randaugment: bool = True
    """RandAugment (2 operations) on the training device; False turns it off."""
    randaugment_magnitude: float = 9.0
    """RandAugment magnitude on timm's 0..10 scale (the paper's m9)."""
    randaugment_mstd: float = 0.5
    """Standard deviation of the magnitude noise (the paper's mstd 0.5); 0 keeps the magnitude fixed."""
    randaugment_groups: int = 8
    """The batch is split into this many groups, each drawing its own two operations and magnitude."""
    color_jitter: float = 0.4
    """Brightness/contrast/saturation jitter strength. As in timm (which the paper's code uses) it is applied
    only when `randaugment` is off; 0 turns it off."""
    random_erasing: float = 0.25
    """Probability of erasing one random rectangle (after normalisation, filled with 0 = the mean colour)."""
    mixup_alpha: float = 0.8
    """Beta(alpha, alpha) of mixup; 0 turns mixup off."""
    cutmix_alpha: float = 1.0
    """Beta(alpha, alpha) of cutmix; 0 turns cutmix off."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all (when mixup or cutmix is on)."""
    switch_prob: float = 0.5
    """When both are on: probability of cutmix instead of mixup for a batch."""
    label_smoothing: float = 0.1
    """Label smoothing of the soft targets; 0 turns it off."""
    photometric_distortion: bool = True
    """task=segmentation: random brightness, contrast, saturation and hue of the training crops
    (mmsegmentation's PhotoMetricDistortion, each applied with probability 0.5); False turns it off."""

    loss: str = "softmax"
    """"softmax" (one cross-entropy over all classes) or "semantic_softmax" (ImageNet-21K-P: one softmax per level
    of the class tree in `data.hierarchy`, the paper's level weights; label smoothing and mixup/cutmix per level;
    evaluation adds the semantic top-1)."""

    def __post_init__(self):
        _check_pair("augment.rrc_scale", self.rrc_scale, 0.0, 1.0)
        _check(self.rrc_scale[1] > 0, "augment.rrc_scale", self.rrc_scale, "the upper area bound must be > 0")
        _check_pair("augment.rrc_ratio", self.rrc_ratio, 1e-3, 1e3)
        for name in ("hflip", "random_erasing", "mix_prob", "switch_prob"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"augment.{name}", value, "a probability must be in [0, 1]")
        _check(0.0 <= self.randaugment_magnitude <= 10.0, "augment.randaugment_magnitude",
               self.randaugment_magnitude, "use a magnitude in [0, 10] (timm's scale; the paper uses 9)")
        _check(self.randaugment_mstd >= 0.0, "augment.randaugment_mstd", self.randaugment_mstd, "use a value >= 0")
        _check(isinstance(self.randaugment_groups, int) and self.randaugment_groups >= 1,
               "augment.randaugment_groups", self.randaugment_groups, "use an integer >= 1")
        _check(0.0 <= self.color_jitter <= 1.0, "augment.color_jitter", self.color_jitter, "use a value in [0, 1]")
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            _check(value >= 0.0, f"augment.{name}", value, "use an alpha >= 0 (0 turns it off)")
        _check(0.0 <= self.label_smoothing < 1.0, "augment.label_smoothing", self.label_smoothing,
               "use a value in [0, 1)")
        _check(self.loss in LOSSES, "augment.loss", self.loss, f"use one of {list(LOSSES)}")

    @property
    def mixes(self) -> bool:
        """True when mixup or cutmix can change a batch."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)
