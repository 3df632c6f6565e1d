"""The two-node Ray cluster on namespace hosts: a head in the root namespace on the bridge address and a
worker node on host r1. Both nodes take work (a STRICT_SPREAD placement group, a Ray Train TorchTrainer
whose gloo all_reduce crosses the test network, submitted through the Job Submission API from the root
namespace), and a lost node makes Ray Train retry once the node is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import real_services as services

pytestmark = pytest.mark.multinode

RAY_CHECKS = Path(__file__).with_name("ray_checks.py")


def _records(out_dir: Path) -> list[dict]:
    records = []
    for path in sorted(out_dir.glob("rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["time"])


def test_both_nodes_are_alive_and_a_strict_spread_group_runs_one_task_on_each(ray_two_nodes):
    result = subprocess.run([sys.executable, str(RAY_CHECKS), "placement"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "RAY_ADDRESS": ray_two_nodes.gcs_address})
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["alive"] == sorted(ray_two_nodes.addresses)
    assert sorted(report["bundles"]) == sorted(ray_two_nodes.addresses)


def test_torch_trainer_job_all_reduces_across_the_nodes_and_its_retry_waits_for_a_lost_node(ray_two_nodes, tmp_path):
    """A TorchTrainer of 2 workers, submitted through the Job Submission API from the root namespace, runs one
    worker per node and all_reduces over the test network. When r1's raylet is killed, the worker group fails
    and FailureConfig(max_failures=1) retries it; STRICT_SPREAD needs both nodes, so the retry waits until r1
    is back (a new node at the same address), then runs every step again on both nodes."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    out_dir = tmp_path / "train"
    steps = 20
    head, r1 = ray_two_nodes.head.node_ip_address, ray_two_nodes.hosts["r1"].address
    client = JobSubmissionClient(ray_two_nodes.dashboard_url)
    job_id = client.submit_job(entrypoint=f"{sys.executable} {RAY_CHECKS} train {out_dir} {steps} 0.2 1")
    try:
        services.wait_until(lambda: len(_records(out_dir)) >= 4, timeout_s=240, what="first training steps",
                            logs=(ray_two_nodes.head.log,))
        first = _records(out_dir)
        # One worker per node, each binding gloo to its own node's interface on the test network.
        assert {r["address"]: r["gloo_socket_ifname"] for r in first} == {head: ray_two_nodes.network.bridge,
                                                                           r1: "eth0"}, first
        assert len({(r["rank"], r["address"]) for r in first}) == 2, first
        assert {r["sum"] for r in first} == {3.0}  # 1 + 2: both ranks took part in every all_reduce

        lost_at = ray_two_nodes.lose_node("r1", how="raylet")
        services.wait_until(lambda: ray_two_nodes.head.nodes().get(r1) == "DEAD", timeout_s=60, what="r1 marked dead")
        dead_after_s = time.time() - lost_at
        assert max(r["time"] for r in _records(out_dir)) < lost_at + 5, "steps ran long after the node was lost"
        assert client.get_job_status(job_id) == JobStatus.RUNNING, "the run ended instead of waiting for its retry"
        ray_two_nodes.restore_node("r1")
        back_at = time.time()
        status = services.wait_until(
            lambda: (state := client.get_job_status(job_id)) in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED} and state,
            timeout_s=300, what="Ray job finished", poll_s=1)
    finally:
        if client.get_job_status(job_id) == JobStatus.RUNNING:
            client.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    retried = [r for r in _records(out_dir) if r["time"] > back_at]
    assert {(r["rank"], r["step"]) for r in retried} == {(rank, step) for rank in (0, 1) for step in range(steps)}
    assert sorted({r["address"] for r in retried}) == sorted(ray_two_nodes.addresses)
    assert {r["sum"] for r in retried} == {3.0}
    print(f"r1 marked dead {dead_after_s:.1f} s after its raylet was killed; "
          f"retry's first step {min(r['time'] for r in retried) - back_at:.1f} s after the node was back")
