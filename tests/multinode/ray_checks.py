"""Ray drivers the multinode tests run against the two-node Ray cluster (RAY_ADDRESS names it):

    python ray_checks.py placement
        one JSON line: the alive nodes' addresses and, for a STRICT_SPREAD placement group of two 1-CPU
        bundles, the node address each bundle's task ran on.
    python ray_checks.py train OUT_DIR STEPS STEP_SECONDS MAX_FAILURES
        a Ray Train TorchTrainer with 2 workers spread over the nodes; every step each worker all_reduces
        (gloo) and appends {time, step, rank, address, sum, pid} to OUT_DIR/rank<R>.jsonl, so a test can
        see what ran where and when (the filesystem is shared by all nodes). Exits 0 when the run ends.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def placement() -> dict:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(logging_level="ERROR")

    @ray.remote(num_cpus=1)
    def where() -> str:
        return ray.util.get_node_ip_address()

    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    ray.get(group.ready(), timeout=60)
    addresses = ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=index)).remote() for index in range(2)], timeout=60)
    return {"alive": sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]), "bundles": addresses}


def _train_loop(config: dict) -> None:
    import os

    import ray.train
    import torch
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    log = Path(config["out_dir"]) / f"rank{rank}.jsonl"
    for step in range(config["steps"]):
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value)
        record = {"time": time.time(), "step": step, "rank": rank, "world_size": dist.get_world_size(),
                  "address": ray.util.get_node_ip_address(), "sum": value.item(), "pid": os.getpid(),
                  "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME")}
        with open(log, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        time.sleep(config["step_seconds"])


def train(out_dir: Path, steps: int, step_seconds: float, max_failures: int) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(logging_level="ERROR")
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"out_dir": str(out_dir), "steps": steps, "step_seconds": step_seconds},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD",
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="multinode-check", storage_path=str(out_dir / "ray_results"),
                             failure_config=FailureConfig(max_failures=max_failures)))
    started = time.time()
    trainer.fit()
    print(json.dumps({"fit_seconds": time.time() - started}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "placement":
        print(json.dumps(placement()), flush=True)
    elif sys.argv[1] == "train":
        train(Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown check {sys.argv[1]!r}: use placement or train")
