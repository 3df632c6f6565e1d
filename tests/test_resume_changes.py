"""What a resumed run does with what changed since its checkpoint: the adjustable keys take effect, the
initial weights are never read again, the attention schedule stays where it was, and a job carrying a
spec other than the run dir's is refused. Real one-rank DeepSpeed runs of the smoke job."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vilscale.orchestration.config import load_spec

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke.yaml"


def _spec(smoke, run_dir: Path, *extra: str):
    """The spec a `smoke.train(run_dir, *extra)` launch runs."""
    return load_spec(str(SMOKE), [a for a in smoke.args(run_dir, *extra) if a != "--set"])


def _optimizer_state(run_dir: Path, tag: str) -> dict:
    path = run_dir / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]


def _train_records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


def test_adjusted_keys_take_effect_and_initial_weights_are_read_only_at_the_start(smoke, tmp_path):
    """A run started from initial weights, without EMA, stopped at step 4; the weights file is then deleted
    (a requeued fine-tune whose pretraining dir is gone) and the run resumed with EMA on, another weight decay,
    learning rate and gradient clipping (--allow-spec-change). Every change must act from step 5 on."""
    from safetensors.torch import save_file

    from vilscale.model import create_model
    from vilscale.orchestration.training.optim import LrSchedule

    torch.manual_seed(1)
    initial = tmp_path / "pretrained.safetensors"
    save_file(create_model("vil_nano", img_size=32, window=2, num_classes=10).state_dict(), str(initial))
    run_dir = tmp_path / "run"
    first = smoke.train(run_dir, "--set", f"model.init_weights={initial}", "--set", "train.exit_after_steps=4",
                        "--set", "train.log_every=1", nproc=1)
    assert "initial weights" in first.stderr
    at_4 = smoke.export(run_dir, tmp_path / "at4.safetensors")
    assert _optimizer_state(run_dir, "step_00000004")["clip_grad"] == 0.0  # optim.clip_grad=0: no clipping
    initial.unlink()

    changes = ("--set", "optim.ema_decay=0.9", "--set", "optim.weight_decay=0.0", "--set", "optim.lr=1.0e-3",
               "--set", "optim.clip_grad=0.25")
    resumed = smoke.train(run_dir, "--allow-spec-change", "--set", f"model.init_weights={initial}",
                          "--set", "train.log_every=1", *changes, nproc=1)
    assert "resumed from step_00000004" in resumed.stderr and "initial weights" not in resumed.stderr

    # optim.weight_decay and optim.clip_grad: what the optimizer held when step 8 was saved
    state = _optimizer_state(run_dir, "step_00000008")
    assert [g["weight_decay"] for g in state["base_optimizer_state"]["param_groups"]] == [0.0, 0.0]
    assert state["clip_grad"] == 0.25
    # optim.lr: the learning rate of steps 5-8 follows the new spec's schedule
    spec = _spec(smoke, run_dir, *changes)
    schedule = LrSchedule.for_run(spec, world_size=1, steps_per_epoch=1, total_steps=8)
    records = _train_records(run_dir)
    assert [records[step]["lr"] for step in (5, 6, 7, 8)] == pytest.approx([schedule.lr(s) for s in (4, 5, 6, 7)])
    # optim.ema_decay switched on: the average starts from the resumed weights (step 4's), not from fresh ones
    ema = smoke.export(run_dir, tmp_path / "ema.safetensors", "--ema")
    live = smoke.export(run_dir, tmp_path / "live.safetensors")
    assert _distance(ema, at_4) < 0.5 * _distance(live, at_4), "the EMA did not start from the resumed weights"


def test_the_attention_schedule_holds_across_resumes_and_eval_uses_the_mode_of_the_run(smoke, tmp_path):
    """Random shifts switching to full attention at half of 4 steps; the launch stops at step 4 before its final
    evaluation. Resumed with no step left, the evaluation must be in full attention (as `vilscale eval`'s);
    extended to 12 steps (the switch point moves to 6) the run must stay in full attention."""
    run_dir = tmp_path / "run"
    schedule = ("--set", "model.shift_mode=random", "--set", "schedule.full_attention_from=0.5")
    first = smoke.train(run_dir, *schedule, "--set", "train.max_steps=4", "--set", "train.exit_after_steps=4",
                        nproc=1)
    assert "step 2: ViL attention switches from shift_mode='random' to 'full'" in first.stderr
    smoke.train(run_dir, *schedule, "--set", "train.max_steps=4", nproc=1)  # no step left: evaluation only
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["shift_mode"] == "full"
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "eval", str(run_dir), "--live"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.splitlines()[0])
    assert evaluated["shift_mode"] == "full" and evaluated["val_top1"] == summary["val_top1"]

    extended = smoke.train(run_dir, "--allow-spec-change", *schedule, "--set", "train.max_steps=12",
                           "--set", "train.exit_after_steps=3", nproc=1)
    assert "resumed from step_00000004" in extended.stderr
    assert "switches" not in extended.stderr, "the extended run went back to random shifts"
    saved = torch.load(run_dir / "checkpoints" / "step_00000007" / "client_rank0.pt", weights_only=True)
    assert saved["train_state"]["shift_mode"] == "full"


def test_own_shifts_never_switch(smoke, tmp_path):
    run_dir = tmp_path / "run"
    result = smoke.train(run_dir, "--set", "model.shift_mode=own", "--set", "schedule.full_attention_from=0.5",
                         "--set", "train.max_steps=2", nproc=1)
    assert "switches" not in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["shift_mode"] == "own"
    # no terminal: rank 0 writes a plain progress line every train.log_every (2) steps, for schedulers' logs
    assert re.search(r"\[vilscale\] step 2/2 \(100%\): loss \d+\.\d{4}, lr \d\.\d\de-\d\d, \d+ img/s, data wait \d+%, "
                     r"ETA 0m00s", result.stderr), result.stderr[-2000:]


def test_a_job_whose_spec_differs_from_the_run_dirs_is_refused_by_its_ranks(smoke, tmp_path):
    """A job submitted before the run dir was relaunched with another spec (a SLURM job waiting in the queue)
    reaches its ranks with its own, older spec: they must refuse it rather than train it and rewrite spec.yaml."""
    run_dir = tmp_path / "run"
    smoke.train(run_dir, "--set", "train.exit_after_steps=2", nproc=1)
    stored = (run_dir / "spec.yaml").read_text()
    queued = _spec(smoke, run_dir, "--set", "optim.lr=0.5")
    job = tmp_path / "queued.yaml"
    job.write_text(yaml.safe_dump(queued.to_dict()))
    result = subprocess.run([sys.executable, "-m", "vilscale.orchestration.launch.rank", str(job)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "differs from" in result.stderr and "optim.lr: 0.5 here, 0.002 in spec.yaml" in result.stderr
    assert (run_dir / "spec.yaml").read_text() == stored
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 2


def test_a_rank_added_at_resume_draws_its_own_random_stream(smoke, tmp_path):
    """Stopped at step 4 on one rank and resumed on two: rank 1 did not exist in the saved run and must not take
    rank 0's torch generator (its drop-path and shift draws would repeat rank 0's)."""
    run_dir = tmp_path / "run"
    smoke.train(run_dir, "--set", "train.exit_after_steps=4", nproc=1)
    result = smoke.train(run_dir, nproc=2)
    assert "converting it to a universal checkpoint" in result.stderr
    states = [torch.load(run_dir / "checkpoints" / "step_00000008" / f"client_rank{r}.pt", weights_only=True)
              for r in (0, 1)]
    assert not torch.equal(states[0]["rng"]["torch"], states[1]["rng"]["torch"])
