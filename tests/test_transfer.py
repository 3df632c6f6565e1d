"""Pretraining's worth, the paper's claim in miniature: a downstream fine-tune started from the classification
demo's export beats the same fine-tune started from random weights, on every seed. Two twins:

- Semantic segmentation (jobs/digits_semfpn.yaml, its own 12 epochs, 2 ranks) from the export of 4 pretraining
  epochs. Measured on the 2-core machine (README, "Pretraining's worth, measured"), mIoU export vs random: seeds
  0/1/2 29.0/31.0/29.8 vs 27.3/28.6/28.1, the export ahead by 1.7/2.4/1.7 (before the loader's RNG fix
  2.6/4.4/1.9). At the 3 epochs `make test` could afford the two inits cannot be told apart (11.4/13.7/13.5 vs
  11.9/13.8/13.4), so this test needs the full schedule: six runs of about a minute each.
- Detection and instance segmentation (jobs/digits_mask_rcnn.yaml, its own 4 epochs, 2 ranks) on canvases drawn
  from only 3 training digits of each class (`vilscale prepare digits-coco --train-digits-per-class 3`: a small
  labelled set, validated on the other writers' digits), from the export of the demo's full 15 epochs (val top-1
  97.5%). Box AP export vs random, seeds 0/1/2: 42.0/43.3/43.3 vs 39.8/40.4/39.9, ahead by 2.2/2.9/3.4 (mask AP
  47.2/45.5/45.8 vs 44.3/44.3/43.7). On canvases from every training digit (as many labelled digits as the
  pretraining saw) the export does not help (README); the export of 4 pretraining epochs leads by only
  0.4/1.4/0.8. This twin took 7m55 with its pretraining and printed the same figures.

Both are marked `transfer` and left out of `make test` (its 30-minute budget cannot hold them); run them with
`make test-transfer` (or `pytest -m transfer`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.transfer, pytest.mark.slow, pytest.mark.usefixtures("private_checksum_cache")]

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
# Segmentation: the smallest measured lead is 1.7 mIoU points and the mean 1.9 (1.9 and 3.0 before the RNG fix):
# the bars keep about 60% of each.
MIOU_LEAD_EVERY_SEED = 0.010
MIOU_LEAD_ON_AVERAGE = 0.012
# Detection: the smallest measured lead is 2.2 box AP points and the mean 2.8: the bars keep about half of each.
BOX_AP_LEAD_EVERY_SEED = 0.010
BOX_AP_LEAD_ON_AVERAGE = 0.015
FEW_DIGITS_PER_CLASS = 3


def fine_tune(job: str, run_dir: Path, data: list[str], seed: int, *sets: str) -> dict:
    command = [sys.executable, "-m", "vilscale.cli", "train", str(REPO / "jobs" / job), "--nproc", "2",
               "--set", f"run_dir={run_dir}", "--set", f"train.seed={seed}"]
    for assignment in (*data, *sets):
        command += ["--set", assignment]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=REPO, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


def export(run_dir: Path, out: Path) -> Path:
    exported = subprocess.run([sys.executable, "-m", "vilscale.cli", "export", str(run_dir), str(out)],
                              capture_output=True, text=True, cwd=REPO)
    assert exported.returncode == 0, exported.stderr
    return out


def leads_over_seeds(job: str, data: list[str], weights: Path, metric: str, tmp_path: Path, *sets: str) -> list:
    leads = []
    for seed in SEEDS:
        pretrained = fine_tune(job, tmp_path / f"export{seed}", data, seed, f"model.init_weights={weights}", *sets)
        scratch = fine_tune(job, tmp_path / f"random{seed}", data, seed, *sets)
        print(f"{job} seed {seed}: {metric} {100 * pretrained[metric]:.1f} from the export, "
              f"{100 * scratch[metric]:.1f} from random weights")
        leads.append(pretrained[metric] - scratch[metric])
    return leads


def test_the_demo_export_beats_random_weights_at_segmentation_on_every_seed(pretrained_digits, digits_coco,
                                                                             tmp_path):
    weights = export(pretrained_digits, tmp_path / "demo_digits.safetensors")
    data = [f"data.{split}_{kind}={digits_coco / split / kind}" for split in ("train", "val")
            for kind in ("images", "masks")]
    leads = leads_over_seeds("digits_semfpn.yaml", data, weights, "miou", tmp_path, "eval.every_epochs=12")
    assert min(leads) >= MIOU_LEAD_EVERY_SEED and sum(leads) / len(leads) >= MIOU_LEAD_ON_AVERAGE, leads


@pytest.fixture(scope="module")
def demo_digits(digits, tmp_path_factory) -> Path:
    """The quickstart demo's run (jobs/demo_digits.yaml, all its 15 epochs) on 2 ranks."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "vilscale.cli", "train", str(REPO / "jobs" / "demo_digits.yaml"), "--nproc", "2",
         "--set", f"run_dir={run_dir}", "--set", f"data.train_manifest={digits / 'train' / 'manifest.json'}",
         "--set", f"data.val_manifest={digits / 'val' / 'manifest.json'}", "--set", "eval.every_epochs=100"],
        capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_the_demo_export_beats_random_weights_at_detection_from_few_labelled_digits(demo_digits, tmp_path):
    canvases = tmp_path / "few"
    prepared = subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "digits-coco", str(canvases),
                               "--train-digits-per-class", str(FEW_DIGITS_PER_CLASS)],
                              capture_output=True, text=True, cwd=REPO)
    assert prepared.returncode == 0, prepared.stderr
    weights = export(demo_digits, tmp_path / "demo_digits.safetensors")
    data = [f"data.{split}_{kind}={canvases / split / name}" for split in ("train", "val")
            for kind, name in (("annotations", "annotations.json"), ("images", "images"))]
    leads = leads_over_seeds("digits_mask_rcnn.yaml", data, weights, "box_AP", tmp_path)
    assert min(leads) >= BOX_AP_LEAD_EVERY_SEED and sum(leads) / len(leads) >= BOX_AP_LEAD_ON_AVERAGE, leads
