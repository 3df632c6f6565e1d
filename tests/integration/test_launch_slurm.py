"""`vilscale submit --backend slurm` against a real one-node SLURM cluster (munge, slurmctld, slurmd)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import real_services as services
from real_services import SMOKE, metric_steps, smoke_overrides, vilscale

pytestmark = pytest.mark.integration


def test_missing_sbatch_is_an_error_before_anything_is_submitted(tmp_path):
    run_dir = tmp_path / "run"
    result = vilscale("submit", str(SMOKE), "--backend", "slurm", "--set", f"run_dir={run_dir}",
                      env={"PATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "sbatch not found" in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(("override", "expected"), [
    ("launcher.cpus_per_task=4096", r"asks for 1 node\(s\) with 0 GPU\(s\), 8192 CPU\(s\)"),
    ("launcher.gpus_per_node=8", r"asks for 1 node\(s\) with 8 GPU\(s\)"),
    ("launcher.nodes=3", r"asks for 3 node\(s\)"),
])
def test_a_job_larger_than_the_cluster_is_refused_with_the_numbers(slurm, tmp_path, override, expected):
    result = vilscale("submit", str(SMOKE), "--backend", "slurm", "--set", override,
                      "--set", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert re.search(expected, result.stderr), result.stderr
    cpus = os.cpu_count()
    assert f"largest has 0 GPU(s), {cpus} CPU(s)" in result.stderr
    assert slurm.command("squeue", "--noheader").strip() == ""


@pytest.mark.slow
def test_requeued_job_resumes_from_its_latest_checkpoint(slurm, digits, tmp_path):
    run_dir = tmp_path / "run"
    max_steps = 60
    submit = subprocess.Popen(
        [sys.executable, "-m", "vilscale.cli", "submit", str(SMOKE), "--backend", "slurm", "--wait",
         *smoke_overrides(digits, run_dir, max_steps=max_steps, ckpt_every=4)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=services.REPO,
        env={**os.environ, **slurm.env})
    try:
        job_id = services.wait_until(lambda: slurm.command("squeue", "--noheader", "--format=%i").split(),
                                     timeout_s=60, what="job in the queue")[0]
        latest = run_dir / "checkpoints" / "latest"
        services.wait_until(latest.exists, timeout_s=300, what="first checkpoint", poll_s=0.1,
                            logs=tuple((run_dir / "submitit").glob("*_0_log.*")))
        step_at_requeue = int(latest.read_text().strip().split("_")[-1])
        assert not (run_dir / "summary.json").exists(), "the job ended before it could be requeued"
        slurm.command("scontrol", "requeue", job_id)
        output, _ = submit.communicate(timeout=600)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, output
    assert "Restarts=1" in slurm.command("scontrol", "show", "job", job_id)
    assert "restart 1" in output  # printed by rank 0 of the second allocation
    resumed = [int(step) for step in re.findall(r"resumed from step_\d+ \(step (\d+)", output)]
    assert len(resumed) == 1 and step_at_requeue <= resumed[0] < max_steps, output
    steps = metric_steps(run_dir)
    assert steps.count(2) == 1, f"step 2 was trained twice: the requeued job started over ({steps})"
    assert steps[-1] == max_steps
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == max_steps
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{max_steps:08d}"
