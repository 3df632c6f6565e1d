"""`vilscale submit --backend ray` and the plain `ray job submit` against a real Ray head on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import real_services as services
from real_services import SMOKE, check_trained_steps, held_before, metric_steps, smoke_overrides, vilscale

pytestmark = pytest.mark.integration


def test_unreachable_address_is_an_error_before_anything_is_submitted(digits, tmp_path):
    address = f"http://127.0.0.1:{services.free_port()}"
    result = vilscale("submit", str(SMOKE), "--backend", "ray", "--address", address,
                      *smoke_overrides(digits, tmp_path / "run"), timeout_s=60)
    assert result.returncode == 2, result.stderr
    assert "cannot reach the Ray cluster" in result.stderr and address.split("//")[1] in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("override", "expected"), [
    ("launcher.gpus_per_node=4", "asks for 4 GPUs (1 node(s) x 4 launcher.gpus_per_node)"),
    ("launcher.cpus_per_task=3", "asks for 6 CPUs (1 node(s) x 2 rank(s) x 3 launcher.cpus_per_task)"),
])
def test_a_job_larger_than_the_cluster_is_refused_with_the_numbers(ray_head, digits, tmp_path, override, expected):
    result = vilscale("submit", str(SMOKE), "--backend", "ray", "--address", ray_head.dashboard_url,
                      "--set", override, *smoke_overrides(digits, tmp_path / "run"), timeout_s=120)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "has 0 GPU(s) and 2 CPU(s) on 1 node(s)" in result.stderr
    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(ray_head.dashboard_url).list_jobs() == []


@pytest.mark.slow
def test_plain_ray_job_submit_trains_and_a_killed_worker_resumes_from_the_latest_checkpoint(ray_head, digits, tmp_path):
    """The README's raw command, `ray job submit --working-dir jobs -- <python> -m vilscale.cli train ...
    --launcher ray`, on two workers; one worker is SIGKILLed while the ranks are held before step 6: Ray
    Train restarts the group, which resumes from the step-4 checkpoint and finishes: every rank trains steps 1-5,
    then 5 again (on the same samples) to 16, none skipped. `vilscale submit --backend ray` with a lost node:
    tests/multinode."""
    run_dir, gate = tmp_path / "run", tmp_path / "release"
    max_steps = 16
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    submit = subprocess.Popen(
        [ray, "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", "jobs", "--",
         sys.executable, "-m", "vilscale.cli", "train", "smoke.yaml", "--launcher", "ray",
         *smoke_overrides(digits, run_dir, held_before(6, gate), max_steps=max_steps, ckpt_every=4,
                          record_samples="true")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=services.REPO)
    try:
        latest = run_dir / "checkpoints" / "latest"
        services.wait_until(latest.exists, timeout_s=300, what="first checkpoint", poll_s=0.1,
                            logs=(ray_head.log,))
        step_at_kill = int(latest.read_text().strip().split("_")[-1])
        assert step_at_kill == 4, "the ranks are held before step 6: step 4 is the only checkpoint"
        # both ranks trained step 5 and wait at the gate before step 6 (a kill during step 5 would leave that step
        # recorded by one rank only)
        services.wait_until(lambda: all(5 in [step for step, _ in trained]
                                        for trained in services.sample_records(run_dir).values())
                            and len(services.sample_records(run_dir)) == 2,
                            timeout_s=300, what="both ranks at the gate before step 6", poll_s=0.1,
                            logs=(ray_head.log,))
        workers = ray_head.alive_workers()
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        gate.touch()
        output, _ = submit.communicate(timeout=600)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, output
    assert "succeeded" in output
    resumed = [int(step) for step in re.findall(r"resumed from step_\d+ \(step (\d+)", output)]
    assert resumed == [step_at_kill], output
    check_trained_steps(run_dir, dict.fromkeys((0, 1), [*range(1, 6), *range(step_at_kill + 1, max_steps + 1)]))
    assert metric_steps(run_dir)[-1] == max_steps
    assert json.loads((run_dir / "summary.json").read_text())["step"] == max_steps
    assert latest.read_text().strip() == f"step_{max_steps:08d}"


@pytest.mark.extended
@pytest.mark.slow
def test_an_error_no_retry_can_fix_ends_the_ray_run_at_once(ray_head, digits, tmp_path):
    """A rank meets a user's mistake that only the cluster can reveal (train.device=cuda on CPU-only
    nodes): the Ray run stops at once, with the rank's one line, although launcher.max_restarts allows
    retries; `--wait` exits non-zero."""
    result = vilscale("submit", str(SMOKE), "--backend", "ray", "--wait", "--address", ray_head.dashboard_url,
                      *smoke_overrides(digits, tmp_path / "run", {"launcher.max_restarts": 3}, device="cuda"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no CUDA device is visible" in result.stdout  # the trainer's error, streamed from the job's log
    assert "(not restarting)" in result.stdout and "restarting from the latest checkpoint" not in result.stdout
    assert "ended FAILED" in result.stderr
