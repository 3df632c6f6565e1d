"""Two-node SLURM and Ray clusters whose nodes are network-namespace test hosts (namespace_hosts.py).
The services themselves are started by tests/integration/real_services.py, the one home of how a
slurmd, a slurmctld or a Ray node is started and stopped; this module places them on hosts and adds
node loss (a host dies with its processes) and node return."""

from __future__ import annotations

import time
from dataclasses import dataclass

import real_services as services
from namespace_hosts import TestHost, TestNetwork
from real_services import RayHead, RayWorkerNode, SlurmCluster, SlurmNode

# ---------------------------------------------------------------------------------------------- SLURM


@dataclass
class SlurmOnHosts:
    """slurmctld in the root namespace (on the bridge address), one slurmd per host (NodeName = host name).

    Submit from the root namespace with ``env`` (SLURM_CONF): sbatch/squeue/scontrol reach slurmctld at the
    bridge address, and the job's tasks run on the hosts, where every task gets GLOO_SOCKET_IFNAME=eth0
    from the cluster's TaskProlog and the host names resolve (MASTER_ADDR=h1 works).
    """

    cluster: SlurmCluster
    hosts: dict[str, TestHost]

    @property
    def env(self) -> dict[str, str]:
        return self.cluster.env

    @property
    def node_names(self) -> list[str]:
        return list(self.hosts)

    def command(self, *args: str, check: bool = True, timeout_s: float = 30) -> str:
        return self.cluster.command(*args, check=check, timeout_s=timeout_s)

    def lose_node(self, name: str) -> list[int]:
        """The node dies with everything on it: its slurmd, slurmstepds and tasks get SIGKILL. slurmctld
        marks it DOWN once it has been silent for SlurmdTimeout. Returns the PIDs killed."""
        return self.hosts[name].crash()

    def restore_node(self, name: str, wait: bool = True) -> None:
        """Start the node's slurmd again (its host and address are unchanged); with ``wait``, until the node
        is back in service (ReturnToService=2 returns a DOWN node once its slurmd registers)."""
        self.cluster.start_slurmd(name)
        if wait:
            self.cluster.wait_idle((name,), timeout_s=60)

    def ensure_healthy(self) -> None:
        """Cancel what earlier tests left and bring back nodes they lost, so each test starts from two idle
        nodes."""
        self.command("scancel", "--user", "root", check=False)
        for name, host in self.hosts.items():
            if not any(services._command_name(pid) == "slurmd" for pid in host.pids()):
                self.restore_node(name, wait=False)
        self.cluster.wait_idle(timeout_s=90)


def start_slurm_on_hosts(network: TestNetwork, hosts: list[TestHost], *, slurmd_timeout_s: int = 10) -> SlurmOnHosts:
    nodes = tuple(SlurmNode(host.name, host.address, host.launch_prefix) for host in hosts)
    cluster = services.start_slurm(nodes, controller_address=network.bridge_address,
                                   task_env={"GLOO_SOCKET_IFNAME": "eth0"}, slurmd_timeout_s=slurmd_timeout_s)
    return SlurmOnHosts(cluster=cluster, hosts={host.name: host for host in hosts})


# ------------------------------------------------------------------------------------------------ Ray


@dataclass
class RayOnHosts:
    """A Ray head in the root namespace on the bridge address and one worker node per host.

    Connect from the root namespace: the Job Submission and state APIs at ``head.dashboard_url``
    (http://127.0.0.1:PORT), a driver with ``ray.init(address=head.gcs_address)`` (BRIDGE:PORT). Every
    Ray process gets GLOO_SOCKET_IFNAME for its own side (the bridge on the head, eth0 on the hosts).
    """

    network: TestNetwork
    head: RayHead
    hosts: dict[str, TestHost]
    workers: dict[str, RayWorkerNode]
    worker_cpus: int
    env: dict[str, str]

    @property
    def dashboard_url(self) -> str:
        return self.head.dashboard_url

    @property
    def gcs_address(self) -> str:
        return self.head.gcs_address

    @property
    def addresses(self) -> list[str]:
        """Every node's address, the head's first."""
        return [self.head.node_ip_address, *(host.address for host in self.hosts.values())]

    def lose_node(self, name: str, how: str = "raylet") -> float:
        """Node loss on host ``name``: ``raylet`` SIGKILLs its raylet (Ray's notion of the node; the node's
        workers and `ray start` end with it), ``crash`` SIGKILLs every process on the host at once. Returns
        the time.time() of the kill."""
        worker = self.workers[name]
        killed_at = time.time()
        if how == "raylet":
            worker.kill_raylet()
            worker.wait_stopped()
        elif how == "crash":
            self.hosts[name].crash()
        else:
            raise ValueError(f"how={how!r}: use 'raylet' or 'crash'")
        worker.process.wait(timeout=30)
        return killed_at

    def restore_node(self, name: str) -> RayWorkerNode:
        """Start a new worker node on host ``name`` (a new node ID at the same address) and wait until the
        head lists it alive."""
        self.workers[name].stop()
        self.workers[name] = services.start_ray_worker(
            self.head, self.hosts[name].address, num_cpus=self.worker_cpus,
            env=self.env | {"GLOO_SOCKET_IFNAME": "eth0"}, launch_prefix=self.hosts[name].launch_prefix)
        return self.workers[name]

    def ensure_healthy(self) -> None:
        for name, worker in self.workers.items():
            if worker.process.poll() is not None or self.head.nodes().get(worker.node_ip_address) != "ALIVE":
                self.restore_node(name)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.head.stop()


def start_ray_on_hosts(network: TestNetwork, hosts: list[TestHost], *, head_cpus: int = 1, worker_cpus: int = 1,
                       env: dict[str, str] | None = None) -> RayOnHosts:
    env = dict(env or {})
    head = services.start_ray_head(num_cpus=head_cpus, env=env | {"GLOO_SOCKET_IFNAME": network.bridge},
                                   node_ip_address=network.bridge_address)
    cluster = RayOnHosts(network=network, head=head, hosts={host.name: host for host in hosts}, workers={},
                         worker_cpus=worker_cpus, env=env)
    try:
        for host in hosts:
            cluster.workers[host.name] = services.start_ray_worker(
                head, host.address, num_cpus=worker_cpus, env=env | {"GLOO_SOCKET_IFNAME": "eth0"},
                launch_prefix=host.launch_prefix)
    except BaseException:
        cluster.stop()
        raise
    return cluster
