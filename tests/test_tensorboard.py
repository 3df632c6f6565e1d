"""metrics.tensorboard: rank 0 writes the scalars of metrics.jsonl to RUN_DIR/tensorboard, and a run resumed from a
checkpoint continues the same TensorBoard run (the steps it trains again replace the ones first written)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _last_per_step(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` by step, the last record of a step winning (a step trained again after a resume),
    as TensorBoard stores it (a 32-bit float)."""
    by_step = {record["step"]: record[key] for record in records if key in record}
    return [(step, float(np.float32(value))) for step, value in sorted(by_step.items())]


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard reads RUN_DIR/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_shows_what_metrics_jsonl_says_after_a_restart(killed_mid_step_run):
    """Rank 1 is SIGKILLed in the middle of step 6; the run restarts from the step-4 checkpoint and trains steps 5-8
    again. metrics.jsonl holds steps 1-5 and then 5-8; TensorBoard shows one run with steps 1-8, each step's value
    the last one metrics.jsonl recorded for it (the first attempt's step 5 is replaced). (The run is shared with the
    fault test that checks its samples and weights.)"""
    run_dir, result = killed_mid_step_run
    assert "resumed from step_00000004" in result.stderr
    records = _records(run_dir)
    training = [record for record in records if "loss" in record]
    assert [record["step"] for record in training] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    scalars = _scalars(run_dir)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "images_per_second", "data_wait_s", "nonfinite_total"):
        assert scalars[f"train/{key}"] == _last_per_step(training, key), key
    evaluation = [record for record in records if "val_top1" in record]
    assert [record["step"] for record in evaluation] == [8]
    for key in ("val_top1", "val_top5"):
        assert scalars[f"eval/{key}"] == _last_per_step(evaluation, key), key
    assert not any(tag.endswith("/mfu") for tag in scalars), "MFU is NaN on a CPU (unknown peak): left out"
