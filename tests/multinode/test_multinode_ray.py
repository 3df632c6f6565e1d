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


def _driver(ray_cluster, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RAY_CHECKS), *args], capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "RAY_ADDRESS": ray_cluster.gcs_address})


def _records(out_dir: Path) -> list[dict]:
    records = []
    for path in sorted(out_dir.glob("rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["time"])


def test_both_nodes_are_alive_and_a_strict_spread_group_runs_one_task_on_each(ray_two_nodes):
    result = _driver(ray_two_nodes, "placement")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["alive"] == sorted(ray_two_nodes.addresses)
    assert sorted(report["bundles"]) == sorted(ray_two_nodes.addresses)


def test_torch_trainer_submitted_as_a_job_all_reduces_across_the_two_nodes(ray_two_nodes, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out_dir = tmp_path / "train"
    client = JobSubmissionClient(ray_two_nodes.dashboard_url)  # the Job Submission API, from the root namespace
    job_id = client.submit_job(entrypoint=f"{sys.executable} {RAY_CHECKS} train {out_dir} 3 0.1 0")
    status = services.wait_until(lambda: client.get_job_status(job_id) in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                          JobStatus.STOPPED} and
                                 client.get_job_status(job_id), timeout_s=300, what="Ray job finished", poll_s=1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    records = _records(out_dir)
    assert {(r["rank"], r["step"]) for r in records} == {(rank, step) for rank in (0, 1) for step in range(3)}
    assert {r["sum"] for r in records} == {3.0}
    # One worker per node: the two ranks ran at the two nodes' addresses.
    assert sorted({r["address"] for r in records}) == sorted(ray_two_nodes.addresses)
    assert {r["address"]: r["gloo_socket_ifname"] for r in records} == {
        ray_two_nodes.head.node_ip_address: ray_two_nodes.network.bridge, ray_two_nodes.hosts["r1"].address: "eth0"}


def test_a_lost_node_fails_the_worker_group_and_the_retry_runs_once_the_node_is_back(ray_two_nodes, tmp_path):
    """STRICT_SPREAD needs both nodes, so the retry that FailureConfig(max_failures=1) makes waits for the
    lost node to come back (a new node at the same address), then runs the whole group again."""
    out_dir = tmp_path / "train"
    steps = 20
    driver = subprocess.Popen([sys.executable, str(RAY_CHECKS), "train", str(out_dir), str(steps), "0.2", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "RAY_ADDRESS": ray_two_nodes.gcs_address})
    try:
        services.wait_until(lambda: len(_records(out_dir)) >= 4, timeout_s=240, what="first training steps",
                            logs=(ray_two_nodes.head.log,))
        lost_at = ray_two_nodes.lose_node("r1", how="raylet")
        # The node stays away long enough for the failure to be noticed and the retry to be placed.
        services.wait_until(lambda: ray_two_nodes.head.nodes().get(ray_two_nodes.hosts["r1"].address) == "DEAD",
                            timeout_s=60, what="r1 marked dead")
        dead_after_s = time.time() - lost_at
        assert max(r["time"] for r in _records(out_dir)) < lost_at + 5, "steps ran long after the node was lost"
        assert driver.poll() is None, "the run ended instead of waiting for its retry's resources"
        ray_two_nodes.restore_node("r1")
        back_at = time.time()
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-4000:]
    retried = [r for r in _records(out_dir) if r["time"] > back_at]
    assert {(r["rank"], r["step"]) for r in retried} == {(rank, step) for rank in (0, 1) for step in range(steps)}
    assert sorted({r["address"] for r in retried}) == sorted(ray_two_nodes.addresses)
    print(f"r1 marked dead {dead_after_s:.1f} s after its raylet was killed; "
          f"retry's first step {min(r['time'] for r in retried) - back_at:.1f} s after the node was back")
