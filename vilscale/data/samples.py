"""Small ImageFolders of real photographs, for tests and the data benchmark.

scikit-learn ships two real JPEG photographs (`sklearn.datasets.load_sample_images`: a temple in China and
a flower, 427x640). Crops of them at random positions and sizes, saved as JPEG files (a few as PNG),
make an ImageFolder whose files decode like real ImageNet images do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def photo_imagefolder(root: str | Path, *, num_classes: int = 2, per_class: int = 6, min_side: int = 96,
                      max_side: int = 320, corrupt: bool = False, empty_class: bool = False, png_every: int = 0,
                      seed: int = 0) -> Path:
    """Write ``root/class_k/img_i.jpg`` crops of the sample photographs and return ``root``.

    Args:
        num_classes: class folders with images (class k crops photograph k % 2).
        per_class: images per class.
        min_side, max_side: range of the crops' sides (each side drawn independently).
        corrupt: add ``class_0/broken.jpg``, a file that is not an image.
        empty_class: add an empty class folder ``zz_empty``.
        png_every: save every n-th image as a grey-scale PNG instead (0: none).
        seed: seed of the crop positions and sizes.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    root = Path(root)
    for k in range(num_classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        photo = photos[k % len(photos)]
        for i in range(per_class):
            h = int(rng.integers(min_side, min(max_side, photo.shape[0]) + 1))
            w = int(rng.integers(min_side, min(max_side, photo.shape[1]) + 1))
            top = int(rng.integers(0, photo.shape[0] - h + 1))
            left = int(rng.integers(0, photo.shape[1] - w + 1))
            image = Image.fromarray(photo[top:top + h, left:left + w])
            if png_every and i % png_every == png_every - 1:
                image.convert("L").save(folder / f"img_{i:03d}.png")
            else:
                image.save(folder / f"img_{i:03d}.jpg", quality=92)
    if corrupt:
        (root / "class_0").mkdir(parents=True, exist_ok=True)
        (root / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 8)
    if empty_class:
        (root / "zz_empty").mkdir(parents=True, exist_ok=True)
    return root
