"""train.collective_timeout_s bounds every collective a rank can wait in, not only those of the default group:
DeepSpeed reduces gradients and gathers ZeRO partitions in a group of its own (deepspeed.utils.groups clones the
world group with `torch.distributed.new_group(ranks)`, through deepspeed.comm's TorchBackend.new_group), which
torch creates with its default timeout (30 minutes on gloo, 10 on nccl) unless told otherwise. A host lost while
its peer waits in such a collective must end the wait after collective_timeout_s. The ranks below make that call
themselves: deepspeed.comm's own start-up builds a shared-memory op on CPU, tens of seconds here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real processes waiting out real timeouts

# One rank of a two-rank group: rank 1 stays silent (alive, never joins the collective); rank 0 all-reduces in
# a group made as DeepSpeed makes its data-parallel group, and reports how long it waited and what it raised.
RANK = """
import json, sys, time
import torch, torch.distributed as dist
from vilscale.orchestration.training.distributed import init_distributed
init_distributed("cpu", collective_timeout_s=float(sys.argv[1]))
group = dist.new_group(ranks=range(dist.get_world_size()))  # as deepspeed.utils.groups._clone_world_group
if dist.get_rank() == 1:
    time.sleep(float(sys.argv[2]))
else:
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=group)
        outcome = "returned"
    except Exception as error:
        outcome = type(error).__name__ + ": " + str(error).splitlines()[0][:200]
    print(json.dumps({"waited_s": time.monotonic() - start, "outcome": outcome}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_peer_silent_in_deepspeeds_own_group_times_out_after_collective_timeout_s():
    timeout_s, silent_s = 3, 45
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(timeout_s), str(silent_s)], cwd=REPO,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        # rank 0 must give up long before its silent peer comes back (torch's default would be 30 minutes)
        out, err = ranks[0].communicate(timeout=silent_s - 5)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["outcome"] != "returned", report
    assert "Timed out" in report["outcome"] or "timeout" in report["outcome"].lower(), (report, err[-2000:])
    assert timeout_s - 0.5 <= report["waited_s"] <= timeout_s + 2, report  # the timeout, not 30 minutes or 13 s


# A group made before vilscale's start-up with another timeout (as Ray Train makes it: 1800 s unless told), then a
# group made after it: both must wait at most collective_timeout_s.
MADE_BEFORE = """
import json
from datetime import timedelta
import torch, torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=1800))
from vilscale.orchestration.training.distributed import init_distributed
init_distributed("cpu", collective_timeout_s=5)
later = dist.new_group(ranks=[0])
timeouts = [group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for group in (dist.distributed_c10d._get_default_group(), later)]
print(json.dumps(timeouts))
"""


def test_a_group_someone_else_made_and_the_groups_made_later_wait_collective_timeout_s():
    result = subprocess.run([sys.executable, "-c", MADE_BEFORE], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [5.0, 5.0]
