"""Detection through the real commands: `vilscale train` of the digits RetinaNet and Mask R-CNN jobs (DeepSpeed
ZeRO-2 on 2 CPU ranks), `vilscale eval` whose printed AP equals what pycocotools computes from the predictions
it saved, `vilscale export` of a detector, exact resume, and bad input refused before any rank starts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RETINANET = REPO / "jobs" / "digits_retinanet.yaml"
MASK_RCNN = REPO / "jobs" / "digits_mask_rcnn.yaml"


def vilscale(*args: str, check: bool = True, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", *args], capture_output=True, text=True,
                            timeout=1200, cwd=cwd, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def data_sets(digits_coco: Path) -> list[str]:
    return ["--set", f"data.train_annotations={digits_coco / 'train' / 'annotations.json'}",
            "--set", f"data.train_images={digits_coco / 'train' / 'images'}",
            "--set", f"data.val_annotations={digits_coco / 'val' / 'annotations.json'}",
            "--set", f"data.val_images={digits_coco / 'val' / 'images'}"]


def pycocotools_ap(annotations: Path, predictions: Path, kind: str) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        evaluation = COCOeval(truth, truth.loadRes(str(predictions)), kind)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(v) for v in evaluation.stats[:6]]


def printed_ap(stdout: str, label: str) -> float:
    line = next(line for line in stdout.splitlines() if line.startswith(f"{label} AP: "))
    return float(line.split(": ")[1])


# ----------------------------------------------------------------------------------------------------
# learning, and `vilscale eval` against pycocotools on the predictions it saved
# ----------------------------------------------------------------------------------------------------

# Measured on the 2-core machine, 2 ranks, from random weights, with these schedules (see the README's detection
# section): RetinaNet 4 epochs box AP 5.4 (AP50 11.3); Mask R-CNN 2 epochs box AP 23.0 (AP50 42.9), mask AP 24.2
# (AP50 43.4). Chance is 0; the bars leave about half of the measured AP50.
RETINANET_EPOCHS, RETINANET_AP50_BAR = 4, 0.05
MASK_RCNN_EPOCHS, MASK_RCNN_AP50_BAR = 2, 0.20


@pytest.mark.extended
def test_retinanet_learns_the_digits(digits_coco, tmp_path):
    """RetinaNet's AP50 bar and its two losses falling. (That `vilscale eval` prints what pycocotools computes from
    the saved predictions, and equals the trainer's own evaluation, is checked once, on the Mask R-CNN demo run.)"""
    run_dir = tmp_path / "run"
    trained = vilscale("train", str(RETINANET), "--nproc", "2", "--set", f"run_dir={run_dir}", *data_sets(digits_coco),
                       "--set", f"train.epochs={RETINANET_EPOCHS}", "--set", f"eval.every_epochs={RETINANET_EPOCHS}")
    assert "600 images, 1472 annotations" in trained.stdout + trained.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["box_AP50"] >= RETINANET_AP50_BAR, summary
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    components = [r["loss_components"] for r in metrics if "loss_components" in r]
    assert components and set(components[-1]) == {"classification", "bbox_regression"}
    assert components[-1]["classification"] < components[0]["classification"]
    assert components[-1]["bbox_regression"] < components[0]["bbox_regression"]


def test_the_backbone_starts_from_the_export_it_is_given(tmp_path):
    """model.init_weights into a detector: the ViL body holds the export's weights (position tables fitted to
    the detector's maps), the classifier's norm and head are dropped, and one line says so."""
    from safetensors.torch import load_file, save_file

    from vilscale.model import create_model
    from vilscale.orchestration.config import load_spec
    from vilscale.orchestration.training.engine import build_model

    torch.manual_seed(3)
    classifier = create_model("vil_nano", img_size=32, window=2, num_classes=10)
    export = tmp_path / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(export))
    lines = []
    detector = build_model(load_spec(RETINANET, [f"model.init_weights={export}"]), log=lines.append)
    body, weights = detector.body.state_dict(), load_file(str(export))
    kept = [key for key in weights if key in body and body[key].shape == weights[key].shape]
    assert len(kept) == len(weights) - 4 - 6  # all but head/norm (4) and the 6 APE tables resized 8 -> 24 etc.
    assert all(torch.equal(body[key], weights[key]) for key in kept)
    assert lines and "6 position table(s) interpolated" in lines[0] and "head dropped" in lines[0]


# ----------------------------------------------------------------------------------------------------
# exact resume, ZeRO-2 on two ranks
# ----------------------------------------------------------------------------------------------------

@pytest.mark.extended
def test_a_detection_run_stopped_and_resumed_equals_the_uninterrupted_run(digits_coco, tmp_path):
    common = [*data_sets(digits_coco), "--set", "train.max_steps=6", "--set", "train.ckpt_every=3",
              "--set", "train.record_samples=true", "--set", "augment.hflip=0.5", "--set", "eval.every_epochs=100"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    vilscale("train", str(RETINANET), "--nproc", "2", "--set", f"run_dir={whole}", *common)
    first = vilscale("train", str(RETINANET), "--nproc", "2", "--set", f"run_dir={parts}", *common,
                     "--set", "train.exit_after_steps=3")
    assert "checkpoint at step 3" in first.stderr and not (parts / "summary.json").read_text().count('"box_AP"')
    vilscale("train", str(RETINANET), "--nproc", "2", "--set", f"run_dir={parts}", *common)
    exported = {}
    for name, run_dir in (("whole", whole), ("parts", parts)):
        vilscale("export", str(run_dir), str(tmp_path / f"{name}.safetensors"))
        from safetensors.torch import load_file

        exported[name] = load_file(str(tmp_path / f"{name}.safetensors"))
    assert exported["whole"].keys() == exported["parts"].keys()
    assert any(key.startswith("detector.head.classification_head") for key in exported["whole"])
    for key, value in exported["whole"].items():
        assert torch.equal(value, exported["parts"][key]), key
    for rank in (0, 1):  # the same images in every step, after the resume too
        lines = [json.loads(line) for line in (whole / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
        resumed = [json.loads(line) for line in (parts / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [r["indices"] for r in lines] == [r["indices"] for r in resumed] and len(lines) == 6
    summaries = [json.loads((run / "summary.json").read_text()) for run in (whole, parts)]
    assert summaries[0]["box_AP"] == summaries[1]["box_AP"]


# ----------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before any rank
# ----------------------------------------------------------------------------------------------------

@pytest.mark.budget(60)  # in-process refusals of the detection task's pre-flight
def test_bad_detection_input_is_refused_before_any_rank_starts(digits_coco, tmp_path, refused):
    not_json = tmp_path / "not_coco.json"
    not_json.write_text("{this is not json")
    content = json.loads((digits_coco / "val" / "annotations.json").read_text())
    missing = tmp_path / "missing_images.json"
    missing.write_text(json.dumps({**content, "images": content["images"] + [
        {"id": 99999, "file_name": "nowhere.jpg", "height": 96, "width": 96}]}))
    other_categories = tmp_path / "other_categories.json"
    other_categories.write_text(json.dumps({**content, "categories": content["categories"][:9] + [
        {"id": 42, "name": "forty-two"}]}))
    cases = [
        (["--set", f"data.train_annotations={not_json}"], "is not COCO JSON"),
        (["--set", f"data.train_annotations={missing}", "--set", f"data.train_images={digits_coco / 'val' / 'images'}"],
         "1 of 121 images named in"),
        (["--set", f"data.val_annotations={other_categories}"], "category ids of"),
        (["--set", "model.num_classes=12"], "set model.num_classes=10"),
        (["--set", "model.detector=yolo"], "model.detector='yolo' is not valid"),
        (["--set", "model.anchor_sizes=[8, 16]"], "must be five positive integers"),
    ]
    for overrides, message in cases:
        run_dir = tmp_path / "run"
        line = refused("train", str(RETINANET), "--nproc", "2", "--set", f"run_dir={run_dir}", *data_sets(digits_coco),
                       *overrides)
        assert message in line, (overrides, line)
        assert not run_dir.exists(), overrides  # nothing written


def test_initial_weights_of_another_variant_are_refused(digits_coco, tmp_path, refused):
    from safetensors.torch import save_file

    from vilscale.model import create_model

    weights = tmp_path / "vil_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("vil_tiny", num_classes=10).state_dict().items()},
              str(weights))
    line = refused("train", str(RETINANET), "--nproc", "2", "--set", f"run_dir={tmp_path / 'run'}",
                   *data_sets(digits_coco), "--set", f"model.init_weights={weights}")
    assert "model.init_weights=" in line and "does not fit" in line, line


# ----------------------------------------------------------------------------------------------------
# `vilscale demo --detection` as a new user runs it, cut to Mask R-CNN's learning test's steps: one training run
# serves the learning bars and the demo's own outputs
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detection_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`vilscale demo --detection` from an empty directory, its Mask R-CNN cut to MASK_RCNN_EPOCHS epochs of steps
    (--max-steps; the schedule then spans those steps, as `train.epochs` would): (that directory, its output)."""
    root = tmp_path_factory.mktemp("demo")
    steps = MASK_RCNN_EPOCHS * (600 // 16)
    return root, vilscale("demo", "--detection", "--detection-job", str(MASK_RCNN), "--max-steps", str(steps), cwd=root)


def test_mask_rcnn_learns_boxes_and_masks(detection_demo):
    root, result = detection_demo
    run_dir = root / "runs" / "digits_mask_rcnn"
    annotations = root / "data" / "digits_coco" / "val" / "annotations.json"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["box_AP50"] >= MASK_RCNN_AP50_BAR and summary["mask_AP50"] >= MASK_RCNN_AP50_BAR, summary
    for kind, label, name in (("bbox", "box", "bbox.json"), ("segm", "mask", "segm.json")):
        stats = pycocotools_ap(annotations, run_dir / "eval" / name, kind)  # what the demo's `vilscale eval` saved
        assert printed_ap(result.stdout, label) == round(100 * stats[0], 1)
        assert summary[f"{label}_AP"] == pytest.approx(stats[0], abs=1e-12)  # the trainer's evaluation, the same


def test_the_detection_demo_prepares_trains_evaluates_and_draws_its_pictures(detection_demo):
    """From an empty directory: the canvases are prepared, Mask R-CNN trains, the report gets its grid, eval prints
    box and mask AP, and the last line names the folder holding one picture per val canvas drawn."""
    root, result = detection_demo
    run_dir = root / "runs" / "digits_mask_rcnn"
    assert (root / "data" / "digits_coco" / "val" / "annotations.json").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in records) == MASK_RCNN_EPOCHS * (600 // 16)
    printed = result.stdout.splitlines()
    assert any(line.startswith("box AP: ") for line in printed)
    assert any(line.startswith("mask AP: ") for line in printed)
    assert (run_dir / "eval" / "bbox.json").is_file() and (run_dir / "eval" / "segm.json").is_file()
    assert (run_dir / "report" / "predictions.png").is_file()
    assert printed[-1].startswith("detection demo finished in ")
    assert printed[-1].endswith(f"pictures of predictions in {Path('runs') / 'digits_mask_rcnn' / 'pictures'}")
    pictures = sorted((run_dir / "pictures").glob("*.png"))
    assert [p.stem for p in pictures] == ["val_000000", "val_000001", "val_000002", "val_000003"]
    import numpy as np
    from PIL import Image

    from vilscale.tasks.pictures import color_of

    drawn = json.loads((run_dir / "pictures" / "predictions.json").read_text())
    assert sum(len(boxes) for boxes in drawn.values()) > 0  # 2 epochs of Mask R-CNN find digits above 0.3
    for picture in pictures:
        with Image.open(picture) as image:
            assert image.size == (96, 96)  # drawn on the canvas at its own size
            pixels = np.asarray(image.convert("RGB"))
        canvas = np.asarray(Image.open(root / "data" / "digits_coco" / "val" / "images" / f"{picture.stem}.jpg")
                            .convert("RGB"))
        boxes = drawn[picture.name]  # keyed by the picture drawn (val_000000.png)
        untouched = np.ones((96, 96), dtype=bool)  # away from every box and its label, the canvas itself
        for box in boxes:
            x1, y1, x2, y2 = (int(v) for v in box["box"])
            untouched[max(y1 - 2, 0):max(y2, y1 + 16) + 3, max(x1 - 2, 0):max(x2, x1 + 80) + 3] = False
        assert (pixels[untouched] == canvas[untouched]).all(), picture.name
        if boxes:  # the best box is drawn last: its bottom edge is whole, in its category's colour
            best = max(boxes, key=lambda b: b["score"])
            x1, y1, x2, y2 = (int(v) for v in best["box"])
            edge = pixels[min(y2, 95), x1:min(x2, 95) + 1]
            assert (edge == np.array(color_of(best["label_index"]), dtype=np.uint8)).all(axis=-1).all(), best


@pytest.mark.extended
def test_mask_rcnn_trained_in_bf16_scores_within_two_points_of_fp32(detection_demo, digits_coco, tmp_path):
    """The same job, seed and steps as the demo's fp32 run, in bf16: the backbone, FPN and heads compute in bf16,
    boxes, losses and NMS in fp32, so the box AP lands within 2 points of fp32's (both above the learning bar)."""
    root, _ = detection_demo
    fp32 = json.loads((root / "runs" / "digits_mask_rcnn" / "summary.json").read_text())
    run_dir = tmp_path / "bf16"
    vilscale("train", str(MASK_RCNN), "--nproc", "2", "--set", f"run_dir={run_dir}", *data_sets(digits_coco),
             "--set", f"train.max_steps={MASK_RCNN_EPOCHS * (600 // 16)}", "--set", "train.precision=bf16")
    bf16 = json.loads((run_dir / "summary.json").read_text())
    assert bf16["step"] == fp32["step"]
    assert bf16["box_AP50"] >= MASK_RCNN_AP50_BAR and fp32["box_AP50"] >= MASK_RCNN_AP50_BAR, (bf16, fp32)
    assert abs(bf16["box_AP"] - fp32["box_AP"]) <= 0.02, (bf16["box_AP"], fp32["box_AP"])
    assert abs(bf16["mask_AP"] - fp32["mask_AP"]) <= 0.02, (bf16["mask_AP"], fp32["mask_AP"])
