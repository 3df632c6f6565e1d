"""Fixtures for the multinode tests: hosts made on this machine with network namespaces, a two-node SLURM
cluster and a two-node Ray cluster on them, and a Prometheus server that scrapes the hosts.

Everything is session-scoped (each comes up once) and torn down at the end of the session even when tests
fail; the per-test fixtures (`slurm_two_nodes`, `ray_two_nodes`) first bring back any node an earlier test
lost, so every test starts on a whole cluster. Without root or `ip` the tests are skipped with the reason;
a service that is installed but fails to start fails them.

Fixtures (see clusters.py and namespace_hosts.py for the objects):
- `test_network` -> TestNetwork: `bridge` (interface name), `bridge_address` (the root namespace's address
  on the test /24), `hosts`, `add_host(name)` -> TestHost (`name`, `address`, `launch_prefix`, `run`,
  `popen`, `pids`, `crash`, `disconnect`/`reconnect`).
- `slurm_hosts` -> [h1, h2]; `ray_hosts` -> [r1] (separate hosts: losing a SLURM node never touches Ray).
- `slurm_two_nodes` -> SlurmOnHosts: `env` ({"SLURM_CONF": ...}, also set in os.environ for the test),
  `hosts`, `command(...)`, `lose_node(name)`, `restore_node(name)`, `cluster` (real_services.SlurmCluster:
  `node_states()`, `logs()`). Submit from this process as usual:
      vilscale("submit", JOB, "--backend", "slurm", "--set", "launcher.nodes=2", ..., env=slurm_two_nodes.env)
  Tasks run on h1/h2 with GLOO_SOCKET_IFNAME=eth0 (the cluster's TaskProlog) and resolve h1/h2.
- `ray_two_nodes` -> RayOnHosts: `dashboard_url` (http://127.0.0.1:PORT: Job Submission and state APIs),
  `gcs_address` (BRIDGE:PORT, for RAY_ADDRESS / ray.init), `addresses` (head first), `head`, `workers`,
  `lose_node(name, how="raylet"|"crash")`, `restore_node(name)`. Two nodes of 2 (logical) CPUs each, so a
  node can take two 1-CPU ranks and a job can be packed onto one node or spread over both:
      vilscale("submit", JOB, "--backend", "ray", "--address", ray_two_nodes.dashboard_url,
               "--set", "launcher.nodes=2", "--set", "launcher.cpu_workers_per_node=1", ...)
- `prometheus` -> real_services.Prometheus (web on 127.0.0.1; scrapes the hosts' addresses through
  `targets_dir`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

# The services' one home is tests/integration/real_services.py; both directories are import roots.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import clusters  # noqa: E402
import namespace_hosts  # noqa: E402
import real_services as services  # noqa: E402

# Seconds each fixture took to come up, printed at the end of the session (`-rA` or -s shows it).
STARTUP_SECONDS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if STARTUP_SECONDS:
        figures = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in STARTUP_SECONDS.items())
        terminalreporter.write_line(f"multinode fixtures came up in: {figures}")


def _timed(name: str, start):
    began = time.monotonic()
    value = start()
    STARTUP_SECONDS[name] = time.monotonic() - began
    return value


@pytest.fixture(scope="session")
def test_network():
    """The test network: a bridge (`bridge_address`, the root namespace's side) on a private /24, to
    which `add_host(name)` attaches hosts."""
    try:
        network = _timed("test_network", namespace_hosts.make_network)
    except namespace_hosts.HostsUnavailable as reason:
        pytest.skip(str(reason))
    yield network
    network.teardown()


@pytest.fixture(scope="session")
def slurm_hosts(test_network) -> list[namespace_hosts.TestHost]:
    """Two hosts, h1 and h2, for the SLURM cluster's nodes."""
    return _timed("slurm_hosts", lambda: [test_network.add_host("h1"), test_network.add_host("h2")])


@pytest.fixture(scope="session")
def _slurm_session(test_network, slurm_hosts):
    for binary in ("munged", "slurmctld", "slurmd", "sbatch"):
        if services.find_binary(binary) is None:
            pytest.skip(f"SLURM/munge binary {binary} is not installed (apt-get install slurm-wlm munge)")
    cluster = _timed("slurm_two_nodes", lambda: clusters.start_slurm_on_hosts(test_network, slurm_hosts))
    yield cluster
    cluster.cluster.stop()


@pytest.fixture
def slurm_two_nodes(_slurm_session, monkeypatch) -> clusters.SlurmOnHosts:
    """A SLURM cluster with nodes h1 and h2, both idle, and SLURM_CONF set in this process (submitit calls
    sbatch from here) for the test's duration."""
    _slurm_session.ensure_healthy()
    monkeypatch.setenv("SLURM_CONF", _slurm_session.env["SLURM_CONF"])
    return _slurm_session


@pytest.fixture(scope="session")
def ray_hosts(test_network) -> list[namespace_hosts.TestHost]:
    """One host, r1, for the Ray cluster's worker node (the head is in the root namespace)."""
    return _timed("ray_hosts", lambda: [test_network.add_host("r1")])


@pytest.fixture(scope="session")
def _ray_session(test_network, ray_hosts):
    try:
        services._ray_binary()
    except FileNotFoundError as missing:
        pytest.skip(f"Ray's `ray` command is not installed ({missing})")
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    cluster = _timed("ray_two_nodes", lambda: clusters.start_ray_on_hosts(test_network, ray_hosts, env=env,
                                                                         head_cpus=2, worker_cpus=2))
    yield cluster
    cluster.stop()


@pytest.fixture
def ray_two_nodes(_ray_session) -> clusters.RayOnHosts:
    """A Ray cluster of two 2-CPU nodes, the head (bridge address) and r1, both alive."""
    _ray_session.ensure_healthy()
    return _ray_session


@pytest.fixture(scope="session")
def prometheus():
    """Prometheus in the root namespace (web UI on 127.0.0.1), scraping every second."""
    try:
        server = _timed("prometheus", lambda: services.start_prometheus(scrape_interval="1s"))
    except FileNotFoundError as missing:
        pytest.skip(f"{missing} is not installed (apt-get install prometheus)")
    yield server
    server.stop()
