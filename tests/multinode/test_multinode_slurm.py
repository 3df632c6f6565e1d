"""The two-node SLURM cluster on namespace hosts: tasks land on both hosts and talk over the test
network (srun, and submitit as vilscale uses it), and a lost node's job is requeued and runs again once
the node returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gloo_check
import pytest
import real_services as services

pytestmark = pytest.mark.multinode

GLOO_CHECK = Path(__file__).with_name("gloo_check.py")


def _reports(output: str) -> list[dict]:
    return sorted((json.loads(line) for line in output.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


def test_srun_places_one_task_per_host_and_gloo_all_reduces_across_them(slurm_two_nodes):
    hosts = slurm_two_nodes.hosts
    result = subprocess.run(["srun", "-N2", "-n2", "--ntasks-per-node=1", sys.executable, str(GLOO_CHECK),
                             str(services.free_port())],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **slurm_two_nodes.env})
    assert result.returncode == 0, result.stdout + result.stderr
    reports = _reports(result.stdout)
    assert [r["node"] for r in reports] == ["h1", "h2"], result.stdout
    assert [r["sum"] for r in reports] == [3.0, 3.0]
    # The ranks reached each other over the veth network: rank 0's host name resolved to h1's address, and
    # each rank's route to it starts at its own host's eth0.
    assert {r["master_ip"] for r in reports} == {hosts["h1"].address}
    assert [r["local_address"] for r in reports] == [hosts["h1"].address, hosts["h2"].address]
    assert {r["gloo_socket_ifname"] for r in reports} == {"eth0"}


def test_submitit_runs_a_function_on_both_hosts_with_torch_distributed_environment(slurm_two_nodes, tmp_path,
                                                                                     monkeypatch):
    import submitit

    # The pickled function refers to gloo_check by name: the tasks import it from this folder.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(GLOO_CHECK.parent), os.environ.get("PYTHONPATH", "")]))
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5)
    job = executor.submit(gloo_check.submitit_all_reduce)
    reports = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["node"] for r in reports] == ["h1", "h2"]
    assert [r["sum"] for r in reports] == [3.0, 3.0]
    assert {r["master_addr"] for r in reports} == {"h1"}  # the first host NAME of SLURM_JOB_NODELIST
    hosts = slurm_two_nodes.hosts
    assert [r["local_address"] for r in reports] == [hosts["h1"].address, hosts["h2"].address]
