"""`vilscale plan`: the plan of a run agrees with what the run did, the arithmetic of the 21K job is the
hand-computed one, throughput files are read (and scaled by FLOPs when the model differs), and mistakes
are one line, exit code 2."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
from pathlib import Path

import pytest

from vilscale.cli import main
from vilscale.orchestration.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]
GPU_RESULT = REPO / "benchmarks" / "results" / "gpu_check-h200-06abbf4.json"


def plan(job: str, *args: str, check: bool = True):
    """`vilscale plan` in this process (what the command line runs, without a torch import per call)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", str(REPO / "jobs" / job), *args])
    result = subprocess.CompletedProcess(["vilscale", "plan", job, *args], code, out.getvalue(), err.getvalue())
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def plan_json(job: str, *args: str) -> dict:
    return json.loads(plan(job, *args, "--json").stdout)


def test_the_plan_of_the_smoke_job_is_what_its_run_did(smoke, baseline_run):
    """The baseline run (8 steps on 2 ranks, random shifts switching at half the run, sample records) against
    its plan: steps, samples per rank and step, evaluations, checkpoints, the learning rate of every logged
    step and the switch step are the run's."""
    got = plan_json("smoke.yaml", *smoke.args(baseline_run, *smoke.BASELINE))
    spec, result = got["spec"], got["plan"]
    assert spec["train"]["micro_batch"] == 16 and spec["optim"]["betas"] == [0.9, 0.999]  # defaults resolved
    summary = json.loads((baseline_run / "summary.json").read_text())
    assert result["total_steps"] == summary["step"] == 8
    assert (result["world_size"], result["grad_accum"], result["global_batch"]) == (2, 1, 32)
    manifest = json.loads((smoke.digits / "train" / "manifest.json").read_text())
    assert result["train_samples"] == manifest["num_samples"] and result["shards"] == len(manifest["shards"])
    assert result["steps_per_epoch"] == manifest["num_samples"] // 2 // 16
    # every rank read micro_batch samples per step, from its own part of the shards
    for rank in (0, 1):
        records = [json.loads(line) for line in (baseline_run / "samples" / f"rank{rank}.jsonl").read_text()
                   .splitlines()]
        assert [r["step"] for r in records] == list(range(1, 9))
        assert all(len(r["indices"]) == result["micro_batch"] for r in records)
        low, high = result["samples_per_rank"]
        assert low <= manifest["num_samples"] // 2 <= high
    metrics = [json.loads(line) for line in (baseline_run / "metrics.jsonl").read_text().splitlines()]
    assert result["evaluations"] == sum("val_top1" in r for r in metrics) == 1
    assert result["checkpoints"] == len(Checkpointer(baseline_run, keep=9, spec_digest="").complete_tags()) == 2
    assert result["full_attention_step"] == 4  # the trainer logs "step 4: ViL attention switches" (test_trainer)
    # the learning rate the run logged for each step follows the planned peak, warmup and length: step s (1-based)
    # trains at the cosine's position (s - 1) / total (no warmup in the smoke job)
    peak, total, warmup, low = result["peak_lr"], result["total_steps"], result["warmup_steps"], 1e-6
    assert (peak, warmup) == (2e-3, 0)
    logged = [(r["step"], r["lr"]) for r in metrics if "lr" in r]
    assert [step for step, _ in logged] == [2, 4, 6, 8]
    for step, lr in logged:
        assert lr == pytest.approx(low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (step - 1) / total)), rel=1e-9)
    assert result["preflight"] == "passed"


def test_the_21k_job_plan_is_the_hand_computed_arithmetic():
    """jobs/pretrain_21k.yaml on 16 nodes x 8 GPUs with ImageNet-21K-P's 11,797,632 training and 561,052 validation
    images at 1000 img/s per GPU: 4096 = 32 x 1 x 128, lr 1e-3 x 4096/1024 = 4e-3, floor(11797632 / 128 / 32) = 2880
    steps per epoch, 90 epochs = 259,200 steps, warmup 5 x 2880 = 14,400, switch at 0.75 x 259200 = 194,400, a
    checkpoint every 10,000 steps = 26, an evaluation every 2 epochs = 5760 steps = 45; 1,061,683,200 samples
    / 128,000 img/s = 8,294.4 s, evaluation 45 x 561052 / 3 / 128,000 = 65.75 s: 0.79% of the training time (the
    job's header promises under 1%)."""
    result = plan_json("pretrain_21k.yaml", "--train-samples", "11797632", "--val-samples", "561052",
                       "--img-per-s", "1000", "--gpu", "H100")["plan"]
    assert (result["world_size"], result["nodes"], result["ranks_per_node"]) == (128, 16, 8)
    assert (result["micro_batch"], result["grad_accum"], result["global_batch"]) == (32, 1, 4096)
    assert result["peak_lr"] == pytest.approx(4e-3, rel=1e-12)
    assert (result["steps_per_epoch"], result["total_steps"], result["warmup_steps"]) == (2880, 259200, 14400)
    assert result["full_attention_step"] == 194400 and result["samples_trained"] == 1061683200
    assert result["checkpoints"] == 26 and result["evaluations"] == 45
    assert result["train_hours"] == pytest.approx(8294.4 / 3600, rel=1e-12)
    assert result["eval_hours"] == pytest.approx(45 * 561052 / 3 / 128000 / 3600, rel=1e-12)
    assert result["eval_hours"] / result["train_hours"] == pytest.approx(0.00793, abs=1e-5)
    assert result["device_hours"] == pytest.approx(128 * (8294.4 + 65.75) / 3600, rel=1e-6)
    assert result["step_s"] == pytest.approx(4096 / 128000, rel=1e-12)
    # ViL-Medium-Deep: 55.7 M parameters with a 21,841-class head, 10,620 x (768 + 1) fewer with 11,221 classes;
    # ~9.1 G multiply-adds at 224 (the official README's figure, full attention), i.e. ~54.9 G training FLOPs per
    # image in full attention
    assert result["parameters"] == pytest.approx(55.75e6 - 10620 * 769, rel=1e-3)
    assert result["flops_by_mode"]["full"] / 6 / 1e9 == pytest.approx(9.15, rel=0.01)
    assert result["implied_mfu"] == pytest.approx(1000 * result["train_flops_per_image"] / 989e12, rel=1e-12)


def test_a_benchmark_result_gives_the_throughput_scaled_by_flops_for_another_model():
    measured = json.loads(GPU_RESULT.read_text())["train"]
    triton = next(row for row in measured["results"] if row["backend"] == "triton")
    same = plan_json("train_1k.yaml", "--throughput", str(GPU_RESULT))["plan"]  # vil_small at 224, bf16: as measured
    assert same["img_per_s_per_rank"] == triton["images_per_second"]
    assert "NVIDIA H200" in same["throughput_source"] and "scaled" not in same["throughput_source"]
    assert same["implied_mfu"] == pytest.approx(triton["images_per_second"] * same["train_flops_per_image"] / 989e12)
    other = plan_json("pretrain_21k.yaml", "--train-samples", "14197122", "--throughput", str(GPU_RESULT))["plan"]
    ours = other["flops_by_mode"]["full"] / 6 / 1e9
    assert other["img_per_s_per_rank"] == pytest.approx(triton["images_per_second"] * triton["gflops_per_image_fwd"]
                                                        / ours, rel=1e-6)
    assert "assumes the same MFU" in other["throughput_source"]


def test_measure_times_the_job_here_and_the_text_plan_says_everything(smoke, tmp_path):
    result = plan("smoke.yaml", *smoke.args(tmp_path / "run"), "--measure", "--measure-steps", "2")
    text = result.stdout
    assert text.startswith("# the resolved spec, every default included\nrun_dir: ")
    for words in ("world size:          2 rank(s) = 1 node(s) x 2", "global batch 32", "8 in total",
                  "measured here: 2 steps of micro-batch 16 on CPU", "wall time:", "device-hours:",
                  "pre-flight here:     passed"):
        assert words in text, (words, text)
    assert not (tmp_path / "run").exists(), "plan wrote into the run dir"


@pytest.mark.parametrize("args, words", [
    (("--img-per-s", "0"), "--img-per-s 0.0 must be > 0"),
    (("--nproc", "3"), "train.global_batch=4096 is not divisible by train.micro_batch=32 x world size 3"),
    (("--throughput", str(REPO / "jobs" / "smoke.yaml")), "cannot read it as JSON"),
    (("--set", "optim.lr=-1"), "optim.lr=-1.0 must be > 0"),
])
def test_mistakes_are_one_line_and_exit_code_2(args, words):
    result = plan("pretrain_21k.yaml", *args, check=False)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_throughput_of_another_precision_and_measure_of_a_detector_are_refused(smoke, tmp_path):
    result = plan("smoke.yaml", *smoke.args(tmp_path / "run"), "--throughput", str(GPU_RESULT), check=False)
    assert result.returncode == 2 and "measured in bf16 and the job trains in fp32" in result.stderr, result.stderr
    result = plan("digits_retinanet.yaml", "--measure", check=False)
    assert result.returncode == 2 and "--measure times the classification step only" in result.stderr


def test_without_the_data_the_plan_gives_what_it_can_and_says_what_is_missing():
    """train_1k on one 8-GPU node at 900 img/s per GPU, its manifests absent here: the step time (1024 / 7200 s)
    and the loader's need are known, the number of steps and the wall time are not."""
    text = plan("train_1k.yaml", "--nproc", "8", "--img-per-s", "900").stdout
    for words in ("micro-batch 16 x grad_accum 8 x 8 rank(s) = global batch 1,024",
                  "steps:               unknown per epoch, unknown in total", "step time:           0.142 s",
                  "wall time:           unknown until the number of steps is (give --train-samples N)",
                  "7,200 decoded images/s per node", "pre-flight here:     would refuse: data.train_manifest="):
        assert words in text, (words, text)
    assert "averaged over the attention switch" not in text and "in full attention" in text
