"""Pretraining's worth, the paper's claim in miniature: the digits Semantic FPN fine-tune (jobs/digits_semfpn.yaml,
its own 12 epochs, 2 ranks) started from the classification demo's export beats the same fine-tune started from
random weights, on every seed.

Measured on the 2-core machine (README, "Pretraining's worth, measured"), mIoU export vs random: seeds 0/1/2
29.0/31.0/29.8 vs 27.3/28.6/28.1, the export ahead by 1.7/2.4/1.7 (before the loader's RNG fix 2.6/4.4/1.9). At the
3 epochs `make test` could afford the two inits cannot be told apart (11.4/13.7/13.5 vs 11.9/13.8/13.4), so this
test needs the full schedule: six runs of about a minute each (5m49 in all, with the pretraining). It is marked
`transfer` and left out of `make test` (its 30-minute budget cannot hold it); run it with `make test-transfer` (or
`pytest -m transfer`).

Detection has no such test: on these canvases the export does not help RetinaNet or Mask R-CNN at any budget
measured (README, the detection section)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.transfer, pytest.mark.slow, pytest.mark.usefixtures("private_checksum_cache")]

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "digits_semfpn.yaml"
SEEDS = (0, 1, 2)
# The smallest measured lead is 1.7 mIoU points and the mean 1.9 (1.9 and 3.0 before the RNG fix): the bars keep
# about 60% of each.
LEAD_EVERY_SEED = 0.010
LEAD_ON_AVERAGE = 0.012


def fine_tune(run_dir: Path, digits_coco: Path, seed: int, *sets: str) -> dict:
    data = [f"data.{split}_{kind}={digits_coco / split / kind}" for split in ("train", "val")
            for kind in ("images", "masks")]
    command = [sys.executable, "-m", "vilscale.cli", "train", str(JOB), "--nproc", "2", "--set", f"run_dir={run_dir}",
               "--set", f"train.seed={seed}", "--set", "eval.every_epochs=12"]
    for assignment in (*data, *sets):
        command += ["--set", assignment]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=REPO, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_the_demo_export_beats_random_weights_on_every_seed(pretrained_digits, digits_coco, tmp_path):
    export = tmp_path / "demo_digits.safetensors"
    exported = subprocess.run([sys.executable, "-m", "vilscale.cli", "export", str(pretrained_digits), str(export)],
                              capture_output=True, text=True, cwd=REPO)
    assert exported.returncode == 0, exported.stderr
    leads = []
    for seed in SEEDS:
        pretrained = fine_tune(tmp_path / f"export{seed}", digits_coco, seed, f"model.init_weights={export}")
        scratch = fine_tune(tmp_path / f"random{seed}", digits_coco, seed)
        print(f"seed {seed}: mIoU {100 * pretrained['miou']:.1f} from the export, {100 * scratch['miou']:.1f} "
              f"from random weights")
        leads.append(pretrained["miou"] - scratch["miou"])
    assert min(leads) >= LEAD_EVERY_SEED and sum(leads) / len(leads) >= LEAD_ON_AVERAGE, leads
