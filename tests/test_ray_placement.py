"""Where a Ray run's workers go (vilscale/orchestration/launch/ray.py), without a cluster: which nodes a fit
chooses from the nodes' resources, how long it waits when too few have room, the per-worker label selectors
that pin consecutive ranks to one node, and the up-front refusal of a job that fits the cluster's totals but
not its nodes. On real Ray nodes: tests/multinode (packing, node loss) and tests/integration."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from vilscale.orchestration.config import load_spec
from vilscale.orchestration.launch.common import LaunchError
from vilscale.orchestration.launch.ray import (
    NODE_ID_LABEL,
    NotEnoughNodes,
    RayNode,
    check_fits,
    choose_nodes,
    node_resources,
    wait_for_nodes,
    worker_label_selectors,
)

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"


def node(name: str, address: str, *, free: dict | None = None, **total) -> RayNode:
    total = {key: float(value) for key, value in total.items()}
    return RayNode(node_id=name, address=address, total=total,
                   available={key: float(value) for key, value in (free if free is not None else total).items()})


def launcher(*overrides: str):
    return load_spec(SMOKE, list(overrides)).launcher


def ids(nodes: list[RayNode]) -> list[str]:
    return [n.node_id for n in nodes]


def test_a_one_node_job_takes_one_node_with_room_for_all_its_ranks():
    nodes = [node("a", "10.0.0.1", CPU=1), node("b", "10.0.0.2", CPU=2), node("c", "10.0.0.3", CPU=4)]
    need = node_resources(launcher("launcher.nodes=1", "launcher.cpu_workers_per_node=2"))
    assert need == {"CPU": 2.0}
    assert ids(choose_nodes(nodes, 1, need)) == ["b"]  # the first by address among those with room; never a + b


def test_nodes_are_chosen_by_what_is_free_not_what_they_have():
    nodes = [node("a", "10.0.0.1", CPU=8, GPU=8, free={"CPU": 8, "GPU": 3}), node("b", "10.0.0.2", CPU=8, GPU=8)]
    need = node_resources(launcher("launcher.nodes=1", "launcher.gpus_per_node=4", "launcher.cpus_per_task=2"))
    assert need == {"CPU": 8.0, "GPU": 4.0}
    assert ids(choose_nodes(nodes, 1, need)) == ["b"]


def test_the_previous_fits_nodes_come_first_then_the_drivers_node_when_it_has_room():
    nodes = [node("a", "10.0.0.1", CPU=2), node("b", "10.0.0.2", CPU=2), node("c", "10.0.0.3", CPU=2),
             node("d", "10.0.0.4", CPU=2, free={"CPU": 1})]
    need = {"CPU": 2.0}
    # a refit after the loss of the previous fit's second node ("x"): rank 0 stays on c, the driver's node b next
    assert ids(choose_nodes(nodes, 2, need, prefer=["c", "x", "b"])) == ["c", "b"]
    # the driver's node without room for its ranks is passed over
    assert ids(choose_nodes(nodes, 2, need, prefer=["d"])) == ["a", "b"]


def test_too_few_nodes_with_room_is_refused_saying_what_is_needed_and_what_there_is():
    nodes = [node("a", "10.0.0.1", CPU=2), node("b", "10.0.0.2", CPU=2, free={"CPU": 1})]
    with pytest.raises(NotEnoughNodes) as refused:
        choose_nodes(nodes, 2, {"CPU": 2.0})
    assert str(refused.value) == ("2 node(s) with 2 CPU(s) free each; 1 of the 2 alive node(s) have that: "
                                  "10.0.0.1 (2 CPU(s) free), 10.0.0.2 (1 CPU(s) free)")
    with pytest.raises(NotEnoughNodes):
        choose_nodes([], 1, {"CPU": 1.0})


def test_consecutive_ranks_are_pinned_to_the_same_node():
    chosen = [node("n0", "10.0.0.1", CPU=4), node("n1", "10.0.0.2", CPU=4)]
    assert worker_label_selectors(chosen, 3) == [{NODE_ID_LABEL: "n0"}] * 3 + [{NODE_ID_LABEL: "n1"}] * 3
    assert NODE_ID_LABEL == "ray.io/node-id"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_fit_waits_for_a_lost_node_to_come_back_and_says_what_it_waits_for():
    head, lost, back = node("head", "10.0.0.1", CPU=2), node("r1", "10.0.0.2", CPU=2), node("r1b", "10.0.0.2", CPU=2)
    clock, log = FakeClock(), io.StringIO()
    views = iter([[head], [head], [head, back]])
    chosen = wait_for_nodes(2, {"CPU": 1.0}, prefer=["head", lost.node_id], list_nodes=lambda: next(views),
                            timeout_s=300, poll_s=2, clock=clock, sleep=clock.sleep, log=log)
    assert ids(chosen) == ["head", "r1b"]
    assert clock.now == 4
    assert log.getvalue() == ("[vilscale] waiting up to 300 s more for 2 node(s) with 1 CPU(s) free each; 1 of the 1 "
                              "alive node(s) have that: 10.0.0.1 (2 CPU(s) free)\n")


def test_the_wait_is_bounded():
    clock, log = FakeClock(), io.StringIO()
    with pytest.raises(NotEnoughNodes, match=r"^waited 300 s for 2 node\(s\) with 1 CPU\(s\) free each"):
        wait_for_nodes(2, {"CPU": 1.0}, list_nodes=lambda: [node("head", "10.0.0.1", CPU=2)], timeout_s=300,
                       poll_s=2, clock=clock, sleep=clock.sleep, log=log)
    assert clock.now == 300
    assert len(log.getvalue().splitlines()) == 5  # one line at once, then one a minute


def test_four_one_gpu_nodes_cannot_run_one_node_of_four_gpus():
    nodes = [node(f"n{i}", f"10.0.0.{i}", CPU=8, GPU=1) for i in range(1, 5)]
    spec = load_spec(SMOKE, ["launcher.nodes=1", "launcher.gpus_per_node=4"])
    with pytest.raises(LaunchError) as refused:
        check_fits(spec, nodes, "the Ray cluster at http://head:8265")
    assert str(refused.value).startswith(
        "the job asks for 1 node(s) with 4 GPU(s) and 4 CPU(s) each (4 rank(s) per node x 1 GPU(s) and 1 CPU(s)) "
        "but only 0 of the 4 node(s) of the Ray cluster at http://head:8265 have that much (the largest has "
        "1 GPU(s) and 8 CPU(s)); lower launcher.gpus_per_node")
    check_fits(load_spec(SMOKE, ["launcher.nodes=4", "launcher.gpus_per_node=1"]), nodes, "the cluster")


def test_the_totals_are_still_checked_first_with_their_numbers():
    nodes = [node("n1", "10.0.0.1", CPU=2)]
    with pytest.raises(LaunchError, match=r"asks for 4 GPUs \(1 node\(s\) x 4 launcher.gpus_per_node\) but the "
                                          r"cluster has 0 GPU\(s\) and 2 CPU\(s\) on 1 node\(s\)"):
        check_fits(load_spec(SMOKE, ["launcher.gpus_per_node=4"]), nodes, "the cluster")
