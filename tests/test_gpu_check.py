"""benchmarks/gpu_check.sh, the script a session with a lent GPU runs, cannot rot: its dry run (CPU, Triton's
interpreter, tiny shapes, deepspeed/ray/ffcv/kornia/submitit made unimportable as on the device image) runs
every step here and writes the report; the report's arithmetic is checked on known inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_report  # noqa: E402


@pytest.mark.extended
@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for package in ("deepspeed", "ray", "ffcv", "kornia", "submitit"):
        assert f"{package} absent" in log  # as on the device image: nothing the check runs may need them
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(step["step"], step["exit"]) for step in report["steps"]] == [
        ("env", 0), ("tests", 0), ("attn", 0), ("step", 0), ("jobs", 0)]
    assert report["kind"].startswith("gpu_check dry run") and report["device"] == "cpu (dry run)"
    # the kernels ran (interpreted) at the benchmark's shape and agreed with chunked
    attention = report["attention_target_case"]
    assert attention["case"] == "vil_small_stage2" and attention["triton_max_rel_err_vs_chunked"] < 1e-5
    rows = {(row["pos_embed"], row["mode"], row["backend"]): row for row in report["train"]["results"]}
    assert set(rows) == {(pos, mode, backend) for pos in ("rpe", "ape") for mode in ("eager", "compiled")
                         for backend in ("triton", "chunked")}, rows
    assert all("error" not in row for row in rows.values()), rows
    breakdown = rows[("rpe", "compiled", "chunked")]["breakdown"]  # the profiler's split of 3 steps
    assert set(breakdown) == {"step_s", "attention_s", "linear_s", "elementwise_s", "optimizer_s", "idle_s"}
    assert report["train"]["config"]["engine"] == "torch"  # deepspeed absent: the plain-torch step
    jobs = {row["job"]: row for row in report["jobs"]["rows"]}  # each task's path ran without DeepSpeed & co.
    assert set(jobs) == {"smoke", "digits_retinanet", "digits_mask_rcnn", "digits_semfpn"}
    assert all(row["ok"] for row in jobs.values()), jobs
    assert jobs["digits_mask_rcnn"]["eval"]["detections"] > 0  # NMS had candidates (score threshold 0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["attention.json", "gpu_check.json",
                                                                "gpu_check.log", "jobs.json", "train.json"]


def test_an_unknown_argument_is_refused_before_anything_runs(tmp_path):
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dryrun"], capture_output=True,
                            text=True, env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    assert result.returncode == 2 and "unknown argument '--dryrun'" in result.stderr
    assert not any(tmp_path.iterdir())


def test_report_ratios_and_test_failures_from_known_inputs(tmp_path):
    case = "vil_small_stage1"
    rows = [
        {"name": case, "backend": "triton", "dtype": "bf16", "bias": True, "table_grad": True, "fwd_ms": 2.0,
         "fwdbwd_ms": 8.0, "peak_mem_bytes": 100, "fwd_traffic_bound_ms": 0.5, "max_rel_err_vs_chunked": 1e-3},
        {"name": case, "backend": "triton", "dtype": "bf16", "bias": True, "table_grad": False, "fwd_ms": 2.0,
         "fwdbwd_ms": 6.0, "peak_mem_bytes": 90},
        {"name": case, "backend": "chunked", "dtype": "bf16", "bias": True, "table_grad": True, "fwd_ms": 8.0,
         "fwdbwd_ms": 40.0, "peak_mem_bytes": 400},
        {"name": case, "backend": "flex", "dtype": "bf16", "bias": True, "table_grad": True, "fwd_ms": 4.0,
         "fwdbwd_ms": 800.0, "peak_mem_bytes": 100},
        {"name": case, "backend": "flex", "dtype": "bf16", "bias": True, "table_grad": False, "fwd_ms": 4.0,
         "fwdbwd_ms": 12.0, "peak_mem_bytes": 100},
        {"name": case, "backend": "natten", "dtype": "bf16", "bias": False, "table_grad": True,
         "error": "RuntimeError: boom"},
    ]
    (tmp_path / "attention.json").write_text(json.dumps({"cases": rows}))
    (tmp_path / "train.json").write_text(json.dumps({"measured_peak_flops": 8e14, "results": [
        {"backend": "triton", "images_per_second": 300.0, "mfu": 0.45, "mfu_measured": 0.5},
        {"backend": "chunked", "images_per_second": 100.0, "mfu": 0.15, "mfu_measured": 0.2}]}))
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure message="b broke&#10;more"/>'
        '</testcase><testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    steps = tmp_path / "steps.tsv"
    steps.write_text("attn\t124\t150\t150\n")
    assert gpu_report.main(["--out", str(tmp_path), "--steps", str(steps)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    figures = report["attention_target_case"]
    assert figures["fwdbwd_vs_flex"] == 100.0 and figures["fwdbwd_vs_chunked"] == 5.0
    assert figures["fwd_vs_traffic_bound"] == 4.0 and figures["fwdbwd_vs_flex_tables_frozen"] == 2.0
    assert figures["peak_mem_vs_chunked"] == 0.25
    assert report["training_step"]["triton_vs_chunked_images_per_second"] == 3.0
    assert report["targets_met"] == {"fwdbwd_vs_flex >= 2": True, "fwdbwd_vs_chunked >= 4": True,
                                     "fwd_vs_traffic_bound <= 2.5": False, "train_mfu >= 0.40": True}
    tests = report["gpu_tests"]
    assert (tests["passed"], tests["failures"], tests["skipped"]) == (1, 1, 1)
    assert tests["failed"] == [{"test": "t::b", "kind": "failure", "message": "b broke"}]
    assert report["steps"] == [{"step": "attn", "exit": 124, "seconds": 150, "limit": 150, "timed_out": True}]
    assert report["gpu_tests_slow"] is None  # not run: recorded as missing, not invented
