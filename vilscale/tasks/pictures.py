"""Pictures of predictions, for people to look at: boxes, labels and scores (detection), instance masks
(Mask R-CNN), a per-pixel class map (semantic segmentation), the top-5 classes (classification), drawn with
torchvision's ``draw_bounding_boxes`` / ``draw_segmentation_masks`` onto the ORIGINAL image.

An image is predicted on exactly as the task's evaluation reads it: a detector gets the whole image and
resizes it itself (``GeneralizedRCNNTransform``, which maps its boxes and masks back to the image's own
size); a classifier gets the evaluation's centre crop (``data.val_resize_ratio`` of the shorter side) resized
to ``model.img_size`` by FFCV's own resize (OpenCV INTER_AREA); a segmentation task says its own
(``predict_class_map``).
"""

from __future__ import annotations

from pathlib import Path

import torch

# one colour per label (label % len), distinct on photographs and on black digit canvases
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128))
GRID_TILE = 192
"""Side (pixels) of one picture in the report's grid of validation predictions."""
GRID_PADDING = 4
GRID_IMAGES = 4
DEFAULT_SCORE_THRESHOLD = 0.3


def color_of(label: int) -> tuple[int, int, int]:
    """The colour of a class label (boxes, masks and class-map regions of the label share it)."""
    return PALETTE[int(label) % len(PALETTE)]


def read_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB, decoded as the evaluation's readers decode (PIL, converted to RGB); ValueError with
    one line when the file is missing or is not an image PIL can decode."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path} cannot be read as an image ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else 'no detail'})") from None


# ----------------------------------------------------------------------------------------------------
# drawing (predictions in the drawn image's coordinates)
# ----------------------------------------------------------------------------------------------------

def draw_detections(image: torch.Tensor, prediction: dict, names: list[str], *,
                    score_threshold: float) -> tuple[torch.Tensor, list[dict]]:
    """Boxes (XYXY, the image's pixels) with "name score" labels, and instance masks when the prediction has
    them, of the detections scoring at least ``score_threshold``; the best is drawn last (on top). Returns the
    picture and what was drawn, best first."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = (prediction["scores"] >= score_threshold).nonzero().flatten()
    keep = keep[prediction["scores"][keep].float().argsort()]  # ascending: the best box ends on top
    boxes = prediction["boxes"][keep].float().cpu()
    labels = prediction["labels"][keep].cpu().tolist()
    scores = prediction["scores"][keep].float().cpu().tolist()
    picture = image
    if len(keep) and "masks" in prediction:
        masks = prediction["masks"][keep][:, 0].cpu() > 0.5
        picture = draw_segmentation_masks(picture, masks, alpha=0.45, colors=[color_of(label) for label in labels])
    if len(keep):
        width = max(1, round(min(image.shape[-2:]) / 200))
        colours = [color_of(label) for label in labels]
        picture = draw_bounding_boxes(picture, boxes, labels=[f"{_name(names, label)} {score:.2f}"
                                                              for label, score in zip(labels, scores)],
                                      colors=colours, width=width, fill_labels=True,
                                      label_colors="black", label_background_colors=colours)
    drawn = [{"box": [round(float(v), 3) for v in box], "label": _name(names, label), "label_index": int(label),
              "score": round(float(score), 5)} for box, label, score in zip(boxes.tolist(), labels, scores)]
    return picture, drawn[::-1]


def draw_top_classes(image: torch.Tensor, top: list[tuple[int, float]], names: list[str]) -> torch.Tensor:
    """The top classes and their probabilities written at the top left of the image, one line each, on a dark
    backing so they read on any picture; the image keeps its size."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

    canvas = to_pil_image(image).convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    size = max(8, min(canvas.size) // 10)
    font = ImageFont.load_default(size=size)
    lines = [f"{_name(names, index)}: {100 * probability:.1f}%" for index, probability in top]
    text = "\n".join(lines)
    left, top_, right, bottom = draw.multiline_textbbox((2, 2), text, font=font, spacing=1)
    draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0, 160))
    draw.multiline_text((2, 2), text, font=font, fill=(255, 255, 255, 255), spacing=1)
    return pil_to_tensor(Image.alpha_composite(canvas, overlay).convert("RGB"))


def draw_class_map(image: torch.Tensor, class_map: torch.Tensor, *, ignore_index: int | None = 255,
                   background: int | None = None, alpha: float = 0.5) -> torch.Tensor:
    """A per-pixel class map ``(H, W)`` (integer classes, the image's size) overlaid on the image, one colour per
    class (``color_of``); pixels of ``ignore_index`` (and of ``background`` when given) are left as they are."""
    from torchvision.utils import draw_segmentation_masks

    if class_map.shape != image.shape[-2:]:
        raise ValueError(f"the class map is {tuple(class_map.shape)} but the image is {tuple(image.shape[-2:])}; "
                         "give the map at the image's size")
    class_map = class_map.cpu()
    present = [int(c) for c in class_map.unique().tolist() if c not in (ignore_index, background)]
    if not present:
        return image
    masks = torch.stack([class_map == c for c in present])
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=[color_of(c) for c in present])


def _name(names: list[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else str(label)


def grid(pictures: list[torch.Tensor], *, columns: int = 2, tile: int = GRID_TILE,
         padding: int = GRID_PADDING) -> torch.Tensor:
    """Pictures of side ``tile`` (smaller ones centred) in rows of ``columns``, on white."""
    rows = -(-len(pictures) // columns)
    out = torch.full((3, padding + rows * (tile + padding), padding + columns * (tile + padding)), 255,
                     dtype=torch.uint8)
    for index, picture in enumerate(pictures):
        row, col = divmod(index, columns)
        h, w = picture.shape[-2:]
        top = padding + row * (tile + padding) + (tile - h) // 2
        left = padding + col * (tile + padding) + (tile - w) // 2
        out[:, top:top + h, left:left + w] = picture
    return out


# ----------------------------------------------------------------------------------------------------
# predicting as the task's evaluation does
# ----------------------------------------------------------------------------------------------------

class Predictor:
    """Predicts on images as the task's evaluation does and draws the predictions.

    Args:
        task: the task object (``vilscale.tasks.make_task``).
        model: the task's model, weights loaded, placed on ``device`` in its precision (``task.place``): its inputs
            take its parameters' dtype.
        names: class names by label (detection: index 0 is the background, 1..K the run's categories).
        score_threshold: detection: the lowest score drawn (the detector's own floor is lowered to it).
    """

    def __init__(self, task, model: torch.nn.Module, *, names: list[str], device: torch.device,
                 score_threshold: float = DEFAULT_SCORE_THRESHOLD):
        self.task, self.spec, self.model = task, task.spec, model.eval()
        self.names, self.device, self.dtype = names, device, next(model.parameters()).dtype
        self.score_threshold = score_threshold
        if self.spec.task == "detection":  # boxes under torchvision's 0.05 floor are otherwise never returned
            head = model.detector.roi_heads if hasattr(model.detector, "roi_heads") else model.detector
            head.score_thresh = min(head.score_thresh, score_threshold)
        elif self.spec.task == "segmentation" and not hasattr(task, "predict_class_map"):
            raise ValueError("task=segmentation: its task module has no predict_class_map(model, image) (a "
                             "per-pixel class map at the image's size), so there is nothing to draw")
        elif self.spec.task not in ("classification", "segmentation", "detection"):
            raise ValueError(f"vilscale predict does not know task={self.spec.task!r}")

    @torch.no_grad()
    def predict(self, image: torch.Tensor, *, preprocessed: bool = False):
        """The prediction for one (3, H, W) uint8 image, in its coordinates. ``preprocessed``: a classification
        image that already is the evaluation's crop (from the validation loader)."""
        task = self.spec.task
        if task == "detection":
            output = self.model([image.to(self.device, self.dtype) / 255])[0]
            return {key: value.float().cpu() if value.is_floating_point() else value.cpu()
                    for key, value in output.items()}
        if task == "segmentation":
            return self.task.predict_class_map(self.model, image).cpu()
        from vilscale.data.augment import normalize

        crop = image if preprocessed else evaluation_crop(image, self.spec)
        logits = self.model(normalize(crop[None].to(self.device), self.spec.data.mean, self.spec.data.std)
                            .to(self.dtype)).float()
        probabilities = logits.softmax(-1)[0].cpu()
        top = probabilities.topk(min(5, probabilities.numel()))
        return list(zip(top.indices.tolist(), top.values.tolist()))

    def draw(self, image: torch.Tensor, prediction, *, scale: float = 1.0) -> tuple[torch.Tensor, object]:
        """(picture, what it shows) of ``prediction`` on ``image`` enlarged (or shrunk) by ``scale``."""
        picture, prediction = _scaled(image, prediction, scale, self.spec.task)
        if self.spec.task == "detection":
            return draw_detections(picture, prediction, self.names, score_threshold=self.score_threshold)
        if self.spec.task == "segmentation":
            ignore = getattr(self.spec.data, "ignore_index", 255)
            picture = draw_class_map(picture, prediction, ignore_index=ignore)
            shares = torch.bincount(prediction.flatten().clamp(min=0), minlength=1).float() / prediction.numel()
            return picture, {_name(self.names, c): round(float(s), 4) for c, s in enumerate(shares.tolist()) if s}
        return draw_top_classes(picture, prediction, self.names), [
            {"label": _name(self.names, index), "index": index, "probability": round(p, 5)} for index, p in prediction]


def evaluation_crop(image: torch.Tensor, spec) -> torch.Tensor:
    """The classification evaluation's input for an image: the centre square of ``data.val_resize_ratio`` x the
    shorter side, resized to ``model.img_size`` by FFCV's resize (what the validation loader decodes)."""
    import numpy as np

    from vilscale.data.ffcv_import import import_ffcv
    from vilscale.data.pipeline import center_boxes

    import_ffcv()
    from ffcv.libffcv import resize_crop

    h, w = image.shape[-2:]
    top, left, side, _, _ = center_boxes(np.array([h]), np.array([w]), ratio=spec.data.val_resize_ratio)[0]
    source = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    size = spec.model.img_size
    out = np.zeros((size, size, 3), dtype=np.uint8)
    resize_crop(source, int(top), int(top + side), int(left), int(left + side), out)
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def _scaled(image: torch.Tensor, prediction, scale: float, task: str):
    if scale == 1.0:
        return image, prediction
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
    mode = InterpolationMode.NEAREST if scale > 1 else InterpolationMode.BILINEAR
    picture = resize(image, size, interpolation=mode, antialias=scale < 1)
    if task == "detection":
        prediction = dict(prediction, boxes=prediction["boxes"] * scale)
        if "masks" in prediction:
            prediction["masks"] = resize(prediction["masks"], size, interpolation=InterpolationMode.NEAREST)
    elif task == "segmentation":
        prediction = resize(prediction[None], size, interpolation=InterpolationMode.NEAREST)[0]
    return picture, prediction
