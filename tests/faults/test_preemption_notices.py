"""A launcher's preemption notice (SLURM's USR2 before the time limit) is honoured wherever the run is when it
comes: during an evaluation the run saves at that step and stops at once (not after one more step, which
with step + save + evaluation longer than the notice would end in TIMEOUT); during start-up of a resumed run
it stops without a step and without a save (the checkpoint it resumed from is the latest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vilscale.orchestration.config import load_spec

pytestmark = [pytest.mark.faults, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]

RUN = """
import json, sys, threading
from vilscale.orchestration.config import spec_from_dict
from vilscale.orchestration.training import evaluation, loop
import yaml

spec = spec_from_dict(yaml.safe_load(open(sys.argv[1])))
notice = threading.Event()
if sys.argv[2] == "during-evaluation":
    evaluate = evaluation.Evaluator.evaluate

    def evaluate_then_notice(self, state):
        result = evaluate(self, state)
        notice.set()  # the notice arrives while the evaluation runs
        return result

    evaluation.Evaluator.evaluate = evaluate_then_notice
else:
    notice.set()  # already there when the rank starts
print(json.dumps(loop.run_worker(spec, stop_requested=notice.is_set)))
"""


def _run(spec_file: Path, when: str) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", RUN, str(spec_file), when], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def test_a_notice_during_evaluation_or_start_up_stops_the_run_where_it_is(smoke, tmp_path):
    run_dir = tmp_path / "run"
    val = smoke.digits / "val" / "manifest.json"
    # The 360 validation digits as training data: 22 steps of 16 per epoch, an evaluation after each epoch.
    spec = load_spec(str(REPO / "jobs" / "smoke.yaml"),
                     [f"run_dir={run_dir}", f"data.train_manifest={val}", f"data.val_manifest={val}",
                      "train.max_steps=0", "train.epochs=3", "train.ckpt_every=100"])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.to_dict()))

    summary, log = _run(spec_file, "during-evaluation")
    assert summary["preempted"] and summary["step"] == 22, summary
    assert "preemption notice (after the evaluation of epoch 1): stopped at step 22, which is saved" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000022"

    summary, log = _run(spec_file, "at-start-up")
    assert summary["preempted"] and summary["step"] == 22, summary
    assert "resumed from step_00000022" in log and "checkpoint at step" not in log
    assert "preemption notice (during start-up): stopped at step 22" in log
