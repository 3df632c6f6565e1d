"""Every job in jobs/ as shipped: `vilscale train` of the job file itself for 2 steps and its end-of-run evaluation,
with the job's own model variant, task and heads, precision, optimizer, schedule, EMA, loss and ZeRO stage, on the
CPU with one rank. Only what this machine cannot have is substituted, and each job's test id says what:

- the data: a tiny set in the job's own format (FFCV shards written by `vilscale prepare imagefolder` with the job's
  class count; COCO instances JSON + images; ADE-format images + label maps), with as many classes as the job has;
- the steps (2), the batch (micro-batch <= 2, no accumulation) and the world size (1 rank);
- initial weights the job names but this machine lacks: random weights of the job's own variant at 224 px, written
  as an export, so the adapter still interpolates and replaces what the job's fine-tune would;
- where the CPU makes it too slow, the image size: detection images at shorter side 224 (COCO's 800 took over ten
  minutes a step in bf16 here), segmentation crops of 224 (ADE's 512); classification keeps its own sizes.

Detection evaluates with ``model.score_threshold=0``, so a random head's detections reach NMS (with the default 0.05
no detection passes and NMS never runs: the bf16 crash of the COCO jobs waited for a trained head). A job in fp16,
which the CPU cannot run, must be refused in one line (exit 2) and is then reported as skipped with the reason.
A job added to jobs/ is picked up here without editing this file. `benchmarks/gpu_check.sh` runs the same jobs at
their full shapes on a GPU (benchmarks/jobs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vilscale.devices import usable_cores
from vilscale.orchestration.config import load_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
CPU_SIDE = 224  # the smallest side at which ViL-Small's stage 4 holds one 7x7 window
HEADLINE = {"classification": "val_top1", "detection": "box_AP", "segmentation": "miou"}


class TinyData:
    """Tiny data sets in each task's format, written once per (format, class count) for the session."""

    def __init__(self, root: Path):
        self.root = root
        self.made: dict[tuple, dict[str, str]] = {}

    def for_spec(self, spec) -> dict[str, str]:
        """The data keys of ``spec`` pointing at a tiny set of its format and class count."""
        key = (spec.task, spec.model.num_classes)
        if key not in self.made:
            folder = self.root / f"{spec.task}-{spec.model.num_classes}"
            self.made[key] = getattr(self, spec.task)(folder, spec.model.num_classes)
        return self.made[key]

    @staticmethod
    def classification(folder: Path, classes: int) -> dict[str, str]:
        """FFCV shards with ``classes`` classes (the first two hold images, the rest are empty folders, as
        `prepare` keeps them), written by the real `vilscale prepare imagefolder`."""
        from PIL import Image

        rng = np.random.default_rng(0)
        for split, per_class in (("train", 4), ("val", 1)):
            source = folder / "source" / split
            for index in range(classes):
                (source / f"c{index:05d}").mkdir(parents=True)
            for index in range(2):
                for image in range(per_class):
                    pixels = rng.integers(0, 256, (72 + 8 * image, 96, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(source / f"c{index:05d}" / f"{image}.jpg", quality=90)
        train, val = folder / "train", folder / "val"
        _vilscale("prepare", "imagefolder", str(folder / "source" / "train"), str(train), "--num-shards", "1")
        _vilscale("prepare", "imagefolder", str(folder / "source" / "val"), str(val), "--num-shards", "1",
                  "--classes", str(train / "manifest.json"))
        return {"data.train_manifest": str(train / "manifest.json"), "data.val_manifest": str(val / "manifest.json")}

    @staticmethod
    def _canvases(folder: Path, classes: int) -> Path:
        """digits-coco canvases (6 train, 2 val) whose annotation files list ``classes`` categories (the digits
        use the first ten ids)."""
        from vilscale.data.coco import DigitsCocoSettings, write_digits_coco

        write_digits_coco(folder, DigitsCocoSettings(train_images=6, val_images=2))
        for split in ("train", "val"):
            path = folder / split / "annotations.json"
            content = json.loads(path.read_text())
            content["categories"] = [{"id": index + 1, "name": f"class{index}"} for index in range(classes)]
            path.write_text(json.dumps(content))
        return folder

    def detection(self, folder: Path, classes: int) -> dict[str, str]:
        canvases = self._canvases(folder, classes)
        return {f"data.{split}_{what}": str(canvases / split / where)
                for split in ("train", "val") for what, where in (("annotations", "annotations.json"),
                                                                  ("images", "images"))}

    def segmentation(self, folder: Path, classes: int) -> dict[str, str]:
        canvases = self._canvases(folder, max(classes, 11))
        return {f"data.{split}_{what}": str(canvases / split / what) for split in ("train", "val")
                for what in ("images", "masks")}


def _vilscale(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", *args], capture_output=True, text=True, cwd=cwd,
                            timeout=1200, env={**os.environ, "VILSCALE_CACHE_DIR": str(cwd / ".cache")}
                            if cwd != REPO else None)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def substitutions(spec, tiny: TinyData, work: Path) -> tuple[list[str], list[str]]:
    """(the --set overrides that run ``spec`` here, what each one substitutes in words)."""
    overrides = [f"run_dir={work / 'run'}", "train.max_steps=2", "train.global_batch=0", "train.grad_accum=1",
                 f"train.micro_batch={min(spec.train.micro_batch, 2)}", "train.log_every=1",
                 f"eval.batch_size={min(spec.eval.batch_size, 2)}", "metrics.port=0"]
    said = ["tiny data", "2 steps", "1 rank", f"micro-batch {min(spec.train.micro_batch, 2)}"]
    overrides += [f"{key}={value}" for key, value in tiny.for_spec(spec).items()]
    if spec.model.init_weights:
        overrides.append(f"model.init_weights={_random_export(spec, work)}")
        said.append("random initial weights")
    if spec.task == "detection":
        overrides.append("model.score_threshold=0")
        if max(spec.data.min_size) > CPU_SIDE:
            overrides += [f"data.min_size=[{CPU_SIDE}]", f"data.max_size={CPU_SIDE * 4 // 3}"]
            said.append(f"images {CPU_SIDE}x{CPU_SIDE * 4 // 3} (not {max(spec.data.min_size)}x{spec.data.max_size})")
    if spec.task == "segmentation" and spec.data.crop_size > CPU_SIDE:
        overrides.append(f"data.crop_size={CPU_SIDE}")
        said.append(f"crops {CPU_SIDE} (not {spec.data.crop_size})")
    return overrides, said


def _random_export(spec, work: Path) -> Path:
    """Random weights of the job's variant, as a classifier at 224 px with 10 classes (so a fine-tune's tables are
    interpolated and its head replaced), written as a vilscale export."""
    import torch
    from safetensors.torch import save_file

    from vilscale.model import create_model

    torch.manual_seed(0)
    model = create_model(spec.model.name, pos_embed=spec.model.pos_embed, window=spec.model.window, img_size=224,
                         num_classes=10)
    path = work / "initial.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyData:
    return TinyData(tmp_path_factory.mktemp("tiny"))


def _lab_sized(job: Path) -> bool:
    """A job at a lab's shapes (224 px and up): minutes each on the CPU, so in make test-extended, not CI's tier."""
    spec = load_spec(job)
    return spec.model.img_size >= CPU_SIDE or (spec.task == "detection" and max(spec.data.min_size) >= CPU_SIDE)


@pytest.mark.parametrize("job", [pytest.param(job, marks=pytest.mark.extended) if _lab_sized(job) else job
                                 for job in JOBS], ids=lambda path: path.stem)
def test_every_shipped_job_trains_two_steps_and_evaluates_as_shipped(job, tiny, tmp_path):
    spec = load_spec(job)
    if spec.train.precision == "fp16":
        refused = _vilscale("train", str(job), "--nproc", "1", "--set", f"run_dir={tmp_path / 'run'}", check=False)
        assert refused.returncode == 2 and "fp16" in refused.stderr and "Traceback" not in refused.stderr
        pytest.skip(f"{job.name} trains in fp16, which the CPU cannot: refused in one line "
                    f"({refused.stderr.strip().splitlines()[-1]}); benchmarks/gpu_check.sh runs it on a GPU")
    overrides, said = substitutions(spec, tiny, tmp_path)
    args = [a for override in overrides for a in ("--set", override)]
    result = _vilscale("train", str(job), "--nproc", "1", *args, cwd=tmp_path, check=False)
    where = f"{job.name} ({', '.join(said)})"
    assert result.returncode == 0, f"{where}:\n{result.stderr[-6000:]}"
    assert "Traceback" not in result.stderr, where
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 2 and HEADLINE[spec.task] in summary, (where, summary)
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    if spec.task == "detection":  # real detections went through NMS and were scored
        assert json.loads((tmp_path / "run" / "eval" / "bbox.json").read_text()), where
    if spec.data.num_workers > usable_cores():
        assert f"data.num_workers={spec.data.num_workers} is more than the {usable_cores()} CPU core(s)" \
               in result.stderr, where
    print(f"{where}: {spec.model.name}, {spec.train.precision}, ZeRO-{spec.train.zero_stage}, {spec.optim.name}, "
          f"{HEADLINE[spec.task]} {summary[HEADLINE[spec.task]]}")
