"""Which GPU a rank drives: its local rank among the node's GPUs, or the one GPU its launcher bound to it
(SLURM's --gpus-per-task=1 / --gpu-bind, Ray), and a refusal only when ranks would really share one."""

from __future__ import annotations

import pytest

from vilscale.orchestration.training.distributed import RendezvousError, device_index, shared_gpus


def test_one_visible_gpu_per_task_is_accepted_whatever_the_local_rank():
    assert device_index(1, 3, 4) == 0  # SLURM bound one GPU to each of 4 tasks; this is task 3
    assert device_index(8, 3, 8) == 3  # one task per GPU, all GPUs visible
    assert device_index(1, 0, 1) == 0


def test_too_few_gpus_for_the_node_s_ranks_are_refused_with_the_fix():
    with pytest.raises(RendezvousError, match="2 GPU\\(s\\) are visible.*one rank per GPU"):
        device_index(2, 3, 4)
    with pytest.raises(RendezvousError):
        device_index(0, 0, 1)


def test_ranks_of_one_host_on_the_same_gpu_are_found():
    records = [("node-a", "GPU-1"), ("node-a", "GPU-1"), ("node-a", "GPU-2"), ("node-b", "GPU-1")]
    assert shared_gpus(records) == [("node-a", [0, 1])]
    assert shared_gpus([("node-a", "GPU-1"), ("node-a", "GPU-2"), ("node-b", "GPU-1")]) == []
