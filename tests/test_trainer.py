"""The DeepSpeed trainer on real digits shards: checkpoints, exact resume, export, metrics.

Every run is a real DeepSpeed engine (ZeRO-2 over gloo on CPU) reading real FFCV shards, started
through the `vilscale` command. The uninterrupted 2-rank run (`baseline_run`) is shared.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vilscale.orchestration.checkpoint import Checkpointer
from vilscale.orchestration.config import load_spec

pytestmark = pytest.mark.slow
SMOKE_JOB = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"


@pytest.mark.budget(30)  # the quick tier's one shared run (its setup) and its checks
def test_a_two_rank_run_writes_checkpoints_metrics_and_loadable_weights(smoke, baseline_run, tmp_path):
    run_dir = baseline_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 8
    assert summary["val_samples"] == json.loads((smoke.digits / "val" / "manifest.json").read_text())["num_samples"]
    # top-1 and top-5 are counts of correct samples out of val_samples (every sample once over both ranks)
    top1, top5 = (round(summary[key] * summary["val_samples"]) for key in ("val_top1", "val_top5"))
    assert (summary["val_top1"], summary["val_top5"]) == (top1 / summary["val_samples"], top5 / summary["val_samples"])
    # 8 steps of 32 digits: far from trained (28.3% top-1, 78.6% top-5 measured), but above chance (10%, 50%); the
    # bars keep about half of the measured margin over chance
    assert 0.19 < summary["val_top1"] <= summary["val_top5"] and summary["val_top5"] > 0.64, summary
    assert Checkpointer(run_dir, keep=2, spec_digest="").complete_tags() == ["step_00000004", "step_00000008"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    manifest = json.loads((run_dir / "checkpoints" / "step_00000008" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and "client_rank1.pt" in manifest["files"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]
    assert all(math.isfinite(r["loss"]) and r["images_per_second"] > 0 for r in train_records)
    assert not (run_dir / "tensorboard").exists(), "metrics.tensorboard is off by default"
    targets = json.loads((run_dir / "prometheus_targets.json").read_text())
    assert len(targets) == 2 and all(t["targets"][0].startswith("127.0.0.1:") for t in targets)
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["train"]["zero_stage"] == 2

    # every training sample of the epoch read at most once across both ranks and 8 steps of 16
    samples = smoke.samples(run_dir)
    seen = [i for rank in samples.values() for indices in rank.values() for i in indices]
    assert len(seen) == 2 * 8 * 16 and len(set(seen)) == len(seen)

    from vilscale.model import create_model

    state = smoke.export(run_dir, tmp_path / "weights.safetensors")
    model = create_model("vil_nano", img_size=32, window=2, num_classes=10)
    model.load_state_dict(state)  # strict: every key, every shape
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.budget(200)  # the quick tier's one resume: two launches of the smoke job
def test_resume_is_bit_exact_with_zero2_on_two_processes(smoke, baseline_run, tmp_path):
    """Stopped after step 3 and resumed to 8 equals the uninterrupted run to 8, bit for bit (fp32, CPU):
    the samples of every step, the weights, the EMA of the weights and the final evaluation."""
    split = tmp_path / "split"
    smoke.train(split, "--set", "train.exit_after_steps=3", *smoke.BASELINE)
    first = json.loads((split / "summary.json").read_text())
    assert first["exited_early"] and first["step"] == 3
    result = smoke.train(split, *smoke.BASELINE)
    assert "resumed from step_00000003" in result.stderr
    assert "step 4: ViL attention switches from shift_mode='random' to 'full'" in result.stderr
    resumed, uninterrupted = (json.loads((run / "summary.json").read_text()) for run in (split, baseline_run))
    assert resumed["step"] == 8
    assert smoke.samples(split) == smoke.samples(baseline_run), "the resumed run read other samples"
    for kind in ((), ("--ema",)):
        a = smoke.export(baseline_run, tmp_path / "a.safetensors", *kind)
        b = smoke.export(split, tmp_path / "b.safetensors", *kind)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and not different, f"resumed {kind or 'live'} weights differ in {different[:5]}"
    assert resumed["weights"] == uninterrupted["weights"] == "ema"
    assert (resumed["val_top1"], resumed["val_top5"]) == (uninterrupted["val_top1"], uninterrupted["val_top5"])


def test_resume_on_a_different_number_of_ranks_goes_through_a_universal_checkpoint(smoke, baseline_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(baseline_run, run_dir)
    before = smoke.export(run_dir, tmp_path / "before.safetensors")
    result = smoke.train(run_dir, *smoke.BASELINE, "--set", "train.max_steps=10", "--allow-spec-change", nproc=1)
    assert "written by 2 ranks, this run has 1: converting it to a universal checkpoint" in result.stderr
    assert "resumed from step_00000008" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 10
    after = smoke.export(run_dir, tmp_path / "after.safetensors")
    from vilscale.model import create_model

    torch.manual_seed(0)  # train.seed: the weights the run started from
    initial = create_model("vil_nano", img_size=32, window=2, num_classes=10, drop_path_rate=0.0).state_dict()

    def distance(x, y):
        return sum((x[k].float() - y[k].float()).square().sum() for k in x).sqrt().item()

    # Two more steps from the step-8 weights stay close to them; a run restarted from scratch would not.
    assert 0 < distance(after, before) < 0.5 * distance(before, initial)


def test_nonfinite_losses_are_skipped_then_stop_the_run(smoke, tmp_path, capsys):
    """Isolated non-finite steps are skipped and training goes on; max_bad_steps of them in a row stop the
    run (exit code 3 from a rank, never restarted). Skipped steps leave the weights alone, so the latest
    checkpoint is good as it is and nothing is restored."""
    from vilscale.orchestration.training.loop import NonFiniteLossError, run_worker

    assignments = [a for a in smoke.args(tmp_path / "run") if a != "--set"]
    spec = load_spec(SMOKE_JOB, assignments + ["train.max_bad_steps=3", "metrics.enabled=false"])
    bad_steps = {2, 5, 6, 7}

    def inject(step, loss):
        return loss * float("nan") if step in bad_steps else loss

    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row at step 7; the run stopped"):
        run_worker(spec, fault_hook=inject)
    log = capsys.readouterr().err
    assert "step 2: non-finite loss, step skipped" in log and "restored" not in log
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the hook's steps count from 0, metrics.jsonl's from 1: hook steps 2, 5 and 6 are steps 3, 6 and 7 there, and
    # the third bad step in a row (step 8) stops the run before its record is written
    assert [(r["step"], r["nonfinite_total"]) for r in lines] == [(2, 0), (4, 1), (6, 2)], lines
    # the step-4 checkpoint is still the newest complete one: nothing after the NaNs replaced it
    assert Checkpointer(tmp_path / "run", keep=2, spec_digest="").complete_tags()[-1] == "step_00000004"


def test_metrics_endpoint_serves_prometheus_text_on_loopback(tmp_path):
    from vilscale.orchestration.training.metrics import TrainingMetrics

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


def test_a_rank_bound_to_every_interface_advertises_an_address_it_can_be_reached_at(tmp_path, monkeypatch):
    """metrics.host=0.0.0.0 (the README's advice for clusters) must not put 0.0.0.0:PORT into the target
    file, which Prometheus cannot scrape: the rank advertises its address towards the rendezvous host."""
    from vilscale.orchestration.training.metrics import TrainingMetrics

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    metrics = TrainingMetrics(tmp_path, run_id="r1", rank=0, host="0.0.0.0", port=0, serve=True)
    try:
        metrics.publish_targets("r1")
        target = json.loads((tmp_path / "prometheus_targets.json").read_text())[0]["targets"][0]
        assert target.startswith("127.0.0.1:"), target
        assert b"vilscale_train_samples_total" in urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read()
    finally:
        metrics.close()


def test_ema_grad_accumulation_bf16_and_activation_checkpointing_train_together(smoke, tmp_path):
    """bf16, grad accumulation, activation checkpointing and an EMA in one run: the EMA equals the average
    of the weights of every step (as the bf16 module held them), and `vilscale eval` reports exactly what
    the trainer's own evaluation did (the EMA weights, in bf16)."""
    from vilscale.model import create_model
    from vilscale.orchestration.checkpoint.consolidate import consolidated_state_dict

    run_dir = tmp_path / "run"
    decay = 0.9
    smoke.train(run_dir, "--set", f"optim.ema_decay={decay}", "--set", "train.grad_accum=2", "--set",
                "train.precision=bf16", "--set", "train.activation_checkpointing=true", "--set", "train.max_steps=4",
                "--set", "train.ckpt_every=1", "--set", "train.keep_checkpoints=4", nproc=1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["nonfinite_steps"] == 0
    assert summary["val_samples"] == json.loads((smoke.digits / "val" / "manifest.json").read_text())["num_samples"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)

    torch.manual_seed(0)  # train.seed: the weights the run started from
    weights = [create_model("vil_nano", img_size=32, window=2, num_classes=10, drop_path_rate=0.0).state_dict()]
    weights += [consolidated_state_dict(run_dir, zero_stage=2, tag=f"step_{step:08d}")[0] for step in range(1, 5)]
    ema = consolidated_state_dict(run_dir, zero_stage=2, ema=True)[0]
    for name in ema:
        expected = weights[0][name].bfloat16().float()
        for step_weights in weights[1:]:
            expected = decay * expected + (1 - decay) * step_weights[name].bfloat16().float()
        torch.testing.assert_close(ema[name], expected, rtol=0, atol=1e-6, msg=name)

    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "eval", str(run_dir)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout.splitlines()[0])
    assert evaluated["precision"] == "bf16" and "EMA" in evaluated["weights"]
    assert (evaluated["val_top1"], evaluated["val_top5"]) == (summary["val_top1"], summary["val_top5"])


def test_eval_and_report_of_a_finished_run(smoke, baseline_run, baseline_eval, tmp_path):
    result = baseline_eval
    summary = json.loads((baseline_run / "summary.json").read_text())
    # the same weights over every validation sample once, on 1 rank here and 2 ranks in training: the same counts
    evaluated = json.loads(result.stdout.splitlines()[0])
    assert (evaluated["val_top1"], evaluated["val_top5"], evaluated["val_samples"]) == \
        (summary["val_top1"], summary["val_top5"], summary["val_samples"]), (evaluated, summary)
    assert result.stdout.strip().splitlines()[-1] == f"val top-1: {100 * summary['val_top1']:.1f}%"
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "report", str(baseline_run), "--out", str(out),
                             "--no-predictions"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    points = {"loss.png": 4, "learning_rate.png": 4, "throughput.png": 4, "data_wait.png": 4, "eval_accuracy.png": 1}
    # no detection plots for a classifier, and no grid of val predictions with --no-predictions (the grid, 13 s
    # more here, is tested on a detector in tests/test_predict.py)
    assert sorted(path.name for path in out.iterdir()) == sorted(points)
    for name, count in points.items():
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == (600, 350), (name, image.format, image.size)  # 6 x 3.5 in
            pixels = np.asarray(image.convert("RGB"))
        # the series is drawn in matplotlib's first colour (#1f77b4); an empty axes has none of it
        series = (pixels == (0x1F, 0x77, 0xB4)).all(axis=-1)
        assert series.sum() >= 40, f"{name} shows no data"
        columns = np.flatnonzero(series.any(axis=0))
        # 4 training records (steps 2-8) span the axes' width; the one evaluation is one marker
        width = columns[-1] - columns[0]
        assert width > 400 if count > 1 else width < 20, (name, width)
