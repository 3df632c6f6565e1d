"""Launches that cannot succeed are refused before any rank starts: exit code 2, one line naming the key,
the value and the fix, no restart, and nothing written into the run dir (an existing run stays exactly
as it was). Every case goes through the real `vilscale` entry point, in this process, where starting a rank
fails the test (the `refused` fixture): that is the proof no rank started."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke.yaml"


def vilscale(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vilscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kwargs)


def refused_in_one_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused launch prints (asserting that it was refused that way)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr and "restarting" not in result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder`` with its mtime and content hash."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("command", ["train", "submit"])
def test_unknown_model_name_is_refused_before_any_rank_starts(smoke, tmp_path, command, refused):
    run_dir = tmp_path / "run"
    extra = ["--backend", "local"] if command == "submit" else ["--nproc", "2"]
    line = refused(command, str(SMOKE), *extra, *smoke.args(run_dir, "--set", "model.name=vil_huge"))
    assert "model.name='vil_huge'" in line and "vil_small" in line, line
    assert not run_dir.exists()


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.img_size=64", "data.img_size=32"], "model.img_size=64 but data.img_size=32"),
    (["model.num_classes=7"], "model.num_classes=7 but"),
    (["train.micro_batch=500"], "cannot fill one batch of 500 on each of 3 ranks"),
    (["model.init_weights=/nonexistent/weights.safetensors"], "model.init_weights='/nonexistent/weights.safetensors' "
                                                              "does not exist"),
    (["model.window=9"], "window=9 is larger than"),
    (["train.device=cuda"], "no CUDA device is visible"),
])
def test_spec_data_and_weight_mistakes_are_refused_in_one_line(smoke, tmp_path, overrides, expected, refused):
    if "cuda" in overrides[0]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    run_dir = tmp_path / "run"
    sets = [item for assignment in overrides for item in ("--set", assignment)]
    line = refused("train", str(SMOKE), "--nproc", "3", *smoke.args(run_dir, *sets))
    assert expected in line, line
    assert not run_dir.exists()


def test_data_size_follows_the_model_size_when_left_out(tmp_path):
    from vilscale.orchestration.config import spec_from_dict

    spec = spec_from_dict({"run_dir": str(tmp_path), "model": {"img_size": 64}, "data": {"train_manifest": "m"}})
    assert spec.data.img_size == 64


def test_validation_classes_in_another_order_are_refused(smoke, digits, tmp_path, refused):
    """A validation set written without --classes can list the same classes in another order: its labels
    would then not match the model's outputs and accuracy would be silently wrong."""
    val = tmp_path / "val"
    val.mkdir()
    manifest = json.loads((digits / "val" / "manifest.json").read_text())
    manifest["classes"] = list(reversed(manifest["classes"]))
    for shard in manifest["shards"]:  # keep pointing at the real shards
        shard["path"] = str((digits / "val" / shard["path"]).resolve())
    (val / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    other_val = f"data.val_manifest={val / 'manifest.json'}"
    line = refused("train", str(SMOKE), *smoke.args(run_dir, "--set", other_val))
    assert "in another order" in line and "--classes" in line, line
    assert not run_dir.exists()


def test_run_dir_that_is_a_file_is_refused(smoke, tmp_path, refused):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a directory")
    line = refused("train", str(SMOKE), *smoke.args(run_dir))
    assert "is a file" in line


def test_a_refused_relaunch_leaves_a_finished_run_untouched(smoke, baseline_run, tmp_path, refused):
    """Relaunching into a finished run with a spec that changes what is trained is refused, naming the
    keys; an adjustable key (max_steps) needs --allow-spec-change. Not one file of the run changes."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(baseline_run, run_dir)
    before = snapshot(run_dir)
    same = smoke.args(run_dir, *smoke.BASELINE)
    line = refused("train", str(SMOKE), *same, "--set", "model.pos_embed=rpe")
    assert line.count("->") == 1 and "model.pos_embed: 'ape' -> 'rpe'" in line and "cannot change" in line, line
    line = refused("train", str(SMOKE), *same, "--set", "train.max_steps=12")
    assert "train.max_steps: 8 -> 12" in line and "--allow-spec-change" in line, line
    line = refused("train", str(SMOKE), "--allow-spec-change", *same, "--set", "model.pos_embed=rpe")
    assert "cannot change" in line, line
    assert snapshot(run_dir) == before  # not one file changed (eval of such a run: tests/test_trainer.py)


@pytest.mark.slow
def test_a_second_launch_into_a_live_run_is_refused_naming_the_owner(smoke, tmp_path):
    """The first run's rank waits before step 1 until the test releases it (VILSCALE_INJECT_HOLD), so the second
    launch surely meets a live run, however fast or slow the machine; once released, the first run finishes."""
    run_dir, gate = tmp_path / "run", tmp_path / "release"
    args = smoke.args(run_dir, "--set", "train.max_steps=1")
    first = subprocess.Popen([sys.executable, "-m", "vilscale.cli", "train", str(SMOKE), "--nproc", "1", *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             start_new_session=True, env={**os.environ, "VILSCALE_INJECT_HOLD": f"1:{gate}"})
    try:
        deadline = time.monotonic() + 120  # until the first run's rank 0 is up (it writes the run's id)
        while not (run_dir / "run_id").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None and (run_dir / "run_id").exists(), first.stderr.read() if first.poll() else ""
        before = snapshot(run_dir)
        line = refused_in_one_line(vilscale("train", str(SMOKE), *args))
        assert "is in use by another run" in line and f"pid {first.pid}" in line, line
        after = snapshot(run_dir)
        assert after.get("spec.yaml") == before.get("spec.yaml") and after.get("run_id") == before.get("run_id")
        assert first.poll() is None, "the first run did not wait at its gate"
        gate.touch()
        _, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGTERM)
            first.wait(timeout=60)
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 1
