"""Fixtures that start real services on loopback (a Ray head, a one-node SLURM cluster, Prometheus)
and the digits shards the smoke job trains on. A service whose binary is absent skips its tests with
the reason; a service that is present but fails to start fails them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import real_services as services


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The handwritten-digits shards jobs/smoke.yaml trains on (written once per session)."""
    out = tmp_path_factory.mktemp("digits")
    result = services.vilscale("prepare", "digits", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def ray_head():
    try:
        head = services.start_ray_head(num_cpus=2, env={"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    except FileNotFoundError as missing:
        pytest.skip(f"Ray's `ray` command is not installed ({missing})")
    yield head
    head.stop()


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("a one-node SLURM cluster needs root (slurmd runs jobs as their user)")
    try:
        cluster = services.start_slurm()
    except FileNotFoundError as missing:
        pytest.skip(f"SLURM/munge binary {missing} is not installed (apt-get install slurm-wlm munge)")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # submitit calls sbatch/squeue/scontrol from this process
    yield cluster
    cluster.stop()
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="module")
def prometheus():
    try:
        server = services.start_prometheus(scrape_interval="1s")
    except FileNotFoundError as missing:
        pytest.skip(f"{missing} is not installed (apt-get install prometheus)")
    yield server
    server.stop()
