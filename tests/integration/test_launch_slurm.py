"""`vilscale submit --backend slurm` against a real one-node SLURM cluster (munge, slurmctld, slurmd)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import real_services as services
from real_services import SMOKE, held_before, metric_steps, smoke_overrides, vilscale

pytestmark = pytest.mark.integration


def test_missing_sbatch_is_an_error_before_anything_is_submitted(digits, tmp_path):
    run_dir = tmp_path / "run"
    result = vilscale("submit", str(SMOKE), "--backend", "slurm", *smoke_overrides(digits, run_dir),
                      env={"PATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "sbatch not found" in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(("override", "expected"), [
    ("launcher.cpus_per_task=4096", r"asks for 1 node\(s\) with 0 GPU\(s\), 8192 CPU\(s\)"),
    ("launcher.gpus_per_node=8", r"asks for 1 node\(s\) with 8 GPU\(s\)"),
    ("launcher.nodes=3", r"asks for 3 node\(s\)"),
])
def test_a_job_larger_than_the_cluster_is_refused_with_the_numbers(slurm, digits, tmp_path, override, expected):
    result = vilscale("submit", str(SMOKE), "--backend", "slurm", "--set", override,
                      *smoke_overrides(digits, tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert re.search(expected, result.stderr), result.stderr
    cpus = os.cpu_count()
    assert f"largest has 0 GPU(s), {cpus} CPU(s)" in result.stderr
    assert slurm.command("squeue", "--noheader").strip() == ""


def _latest_step(run_dir) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[-1]) if latest.exists() else -1


@pytest.mark.slow
def test_preempted_then_requeued_job_resumes_from_its_latest_checkpoint_each_time(slurm, digits, tmp_path):
    """USR2 (what SLURM sends before the time limit, and on preemption) makes the ranks save a checkpoint at
    the step they are in and rank 0 requeue the job, which resumes from exactly that step (no step is
    trained twice); an administrator's `scontrol requeue` restarts it too, from the latest checkpoint."""
    run_dir, gate = tmp_path / "run", tmp_path / "release"
    max_steps = 24
    submit = subprocess.Popen(
        [sys.executable, "-m", "vilscale.cli", "submit", str(SMOKE), "--backend", "slurm", "--wait",
         *smoke_overrides(digits, run_dir, held_before(6, gate), max_steps=max_steps, ckpt_every=4)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=services.REPO,
        env={**os.environ, **slurm.env})
    try:
        job_id = services.wait_until(lambda: slurm.command("squeue", "--noheader", "--format=%i").split(),
                                     timeout_s=60, what="job in the queue")[0]
        logs = tuple((run_dir / "submitit").glob("*_0_log.*"))
        services.wait_until(lambda: _latest_step(run_dir) >= 0, timeout_s=300, what="first checkpoint",
                            poll_s=0.1, logs=logs)
        step_at_signal = _latest_step(run_dir)
        assert step_at_signal == 4, "the ranks are held before step 6: step 4 is the only checkpoint"
        slurm.command("scancel", "--signal=USR2", job_id)
        gate.touch()
        # Rank 0 requeues the job and exits, so this allocation cannot finish the run.
        services.wait_until(lambda: "Restarts=1" in slurm.command("scontrol", "show", "job", job_id),
                            timeout_s=60, what="job requeued by rank 0", logs=logs)
        rank0_err = run_dir / "submitit" / f"{job_id}_0_log.err"
        step_at_requeue = _latest_step(run_dir)  # the checkpoint the ranks saved on the notice
        services.wait_until(lambda: "restart 1" in rank0_err.read_text() and _latest_step(run_dir) > step_at_requeue,
                            timeout_s=300, what="a new checkpoint in the second allocation", poll_s=0.1, logs=logs)
        step_at_requeue = _latest_step(run_dir)
        slurm.command("scontrol", "requeue", job_id)
        output, _ = submit.communicate(timeout=600)
        # After `scontrol requeue` the tasks keep running until SLURM kills them (KillWait), and may finish
        # the run first; the third allocation then resumes from the final checkpoint. Wait for it either way.
        services.wait_until(lambda: slurm.command("squeue", "--noheader", "--states=all", "--jobs", job_id,
                                                  "--format=%T").strip() == "COMPLETED",
                            timeout_s=300, what="job COMPLETED", logs=logs)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, output
    assert "Restarts=2" in slurm.command("scontrol", "show", "job", job_id)
    log = rank0_err.read_text()
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log, log
    saved_on_notice = [int(step) for step in re.findall(r"preemption notice: stopped after step (\d+), which is saved",
                                                         log)]
    assert len(saved_on_notice) == 1 and saved_on_notice[0] >= step_at_signal, log
    resumed = [int(step) for step in re.findall(r"resumed from step_\d+ \(step (\d+)", log)]
    assert len(resumed) == 2, log
    assert resumed[0] == saved_on_notice[0], log
    assert step_at_requeue <= resumed[1] <= max_steps, log
    steps = metric_steps(run_dir)
    assert steps.count(2) == 1, f"step 2 was trained twice: a requeued allocation started over ({steps})"
    assert max(steps) == max_steps
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == max_steps
    assert _latest_step(run_dir) == max_steps


@pytest.mark.slow
def test_wait_exits_nonzero_with_the_reason_when_the_job_fails(slurm, digits, tmp_path):
    result = vilscale("submit", str(SMOKE), "--backend", "slurm", "--wait",
                      *smoke_overrides(digits, tmp_path / "run", device="cuda"), env=slurm.env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no CUDA device is visible" in result.stderr


def detection_overrides(digits_coco, run_dir) -> list[str]:
    return ["--set", f"run_dir={run_dir}",
            "--set", f"data.train_annotations={digits_coco / 'train' / 'annotations.json'}",
            "--set", f"data.train_images={digits_coco / 'train' / 'images'}",
            "--set", f"data.val_annotations={digits_coco / 'val' / 'annotations.json'}",
            "--set", f"data.val_images={digits_coco / 'val' / 'images'}",
            "--set", "train.max_steps=4", "--set", "train.ckpt_every=4"]


@pytest.mark.slow
def test_a_detection_job_trains_and_evaluates_through_slurm(slurm, digits_coco, tmp_path):
    run_dir = tmp_path / "run"
    result = vilscale("submit", str(services.REPO / "jobs" / "digits_retinanet.yaml"), "--backend", "slurm", "--wait",
                      *detection_overrides(digits_coco, run_dir), env=slurm.env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and "box_AP" in summary and summary["val_images"] == 120
    # four steps rarely score a detection above torchvision's 0.05: the file is there, in COCO's results format
    predictions = json.loads((run_dir / "eval" / "bbox.json").read_text())
    assert isinstance(predictions, list)
    assert all({"image_id", "category_id", "bbox", "score"} <= set(p) for p in predictions)
