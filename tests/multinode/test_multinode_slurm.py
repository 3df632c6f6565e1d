"""The two-node SLURM cluster on namespace hosts: tasks land on both hosts and talk over the test
network (srun, and submitit as vilscale uses it), and a lost node's job is requeued and runs again once
the node returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def _job_field(slurm, job_id: str, name: str) -> str | None:
    for item in slurm.command("scontrol", "show", "job", job_id, check=False).split():
        if item.startswith(f"{name}="):
            return item.split("=", 1)[1]
    return None


def test_a_lost_node_requeues_its_job_which_runs_again_once_the_node_is_back(slurm_two_nodes, tmp_path):
    """h2 dies with its slurmd and task mid-job. SLURM cannot tell until slurmctld's pings find h2 silent
    for SlurmdTimeout; it then marks h2 DOWN and requeues the job (--requeue), which waits for two nodes and
    runs again when h2's slurmd is back."""
    progress = tmp_path / "progress"
    progress.mkdir()
    # Each task logs "<restart count> <node> <i>" twice a second: 60 s the first time, 2 lines after a requeue.
    task = tmp_path / "task.sh"
    task.write_text(f"""#!/bin/sh
n=120; [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] && n=2
for i in $(seq $n); do
  echo "${{SLURM_RESTART_COUNT:-0}} $SLURMD_NODENAME $i" >> {progress}/$SLURMD_NODENAME; sleep 0.5
done
""")
    task.chmod(0o755)
    batch = tmp_path / "batch.sh"
    batch.write_text(f"#!/bin/sh\nsrun -N2 --ntasks-per-node=1 {task}\n")
    job_id = slurm_two_nodes.command("sbatch", "--parsable", "--requeue", "-N2", "--ntasks-per-node=1",
                                     "--open-mode=append", f"--output={tmp_path / 'job.out'}", str(batch)).strip()

    def lines(node: str) -> list[list[str]]:
        path = progress / node
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    services.wait_until(lambda: len(lines("h1")) >= 2 and len(lines("h2")) >= 2, timeout_s=60,
                        what="the job's tasks running on h1 and h2", logs=slurm_two_nodes.cluster.logs())
    lost_at = time.monotonic()
    slurm_two_nodes.lose_node("h2")
    services.wait_until(lambda: _job_field(slurm_two_nodes, job_id, "Restarts") == "1", timeout_s=120,
                        what="job requeued after the node loss", logs=slurm_two_nodes.cluster.logs())
    requeued_after_s = time.monotonic() - lost_at
    assert slurm_two_nodes.cluster.node_states()["h2"].startswith("down")
    assert _job_field(slurm_two_nodes, job_id, "JobState") == "PENDING"  # it needs two nodes; one is left
    assert not [line for line in lines("h1") + lines("h2") if line[0] != "0"]
    slurm_two_nodes.restore_node("h2")
    services.wait_until(lambda: _job_field(slurm_two_nodes, job_id, "JobState") == "COMPLETED", timeout_s=120,
                        what="requeued job COMPLETED", logs=slurm_two_nodes.cluster.logs())
    for node in ("h1", "h2"):
        assert [line for line in lines(node) if line[0] == "1"] == [["1", node, "1"], ["1", node, "2"]]
    print(f"job requeued {requeued_after_s:.1f} s after h2 was lost")
