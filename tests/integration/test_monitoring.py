"""Prometheus (with jobs/monitoring/prometheus.yml) scrapes every rank of a run started with
`vilscale submit --backend local`, and every query of the Grafana dashboard evaluates on what it scraped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse

import pytest
import real_services as services
from real_services import SMOKE, smoke_overrides

pytestmark = pytest.mark.integration

DASHBOARD = services.REPO / "jobs" / "monitoring" / "grafana_dashboard.json"


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, with the dashboard variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expression = target["expr"].replace("$run_id", ".*").replace("$__rate_interval", "30s")
            queries.append((panel["title"], expression))
    return queries


def test_dashboard_covers_what_the_issue_asks_for():
    titles = " ".join(title.lower() for title, _ in dashboard_queries())
    for topic in ("throughput", "p50", "p95", "data wait", "loss", "learning rate", "gradient norm", "mfu",
                  "device memory", "since last checkpoint", "straggler"):
        assert topic in titles, topic


@pytest.mark.slow
def test_prometheus_scrapes_every_rank_during_a_local_submitit_run(prometheus, digits, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # What the README tells users to do: link the run's target file into the config's targets/ folder.
    (prometheus.targets_dir / "run.json").symlink_to(run_dir / "prometheus_targets.json")
    submit = subprocess.Popen(
        [sys.executable, "-m", "vilscale.cli", "submit", str(SMOKE), "--backend", "local", "--wait",
         *smoke_overrides(digits, run_dir, max_steps=120, ckpt_every=40)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=services.REPO, env=dict(os.environ))
    seen_ranks: set[str] = set()
    last_seen = None  # the last time Prometheus had fresh samples > 0 from both ranks
    try:
        deadline = time.monotonic() + 400
        while submit.poll() is None and time.monotonic() < deadline:
            try:
                series = prometheus.query('vilscale_train_samples_total{job="vilscale"} > 0')
            except OSError:
                series = []
            ranks = {s["metric"]["rank"] for s in series}
            seen_ranks |= ranks
            if ranks == {"0", "1"}:
                last_seen = float(series[0]["value"][0])
            time.sleep(0.5)
        output, _ = submit.communicate(timeout=60)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, output
    assert seen_ranks == {"0", "1"}, f"ranks scraped with samples > 0: {seen_ranks}\n{output}"
    assert last_seen is not None, "Prometheus never had samples > 0 from both ranks at once"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000120"

    # Every dashboard query is valid PromQL over metrics the trainer really exports, and has data.
    names = set(services.http_json(f"{prometheus.url}/api/v1/label/__name__/values")["data"])
    for title, expression in dashboard_queries():
        for name in re.findall(r"\bvilscale_[a-z0-9_]+", expression):
            assert name in names, f"panel {title!r} uses {name}, which no rank exports"
        result = services.http_json(f"{prometheus.url}/api/v1/query?"
                                    + urllib.parse.urlencode({"query": expression, "time": last_seen}))
        assert result["status"] == "success", (title, result)
        assert result["data"]["result"], f"panel {title!r} has no data during the run: {expression}"
