"""`vilscale predict` and the report's prediction grid: pictures whose drawn boxes sit where the model predicted
them on the ORIGINAL image (not the resized one the detector reads), classification's top-5 written on the
image at its own size, and bad input refused in one line, exit 2, with nothing written.

The detection run is trained once per module (1 step of the digits RetinaNet on one rank, 4 val images); the
classification run is the session's smoke baseline (shared with the plan and resume tests)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vilscale.cli import main

REPO = Path(__file__).resolve().parents[1]
RETINANET = REPO / "jobs" / "digits_retinanet.yaml"


def vilscale_in_process(*args: str) -> subprocess.CompletedProcess:
    """The `vilscale` entry point in this process (no torch start-up per call)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
    return subprocess.CompletedProcess(["vilscale", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def detection_run(digits_coco, tmp_path_factory) -> Path:
    """The digits RetinaNet trained for one step on one rank, its evaluation on the first 4 val canvases."""
    root = tmp_path_factory.mktemp("predict")
    content = json.loads((digits_coco / "val" / "annotations.json").read_text())
    keep = {image["id"] for image in content["images"][:4]}
    small_val = root / "val4.json"
    small_val.write_text(json.dumps({**content, "images": content["images"][:4],
                                     "annotations": [a for a in content["annotations"] if a["image_id"] in keep]}))
    run_dir = root / "run"
    result = subprocess.run(
        [sys.executable, "-m", "vilscale.cli", "train", str(RETINANET), "--nproc", "1", "--set", f"run_dir={run_dir}",
         "--set", f"data.train_annotations={digits_coco / 'train' / 'annotations.json'}",
         "--set", f"data.train_images={digits_coco / 'train' / 'images'}",
         "--set", f"data.val_annotations={small_val}", "--set", f"data.val_images={digits_coco / 'val' / 'images'}",
         "--set", "train.max_steps=1", "--set", "eval.every_epochs=100"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def _model_of(run_dir: Path, tmp_path: Path):
    """The run's detector, loaded from its export (`vilscale export`), independently of predict's loading."""
    from safetensors.torch import load_file

    from vilscale.orchestration.checkpoint.rundir import load_run_spec
    from vilscale.orchestration.training.engine import build_model

    export = tmp_path / "detector.safetensors"
    assert vilscale_in_process("export", str(run_dir), str(export)).returncode == 0
    spec = load_run_spec(run_dir)
    model = build_model(spec)
    model.load_state_dict(load_file(str(export)))
    return model.eval(), spec


def test_drawn_boxes_sit_at_the_predicted_coordinates_of_the_original_image(detection_run, digits_coco, tmp_path):
    """A 192 x 144 picture (a val canvas stretched) is read at 96 x 72 by the detector (min_size 96, max_size 96);
    the boxes the model predicts on that 96 x 72 image, scaled by 2, are the ones drawn on the 192 x 144 PNG:
    the box colour on their bottom edge and on their sides below the label, the original's pixels away
    from every box."""
    canvas = Image.open(digits_coco / "val" / "images" / "val_000000.jpg").convert("RGB")
    original = canvas.resize((192, 144), Image.BILINEAR)
    image_path = tmp_path / "stretched.png"
    original.save(image_path)
    pixels = torch.from_numpy(np.asarray(original).copy()).permute(2, 0, 1)

    # the prediction, computed here at the detector's input size and scaled back by hand
    model, spec = _model_of(detection_run, tmp_path)
    model.detector.score_thresh = 0.0
    small = torch.nn.functional.interpolate((pixels.float() / 255)[None], size=(72, 96), mode="bilinear",
                                            align_corners=False)[0]
    with torch.no_grad():
        expected = model([small])[0]
    assert len(expected["scores"]) >= 4, "the untrained detector should still give candidate boxes"
    scores = expected["scores"].sort(descending=True).values
    threshold = float(scores[2] + scores[3]) / 2  # the three best boxes
    expected_boxes = expected["boxes"][expected["scores"] > threshold] * 2

    out = tmp_path / "pictures"
    result = vilscale_in_process("predict", str(detection_run), str(image_path), "--out", str(out),
                                 "--score-threshold", str(threshold))
    assert result.returncode == 0, result.stderr
    picture = np.asarray(Image.open(out / "stretched.png").convert("RGB"))
    assert picture.shape == (144, 192, 3)
    predictions = json.loads((out / "predictions.json").read_text())["stretched.png"]
    boxes = torch.tensor([p["box"] for p in predictions])
    assert len(predictions) == 3
    # predict's boxes are the ones computed here, in the original image's coordinates
    order = lambda b: b[b[:, 0].argsort()]  # noqa: E731
    torch.testing.assert_close(order(boxes), order(expected_boxes), atol=0.05, rtol=0)
    names = {p["label"] for p in predictions}
    assert names <= {str(digit) for digit in range(10)}  # the run's category names, not label numbers

    from vilscale.tasks.pictures import color_of

    # the best box is drawn last: its outline is whole below its label
    best = max(predictions, key=lambda p: p["score"])
    x1, y1, x2, y2 = (int(v) for v in best["box"])
    colour = np.array(color_of(best["label_index"]), dtype=np.uint8)
    bottom = picture[min(y2, 143), x1:min(x2, 191) + 1]
    assert (bottom == colour).all(axis=-1).all(), (best, bottom)
    below_label = range(y1 + 16, min(y2, 143))
    for x in (x1, min(x2, 191)):
        column = picture[list(below_label), x]
        assert (column == colour).all(axis=-1).all(), (best, x)
    # away from every box (and its label, at its top left), the PNG is the original image
    untouched = np.ones((144, 192), dtype=bool)
    for p in predictions:
        bx1, by1, bx2, by2 = (int(v) for v in p["box"])
        untouched[max(by1 - 2, 0):max(by2, by1 + 16) + 3, max(bx1 - 2, 0):max(bx2, bx1 + 80) + 3] = False
    assert untouched.sum() > 1000
    assert (picture[untouched] == np.asarray(original)[untouched]).all()


def test_classification_writes_the_top5_on_the_image_at_its_size(baseline_run, digits, smoke, tmp_path):
    """The smoke run's classifier on a 160 x 120 picture: the PNG has the picture's size, differs from it where
    the top-5 lines are written (top left) and not in the bottom-right corner; the printed classes are the
    run's manifest's, with the probabilities the exported EMA weights give the evaluation's crop of it."""
    rng = np.random.default_rng(0)
    original = (rng.random((120, 160, 3)) * 80 + 100).astype(np.uint8)
    image_path = tmp_path / "photo.png"
    Image.fromarray(original).save(image_path)
    out = tmp_path / "pictures"
    result = vilscale_in_process("predict", str(baseline_run), str(image_path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    picture = np.asarray(Image.open(out / "photo.png").convert("RGB"))
    assert picture.shape == original.shape
    assert (picture[:40, :40] != original[:40, :40]).any(axis=-1).mean() > 0.2  # the text and its backing
    assert (picture[-30:, -60:] == original[-30:, -60:]).all()
    classes = json.loads((digits / "train" / "manifest.json").read_text())["classes"]
    top5 = json.loads((out / "predictions.json").read_text())["photo.png"]
    assert len(top5) == 5 and all(entry["label"] in classes for entry in top5)
    # the same image through the run's exported EMA weights (what predict, like eval, uses for this run)
    from vilscale.data.augment import normalize
    from vilscale.model import create_model
    from vilscale.orchestration.checkpoint.rundir import load_run_spec
    from vilscale.tasks.pictures import evaluation_crop

    spec = load_run_spec(baseline_run)
    model = create_model("vil_nano", img_size=32, window=2, num_classes=10, attn_backend="chunked").eval()
    model.load_state_dict(smoke.export(baseline_run, tmp_path / "ema.safetensors", "--ema"))
    crop = evaluation_crop(torch.from_numpy(original).permute(2, 0, 1).contiguous(), spec)
    with torch.no_grad():
        probabilities = model(normalize(crop[None], spec.data.mean, spec.data.std)).softmax(-1)[0]
    expected = probabilities.topk(5)
    assert [entry["index"] for entry in top5] == expected.indices.tolist()
    assert [entry["label"] for entry in top5] == [classes[i] for i in expected.indices.tolist()]
    assert [entry["probability"] for entry in top5] == pytest.approx(expected.values.tolist(), abs=1e-4)


def test_the_report_shows_a_grid_of_validation_predictions(detection_run, digits_coco, tmp_path):
    """`vilscale report` of the detection run writes predictions.png beside the plots: the first 4 val canvases,
    each tile the canvas itself (enlarged) wherever no box is drawn."""
    out = tmp_path / "report"
    result = vilscale_in_process("report", str(detection_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    grid_path = out / "predictions.png"
    assert str(grid_path) in result.stdout and (out / "loss.png").is_file()
    grid = np.asarray(Image.open(grid_path).convert("RGB")).astype(int)
    from vilscale.tasks.pictures import GRID_PADDING, GRID_TILE

    assert grid.shape == (2 * GRID_TILE + 3 * GRID_PADDING, 2 * GRID_TILE + 3 * GRID_PADDING, 3)
    content = json.loads((digits_coco / "val" / "annotations.json").read_text())
    for index, image in enumerate(sorted(content["images"], key=lambda i: i["id"])[:4]):
        row, col = divmod(index, 2)
        top, left = GRID_PADDING + row * (GRID_TILE + GRID_PADDING), GRID_PADDING + col * (GRID_TILE + GRID_PADDING)
        tile = grid[top:top + GRID_TILE, left:left + GRID_TILE]
        canvas = Image.open(digits_coco / "val" / "images" / image["file_name"]).convert("RGB")
        enlarged = np.asarray(canvas.resize((GRID_TILE, GRID_TILE), Image.NEAREST)).astype(int)
        assert (np.abs(tile - enlarged) <= 1).all(axis=-1).mean() > 0.5, image["file_name"]


def test_bad_input_is_one_line_exit_2_and_nothing_written(detection_run, digits_coco, tmp_path):
    good = str(digits_coco / "val" / "images" / "val_000001.jpg")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    no_weights = tmp_path / "fresh_run"
    no_weights.mkdir()
    (no_weights / "spec.yaml").write_text((detection_run / "spec.yaml").read_text())
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"mine")
    cases = [
        ([str(detection_run), str(tmp_path / "nowhere.jpg")], "does not exist"),
        ([str(detection_run), good, str(not_an_image)], "cannot be read as an image"),
        ([str(no_weights), good], "no checkpoint"),
        ([str(tmp_path / "no_run"), good], "does not exist"),
    ]
    for arguments, message in cases:
        out = tmp_path / "out"
        result = vilscale_in_process("predict", *arguments, "--out", str(out))
        assert result.returncode == 2, (arguments, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, (arguments, lines)
        assert not out.exists(), arguments
    result = vilscale_in_process("predict", str(detection_run), good, "--out", str(a_file))
    assert result.returncode == 2 and "is a file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert a_file.read_bytes() == b"mine"
