"""A gloo all_reduce across hosts, reported per rank: what the multinode tests run to prove that ranks on
different hosts rendezvous and exchange data over the test network.

As a SLURM task: `python gloo_check.py PORT` (one line of JSON per rank). The rendezvous is rank 0's host,
the first name of SLURM_JOB_NODELIST, as any SLURM launcher derives MASTER_ADDR.
From submitit or Ray Train: call `all_reduce_report()` once the process group exists.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta


def local_address_towards(address: str) -> str:
    """The address this process's host uses to reach ``address`` (its own end of the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))  # UDP: nothing is sent
        return probe.getsockname()[0]


def all_reduce_report(master_addr: str) -> dict:
    """Every rank contributes rank + 1; the sum is world_size * (world_size + 1) / 2 on every rank."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "sum": value.item(),
            "node": os.environ.get("SLURMD_NODENAME"), "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "master_addr": master_addr, "master_ip": socket.gethostbyname(master_addr),
            "local_address": local_address_towards(socket.gethostbyname(master_addr))}


def submitit_all_reduce() -> dict:
    """A submitit job's function: rendezvous as submitit's TorchDistributedEnvironment says (MASTER_ADDR is
    the first host name of the job), then `all_reduce_report`."""
    import submitit
    import torch.distributed as dist

    environment = submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # env://, from what export() set
    try:
        return all_reduce_report(environment.master_addr)
    finally:
        dist.destroy_process_group()


def main(port: int) -> None:
    import torch.distributed as dist

    rank, world_size = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    hostnames = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
    master = hostnames[0]
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        print(json.dumps(all_reduce_report(master)), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]))
