"""Prometheus in the root namespace scrapes metrics endpoints that listen on the namespace hosts'
addresses (file_sd targets, as vilscale's prometheus_targets.json lists them)."""

from __future__ import annotations

import json
import sys

import pytest
import real_services as services

pytestmark = pytest.mark.multinode

ENDPOINT = """
import sys, time
from prometheus_client import Gauge, start_http_server
Gauge("vilscale_multinode_probe", "which host served this", ["host"]).labels(host=sys.argv[2]).set(float(sys.argv[3]))
start_http_server(int(sys.argv[1]), addr=sys.argv[4])
time.sleep(600)
"""


def test_prometheus_scrapes_an_endpoint_on_each_host(prometheus, slurm_hosts):
    port = services.free_port()
    endpoints = [host.popen([sys.executable, "-c", ENDPOINT, str(port), host.name, str(index), host.address])
                 for index, host in enumerate(slurm_hosts, start=1)]
    try:
        targets = [f"{host.address}:{port}" for host in slurm_hosts]
        (prometheus.targets_dir / "hosts.json").write_text(json.dumps([{"targets": targets,
                                                                        "labels": {"job": "vilscale"}}]))
        series = services.wait_until(
            lambda: len(found := prometheus.query("vilscale_multinode_probe")) == len(slurm_hosts) and found,
            timeout_s=60, what="every host's endpoint scraped")
        scraped = {s["metric"]["instance"]: (s["metric"]["host"], float(s["value"][1])) for s in series}
        assert scraped == {f"{host.address}:{port}": (host.name, float(index))
                           for index, host in enumerate(slurm_hosts, start=1)}
    finally:
        (prometheus.targets_dir / "hosts.json").unlink(missing_ok=True)
        for endpoint in endpoints:
            services.stop_process(endpoint)
