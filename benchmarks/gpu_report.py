"""Merge what benchmarks/gpu_check.sh wrote under OUT into one ``gpu_check.json`` and print the targets.

    python benchmarks/gpu_report.py --out OUT --steps STEPS_TSV [--dry-run]

Reads ``attention.json`` (benchmarks/attention.py), ``train.json`` (benchmarks/train.py), ``jobs.json``
(benchmarks/jobs.py: every shipped job for 2 steps), the junit files of
the gpu tests and the step table (name, exit status, seconds, limit). Writes ``OUT/gpu_check.json`` with the
device, driver, versions, commit, every figure and the ratios the GPU issue sets as targets (ViL-Small stage 1,
bf16, B=64: fused fwd+bwd >= 2x FlexAttention and >= 4x chunked, forward <= 2.5x the HBM lower bound,
training MFU >= 40%). A missing input is recorded as missing, never invented.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import commit  # noqa: E402

TARGET_CASE = "vil_small_stage1"
TARGETS = {"fwdbwd_vs_flex": 2.0, "fwdbwd_vs_chunked": 4.0, "fwd_vs_traffic_bound_max": 2.5, "train_mfu": 0.40}


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_summary(path: Path) -> dict | None:
    """Counts and the failed test ids with the first line of their message."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}
    failed = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines()
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                               "message": message[0][:300] if message else ""})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


def steps_table(path: Path | None) -> list[dict]:
    rows = []
    if path is None or not path.exists():
        return rows
    for line in path.read_text().splitlines():
        name, rc, took, limit = line.split("\t")
        rows.append({"step": name, "exit": int(rc), "seconds": int(took), "limit": int(limit),
                     "timed_out": rc in ("124", "137")})
    return rows


def _row(cases, name, backend, dtype="bf16", bias=True, table_grad=True):
    for row in cases:
        if (row["name"] == name and row["backend"] == backend and row["dtype"] == dtype
                and row.get("bias", True) == bias and row.get("table_grad", True) == table_grad and "error" not in row):
            return row
    return None


def attention_figures(attention: dict | None, case: str) -> dict:
    if not attention:
        return {"missing": "attention.json was not written (see the attn step in gpu_check.log)"}
    cases = attention.get("cases", [])
    dtypes = sorted({row["dtype"] for row in cases if row["name"] == case}) or ["bf16"]
    dtype = "bf16" if "bf16" in dtypes else dtypes[0]
    triton, chunked, flex = (_row(cases, case, name, dtype) for name in ("triton", "chunked", "flex"))
    out = {"case": case, "dtype": dtype}
    if triton:
        out["triton_fwd_ms"], out["triton_fwdbwd_ms"] = triton["fwd_ms"], triton["fwdbwd_ms"]
        out["triton_max_rel_err_vs_chunked"] = triton.get("max_rel_err_vs_chunked")
        if triton.get("fwd_traffic_bound_ms"):
            out["fwd_vs_traffic_bound"] = triton["fwd_ms"] / triton["fwd_traffic_bound_ms"]
        if flex:
            out["fwdbwd_vs_flex"] = flex["fwdbwd_ms"] / triton["fwdbwd_ms"]
            out["fwd_vs_flex"] = flex["fwd_ms"] / triton["fwd_ms"]
        frozen_triton, frozen_flex = (_row(cases, case, name, dtype, table_grad=False) for name in ("triton", "flex"))
        if frozen_triton and frozen_flex:  # bias tables not learnt: FlexAttention without its atomics
            out["fwdbwd_vs_flex_tables_frozen"] = frozen_flex["fwdbwd_ms"] / frozen_triton["fwdbwd_ms"]
        if chunked:
            out["fwdbwd_vs_chunked"] = chunked["fwdbwd_ms"] / triton["fwdbwd_ms"]
            out["fwd_vs_chunked"] = chunked["fwd_ms"] / triton["fwd_ms"]
            if triton.get("peak_mem_bytes") and chunked.get("peak_mem_bytes"):
                out["peak_mem_vs_chunked"] = triton["peak_mem_bytes"] / chunked["peak_mem_bytes"]
    else:
        out["missing"] = f"no triton row for {case} {dtype}"
    return out


def train_figures(train: dict | None) -> dict:
    if not train:
        return {"missing": "train.json was not written (see the step step in gpu_check.log)"}
    results = train.get("results", [])
    rows = {f"{row.get('pos_embed', 'ape')}/{row.get('mode', 'eager')}/{row['backend']}": row for row in results}
    out = {"measured_peak_tflops": (train.get("measured_peak_flops") or 0) / 1e12, "rows": rows}
    # the headline: the RPE step (the paper's best) compiled where it was timed, else eager; triton against chunked
    for mode in ("compiled", "eager"):
        triton, chunked = rows.get(f"rpe/{mode}/triton") or rows.get(f"ape/{mode}/triton"), \
            rows.get(f"rpe/{mode}/chunked") or rows.get(f"ape/{mode}/chunked")
        if triton and "error" not in triton:
            out["headline_row"] = f"{triton.get('pos_embed', 'ape')}/{mode}/triton"
            out["triton_images_per_second"] = triton["images_per_second"]
            out["triton_mfu"] = triton["mfu"]
            out["triton_mfu_measured_peak"] = triton["mfu_measured"]
            if chunked and "error" not in chunked:
                out["triton_vs_chunked_images_per_second"] = triton["images_per_second"] / chunked["images_per_second"]
            break
    return out


def job_figures(jobs: dict | None) -> dict:
    """The shipped jobs' rows (benchmarks/jobs.py), and how many ran."""
    if not jobs:
        return {"missing": "jobs.json was not written (see the jobs step in gpu_check.log)"}
    rows = [{key: row.get(key) for key in ("job", "ok", "error", "model", "precision", "shape", "micro_batch",
                                           "step_s", "peak_mem_gib", "eval", "attention_backend")}
            for row in jobs.get("jobs", [])]
    return {"ran": len(rows), "ok": sum(bool(row["ok"]) for row in rows), "rows": rows}


def verdicts(attn: dict, step: dict) -> dict:
    def met(value, target, at_most=False):
        if value is None:
            return None
        return value <= target if at_most else value >= target

    return {
        "fwdbwd_vs_flex >= 2": met(attn.get("fwdbwd_vs_flex"), TARGETS["fwdbwd_vs_flex"]),
        "fwdbwd_vs_chunked >= 4": met(attn.get("fwdbwd_vs_chunked"), TARGETS["fwdbwd_vs_chunked"]),
        "fwd_vs_traffic_bound <= 2.5": met(attn.get("fwd_vs_traffic_bound"), TARGETS["fwd_vs_traffic_bound_max"],
                                           at_most=True),
        "train_mfu >= 0.40": met(step.get("triton_mfu"), TARGETS["train_mfu"]),
    }


def environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["device"] = "cpu (dry run)"
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder gpu_check.sh wrote into")
    parser.add_argument("--steps", default=None, help="the step table (name, exit, seconds, limit; tab-separated)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    attention = _load(out / "attention.json")
    train = _load(out / "train.json")
    jobs = _load(out / "jobs.json")
    case = TARGET_CASE
    if attention and not any(row["name"] == case for row in attention.get("cases", [])):
        case = attention["cases"][0]["name"] if attention.get("cases") else case
    attn = attention_figures(attention, case)
    step = train_figures(train)
    report = {
        "kind": "gpu_check dry run (CPU, Triton interpreter, tiny shapes: no figure here means anything)"
        if args.dry_run else "gpu_check",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(), **environment(),
        "steps": steps_table(Path(args.steps) if args.steps else None),
        "gpu_tests": junit_summary(out / "gpu_tests.xml"),
        "gpu_tests_slow": junit_summary(out / "gpu_tests_slow.xml"),
        "attention_target_case": attn, "training_step": step,
        "targets_met": verdicts(attn, step),
        "jobs": job_figures(jobs),
        "attention": attention, "train": train,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")

    print(f"device {report['device']}, torch {report['torch']}, triton {report['triton']}, commit {report['commit']}")
    for name in ("gpu_tests", "gpu_tests_slow"):
        summary = report[name]
        if summary is None:
            print(f"{name}: no results")
            continue
        print(f"{name}: {summary['passed']} passed, {summary['failures']} failed, {summary['errors']} errors, "
              f"{summary['skipped']} skipped")
        for failure in summary["failed"][:10]:
            print(f"  {failure['test']}: {failure['message']}")
    for key, value in {**attn, **{k: v for k, v in step.items() if k != "rows"}}.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    for row in report["jobs"].get("rows", []):
        print(f"  job {row['job']}: {'ok' if row['ok'] else 'FAILED ' + row.get('error', '')} "
              f"({row['shape']} x{row['micro_batch']}, {row['precision']}, {row.get('step_s')} s/step)")
    for target, ok in report["targets_met"].items():
        print(f"  target {target}: {'met' if ok else 'not met' if ok is not None else 'not measured'}")
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
