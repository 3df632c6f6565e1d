"""What wraps the model for training behaves as a user expects: compile keeps the optimizer's groups,
activation checkpointing keeps the gradients, the EMA survives evaluation untouched, and a non-finite
loss in any micro-batch skips the whole step on every rank under every ZeRO stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke.yaml"


GROUPS_WITH_AND_WITHOUT_COMPILE = """
import json, sys, torch
from vilscale.orchestration.config import spec_from_dict
from vilscale.orchestration.training.distributed import init_distributed
from vilscale.orchestration.training.engine import build_engine, build_model

init_distributed("cpu")
out = {}
for compiled in (False, True):
    spec = spec_from_dict({"run_dir": sys.argv[1], "data": {},
                           "model": {"name": "vil_nano", "img_size": 32, "window": 2, "num_classes": 10},
                           "train": {"zero_stage": 0, "precision": "fp32", "device": "cpu", "compile": compiled,
                                     "micro_batch": 4}})
    torch.manual_seed(0)
    engine, optimizer = build_engine(spec, build_model(spec), world_size=1, device=torch.device("cpu"))
    names = {id(p): name for name, p in engine.module.named_parameters()}
    out[str(compiled)] = [sorted(names[id(p)] for p in group["params"]) for group in optimizer.param_groups]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_compile_keeps_the_weight_decay_groups(tmp_path):
    """train.compile=true must not change which parameters are decayed (compiling first renames every
    parameter to _orig_mod.*, and then no_weight_decay() matches none of them). A process of its own: a
    DeepSpeed engine per test process."""
    result = subprocess.run([sys.executable, "-c", GROUPS_WITH_AND_WITHOUT_COMPILE, str(tmp_path)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    groups = json.loads(result.stdout.strip().splitlines()[-1])
    assert groups["True"] == groups["False"]
    decayed, not_decayed = groups["False"]
    assert not any("_orig_mod" in name for name in decayed + not_decayed)
    assert "stages.0.pos_embed.row_embed" in not_decayed and "stages.0.global_tokens" in not_decayed
    assert "stages.0.blocks.0.mlp.fc1.weight" in decayed


def test_grad_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(one_torch_thread):
    from vilscale.model import create_model

    def run(checkpointing: bool):
        torch.manual_seed(0)
        model = create_model("vil_nano", num_classes=10, drop_path_rate=0.0)
        model.set_grad_checkpointing(checkpointing)
        saved = []

        def pack(tensor):
            saved.append(tensor.untyped_storage().nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))).square().mean()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, sum(saved)

    plain, plain_bytes = run(False)
    checkpointed, checkpointed_bytes = run(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    assert checkpointed_bytes < 0.6 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_evaluating_with_the_ema_restores_the_weights_and_never_rounds_the_average():
    """Under bf16 the module holds bf16 weights; evaluating with the fp32 EMA and coming back must leave
    both the live weights and the fp32 average exactly as they were."""
    from vilscale.orchestration.training.ema import ExponentialMovingAverage

    module = torch.nn.Linear(16, 16).to(torch.bfloat16)
    ema = ExponentialMovingAverage(module, decay=0.9)
    for tensor in ema.shadow.values():
        tensor.add_(torch.randn_like(tensor) * 1e-3)  # an average with more precision than bf16 holds
    shadow = {name: tensor.clone() for name, tensor in ema.shadow.items()}
    live = {name: p.detach().clone() for name, p in module.named_parameters()}
    for _ in range(3):
        with ema.applied(module):
            assert torch.equal(module.weight, shadow["weight"].to(torch.bfloat16))
    for name, parameter in module.named_parameters():
        assert torch.equal(parameter, live[name])
        assert torch.equal(ema.shadow[name], shadow[name]), "the EMA was rounded to bf16"
        assert ema.shadow[name].dtype == torch.float32


def _train(smoke, run_dir: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vilscale.cli", "train", str(SMOKE), "--nproc", "2", *smoke.args(run_dir, *extra)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, env={**os.environ, **env})


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_nonfinite_losses_and_gradients_skip_the_whole_step_on_every_rank(smoke, tmp_path, zero_stage):
    """Two faults in one run per ZeRO stage, grad_accum=2: the loss of step 2's second (boundary) micro-batch is NaN
    on rank 1 only; in step 4 the loss of rank 0's second micro-batch is finite but its gradients are NaN.
    Outcome: steps 2 and 4 are skipped on both ranks (their weights equal the step before's, the ranks stay
    identical, which every checkpoint checks, and every value stays finite), steps 3 and 5 train again."""
    from vilscale.orchestration.checkpoint.consolidate import consolidated_state_dict

    run_dir = tmp_path / "run"
    result = _train(smoke, run_dir, "--set", "train.grad_accum=2", "--set", f"train.zero_stage={zero_stage}",
                    "--set", "train.max_steps=5", "--set", "train.ckpt_every=1", "--set", "train.keep_checkpoints=5",
                    "--set", "launcher.max_restarts=0", env={"VILSCALE_INJECT_NONFINITE": "2:1:1,4:1:0:grad"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step 1: non-finite loss, step skipped on every rank" in result.stderr  # 0-based step index 1 = step 2
    assert "step 3: non-finite gradients (the loss was finite), step skipped on every rank" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["nonfinite_steps"] == 2
    weights = {step: consolidated_state_dict(run_dir, zero_stage=zero_stage, tag=f"step_{step:08d}")[0]
               for step in range(1, 6)}
    for skipped in (2, 4):
        assert all(torch.equal(weights[skipped - 1][k], weights[skipped][k]) for k in weights[1]), \
            f"the skipped step {skipped} changed weights"
        assert any(not torch.equal(weights[skipped][k], weights[skipped + 1][k]) for k in weights[1]), \
            f"step {skipped + 1} did not train"
    assert all(bool(torch.isfinite(w).all()) for w in weights[5].values())


def test_qhm_takes_the_official_first_and_second_steps():
    """QHM (nu = 1) as the official optimizer: g = grad + wd * w; h = m * h + (1 - m) * g from h = 0;
    w -= lr * h. Computed by hand for two steps of one weight."""
    from vilscale.orchestration.training.optim import QHM

    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = QHM([{"params": [weight], "weight_decay": 0.1}], lr=0.5, momentum=0.9)
    weight.grad = torch.tensor([0.2, 0.4], dtype=torch.float64)
    optimizer.step()
    # g1 = [0.2 + 0.1, 0.4 - 0.2] = [0.3, 0.2]; h1 = 0.1 * g1 = [0.03, 0.02]; w1 = w0 - 0.5 * h1
    assert weight.detach().tolist() == pytest.approx([1.0 - 0.015, -2.0 - 0.01], abs=1e-15)
    weight.grad = torch.tensor([-0.1, 0.0], dtype=torch.float64)
    optimizer.step()
    # g2 = [-0.1 + 0.0985, 0 - 0.201] = [-0.0015, -0.201]; h2 = 0.9 * h1 + 0.1 * g2 = [0.02685, -0.0021]
    assert weight.detach().tolist() == pytest.approx([0.985 - 0.5 * 0.02685, -2.01 + 0.5 * 0.0021], abs=1e-15)
