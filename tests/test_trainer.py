"""The DeepSpeed trainer on real digits shards: checkpoints, exact resume, export, metrics, faults.

Every run here is a real DeepSpeed engine (ZeRO over gloo on CPU) reading real FFCV shards.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from vilscale.orchestration.checkpoint import Checkpointer
from vilscale.orchestration.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "digits", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def smoke_args(digits: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--set", f"run_dir={run_dir}", "--set", f"data.train_manifest={digits / 'train' / 'manifest.json'}",
            "--set", f"data.val_manifest={digits / 'val' / 'manifest.json'}", *extra]


def train(digits: Path, run_dir: Path, *extra: str, nproc: int = 1, check: bool = True):
    command = [sys.executable, "-m", "vilscale.cli", "train", str(SMOKE), "--nproc", str(nproc),
               *smoke_args(digits, run_dir, *extra)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def export(run_dir: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "export", str(run_dir), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return load_file(str(out))


def test_two_rank_zero2_run_writes_checkpoints_metrics_and_exports_loadable_weights(digits, tmp_path):
    run_dir = tmp_path / "run"
    train(digits, run_dir, nproc=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 8 and 0.0 <= summary["val_top1"] <= 1.0
    assert summary["val_samples"] == json.loads((digits / "val" / "manifest.json").read_text())["num_samples"]
    checkpointer = Checkpointer(run_dir, keep=2, spec_digest="")
    assert checkpointer.complete_tags() == ["step_00000004", "step_00000008"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    manifest = json.loads((run_dir / "checkpoints" / "step_00000008" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and "client_rank1.pt" in manifest["files"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [2, 4, 6, 8] and all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    targets = json.loads((run_dir / "prometheus_targets.json").read_text())
    assert len(targets) == 2 and all(t["targets"][0].startswith("127.0.0.1:") for t in targets)
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["train"]["zero_stage"] == 2

    from vilscale.model import create_model

    state = export(run_dir, tmp_path / "weights.safetensors")
    model = create_model("vil_nano", img_size=32, window=2, num_classes=10)
    model.load_state_dict(state)  # strict: every key, every shape
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_resume_is_bit_exact_with_zero2_on_two_processes(digits, tmp_path):
    """Stopped at step 3 and resumed to 8 equals one uninterrupted run to 8, bit for bit (fp32, CPU)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(digits, straight, "--set", "train.ckpt_every=100", nproc=2)
    train(digits, split, "--set", "train.ckpt_every=100", "--set", "train.exit_after_steps=3", nproc=2)
    first = json.loads((split / "summary.json").read_text())
    assert first["exited_early"] and first["step"] == 3
    train(digits, split, "--set", "train.ckpt_every=100", nproc=2)
    assert json.loads((split / "summary.json").read_text())["step"] == 8
    a = export(straight, tmp_path / "a.safetensors")
    b = export(split, tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different[:5]}"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(digits, tmp_path):
    run_dir = tmp_path / "run"
    train(digits, run_dir, "--set", "train.max_steps=8", "--set", "train.exit_after_steps=8")
    newest = run_dir / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    result = train(digits, run_dir, "--set", "train.max_steps=10")
    assert "step_00000008 is not usable" in result.stderr and "mp_rank_00_model_states.pt" in result.stderr
    assert "resumed from step_00000004" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 10


def test_nonfinite_losses_are_skipped_then_stop_the_run_after_restoring(digits, tmp_path):
    from vilscale.orchestration.trainer import NonFiniteLossError, run_worker

    spec = load_spec(SMOKE, [a for a in smoke_args(digits, tmp_path / "run") if a != "--set"]
                     + ["train.device=cpu", "train.max_bad_steps=3", "metrics.enabled=false"])
    bad_steps = {2, 5, 6, 7}

    def inject(step, loss):
        return loss * float("nan") if step in bad_steps else loss

    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row at step 7"):
        run_worker(spec, fault_hook=inject)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("nonfinite_total", 0) for r in lines) >= 1
    # the step-4 checkpoint is still the newest complete one: nothing after the NaNs replaced it
    assert Checkpointer(tmp_path / "run", keep=2, spec_digest="").complete_tags()[-1] == "step_00000004"


def test_metrics_endpoint_serves_prometheus_text_on_loopback(tmp_path):
    from vilscale.orchestration.metrics import TrainingMetrics

    metrics = TrainingMetrics(tmp_path, run_id="r1", rank=0, host="127.0.0.1", port=0, serve=True)
    try:
        metrics.samples.inc(64)
        metrics.step_duration.observe(0.2)
        metrics.publish_targets("r1")
        body = urllib.request.urlopen(f"http://{metrics.endpoint}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
    assert 'vilscale_train_samples_total{rank="0",run_id="r1"} 64.0' in body
    assert "vilscale_step_duration_seconds_bucket" in body
    targets = json.loads((tmp_path / "prometheus_targets.json").read_text())
    assert targets[0]["targets"] == [metrics.endpoint]


def test_resume_on_a_different_number_of_ranks_goes_through_a_universal_checkpoint(digits, tmp_path):
    run_dir = tmp_path / "run"
    train(digits, run_dir, "--set", "train.exit_after_steps=4", nproc=2)
    before = export(run_dir, tmp_path / "before.safetensors")
    result = train(digits, run_dir, "--set", "train.max_steps=6", "--set", "train.exit_after_steps=0", nproc=1)
    assert "written by 2 ranks, this run has 1: converting it to a universal checkpoint" in result.stderr
    assert "resumed from step_00000004" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6
    after = export(run_dir, tmp_path / "after.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training went on from the loaded weights"
