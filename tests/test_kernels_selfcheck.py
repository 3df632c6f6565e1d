"""``auto`` proves the triton kernels before using them (vilscale.kernels.selfcheck), tested without a GPU:
the check runs through Triton's interpreter on the CPU (a child process started with TRITON_INTERPRET=1),
and VILSCALE_INJECT_TRITON_CHECK makes it see a kernel that raises or computes wrong numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vilscale.kernels.selfcheck import CheckCase, KernelCheckError, check_cases, settle_backend
from vilscale.model import create_model

REPO = Path(__file__).resolve().parents[1]

# In a child process under the interpreter: settle the backend of vil_nano (rpe, so the bias tables are
# checked too) for each REQUESTED[@INJECTION] argument, and report (backend, reason) or the error.
CHILD = """
import json, os, sys, torch
from vilscale.kernels.selfcheck import INJECT_ENV, KernelCheckError, settle_backend
from vilscale.model import create_model
out = {}
for argument in sys.argv[1:]:
    requested, _, inject = argument.partition("@")
    os.environ.pop(INJECT_ENV, None)
    if inject:
        os.environ[INJECT_ENV] = inject
    model = create_model("vil_nano", pos_embed="rpe", shift_mode="random", num_classes=10, attn_backend=requested)
    try:
        backend, reason = settle_backend(model, requested, torch.device("cpu"), torch.float32)
        used = sorted({m.backend for m in model.modules() if hasattr(m, "window")})
        out[argument] = {"backend": backend, "reason": reason, "model_uses": used}
    except KernelCheckError as error:
        out[argument] = {"error": str(error)}
print(json.dumps(out))
"""


def _settle_under_interpreter(*arguments: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    env.pop("VILSCALE_INJECT_TRITON_CHECK", None)
    result = subprocess.run([sys.executable, "-c", CHILD, *arguments], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cases_cover_every_vil_layer_shape_and_shift_mode():
    model = create_model("vil_nano", pos_embed="rpe", shift_mode="random")
    cases = check_cases(model)
    # stage 1: head dim 16, stage 2: head dim 32, both window 2, one global token; random shift trains with
    # one neighbour and evaluates with all 9 chunks
    assert {(c.head_dim, c.neighbour) for c in cases} == {(16, None), (16, 0), (32, None), (32, 0)}
    assert all(c.window == 2 and c.num_global == 1 and c.tables and c.mode == "chunk" for c in cases)
    own = check_cases(create_model("vil_nano", shift_mode="own"))
    assert {c.neighbour for c in own} == {4} and not any(c.tables for c in own)


@pytest.mark.slow
def test_auto_uses_triton_when_the_kernels_pass_and_falls_back_when_they_fail():
    settled = _settle_under_interpreter("auto", "triton", "auto@error", "triton@error", "auto@mismatch",
                                        "triton@mismatch")
    for requested in ("auto", "triton"):
        assert settled[requested]["backend"] == "triton", settled
        assert settled[requested]["model_uses"] == [requested]  # auto: triton wherever it applies
        assert "checked against chunked on 4 problem(s)" in settled[requested]["reason"]

    for inject, sign in (("error", "RuntimeError: injected kernel failure"),
                         ("mismatch", "disagree with chunked: relative error")):
        auto, triton = settled[f"auto@{inject}"], settled[f"triton@{inject}"]
        assert auto["backend"] == "chunked" and auto["model_uses"] == ["chunked"], settled
        assert auto["reason"].startswith("auto fell back to chunked: ") and sign in auto["reason"]
        assert "error" in triton and sign in triton["error"] and "use attn_backend auto" in triton["error"], settled
    # the injection perturbs dk: the reason names the tensor and the problem
    assert "in dk on head dim " in settled["auto@mismatch"]["reason"]


def test_without_a_gpu_or_the_interpreter_auto_is_chunked_and_triton_is_refused():
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("this process runs Triton's interpreter")
    model = create_model("vil_nano", num_classes=10)
    backend, reason = settle_backend(model, "auto", torch.device("cpu"), torch.float32)
    assert backend == "chunked" and "triton does not apply" in reason and "TRITON_INTERPRET=1" in reason
    assert {m.backend for m in model.modules() if hasattr(m, "window")} == {"chunked"}
    with pytest.raises(KernelCheckError, match="model.attn_backend=triton cannot run here"):
        settle_backend(create_model("vil_nano", num_classes=10), "triton", torch.device("cpu"), torch.float32)
    # chunked and reference are taken as configured, without a check
    assert settle_backend(create_model("vil_nano"), "chunked", torch.device("cpu"), torch.float32)[0] == "chunked"


def test_layers_triton_cannot_run_are_left_to_auto_and_refused_to_an_explicit_triton():
    """A head dim the kernels do not take (24: not a multiple of 16) is no reason to distrust them elsewhere:
    the check covers the layers they apply to; an explicit triton names the layer it cannot run."""
    from vilscale.kernels.selfcheck import triton_refusal

    case = CheckCase(heads=2, head_dim=24, num_global=1, window=2, mode="chunk", neighbour=None, tables=False)
    assert "head dim 24 is not supported" in (triton_refusal(case, torch.device("cpu"), torch.float32) or "")
    model = create_model("vil_nano", num_classes=10, dims=(48, 64, 128))  # stage 1: 2 heads x 24
    with pytest.raises(KernelCheckError, match=r"cannot run here \(head dim 24, window 2"):
        settle_backend(model, "triton", torch.device("cpu"), torch.float32)


def test_a_case_describes_itself():
    case = CheckCase(heads=2, head_dim=32, num_global=1, window=7, mode="chunk", neighbour=None, tables=True)
    assert case.describe() == "head dim 32, window 7 (chunk, all 9 chunks), 1 global, with bias tables"


@pytest.mark.slow
def test_a_training_run_falls_back_or_stops_before_its_first_step(smoke, tmp_path):
    """Through the real trainer: auto with failing kernels trains on chunked and says why; an explicit triton
    with failing kernels stops with exit 2 and the reason, before any step or checkpoint."""
    env = {"TRITON_INTERPRET": "1", "VILSCALE_INJECT_TRITON_CHECK": "mismatch"}
    auto = smoke.train(tmp_path / "auto", "--set", "train.max_steps=2", "--set", "train.ckpt_every=2", nproc=1,
                       env=env)
    output = auto.stdout + auto.stderr
    assert "attention backend: chunked (auto fell back to chunked: the triton kernels disagree with chunked" in output
    assert (tmp_path / "auto" / "checkpoints" / "latest").exists()

    explicit = smoke.train(tmp_path / "explicit", "--set", "model.attn_backend=triton", nproc=1, env=env,
                           check=False)
    assert explicit.returncode == 2, explicit.stderr[-2000:]
    assert "model.attn_backend=triton: the triton kernels disagree with chunked" in explicit.stderr
    assert "Traceback" not in explicit.stderr
    checkpoints = tmp_path / "explicit" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
