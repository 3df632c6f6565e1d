"""Faults injected into real training runs (2 ranks, DeepSpeed ZeRO-2 on CPU, real FFCV shards).

Each test states the fault and the outcome it proves.
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch

from vilscale.files import sha256_of
from vilscale.orchestration.checkpoint import Checkpointer

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_rank_sigkilled_mid_step_restarts_from_latest_and_sees_every_sample_once(smoke, baseline_run,
                                                                                killed_mid_step_run, tmp_path):
    """Fault: rank 1 is SIGKILLed in the middle of step 6 (after its forward, before its backward).
    Outcome: the local launcher stops the group, restarts it (launcher.max_restarts), the run resumes from
    the step-4 checkpoint and finishes; the samples of every step, and the final weights, equal those of
    the uninterrupted run: none repeated, none skipped. (The run is shared with the TensorBoard test.)"""
    run_dir, result = killed_mid_step_run
    assert "a rank failed (exit code -9); restarting from the latest checkpoint" in result.stderr
    assert "resumed from step_00000004" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 8
    assert smoke.samples(run_dir) == smoke.samples(baseline_run)
    a = smoke.export(baseline_run, tmp_path / "a.safetensors")
    b = smoke.export(run_dir, tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.extended
def test_a_rank_that_falls_silent_mid_collective_times_out_its_peer_and_the_run_resumes_exactly(
        smoke, baseline_run, tmp_path):
    """Fault: rank 1 stops (SIGSTOP) in the middle of step 6, alive but silent like a rank on a host whose
    network is gone, while rank 0 goes on into the step's all-reduce. Outcome: rank 0 gives up after
    train.collective_timeout_s with a restartable exit, the group is restarted from step 4 and the run ends
    with the samples and the weights of the uninterrupted run, bit for bit."""
    run_dir = tmp_path / "run"
    result = smoke.train(run_dir, *smoke.BASELINE, "--set", "train.collective_timeout_s=6",
                         env={"VILSCALE_INJECT_FAULT": "freeze:6:1"})
    assert "vilscale: rank 0: stopped because another rank failed" in result.stderr
    assert "restarting from the latest checkpoint (1/2)" in result.stderr
    assert "resumed from step_00000004" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 8
    assert smoke.samples(run_dir) == smoke.samples(baseline_run)
    a = smoke.export(baseline_run, tmp_path / "a.safetensors")
    b = smoke.export(run_dir, tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_while_writing_a_checkpoint_keeps_latest_on_the_previous_one(smoke, tmp_path):
    """Fault: rank 0 is SIGKILLed after every rank wrote the step-8 checkpoint files but before the
    manifest and `latest` were written. Outcome: the launch, allowed no restart, ends with exit code 1 (a
    restartable failure); `latest` still names step 4 and no step-8 directory exists (the files sit under a partial
    name that no resume reads), the next launch resumes from step 4, removes the partial directory and finishes
    with a complete step 8."""
    run_dir = tmp_path / "run"
    result = smoke.train(run_dir, "--set", "launcher.max_restarts=0", check=False,
                         env={"VILSCALE_INJECT_FAULT": "checkpoint-files-written:8:0"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (run_dir / "checkpoints" / "step_00000008").exists()
    partial = list((run_dir / "checkpoints").glob(".partial-step_00000008-*"))
    assert len(partial) == 1 and (partial[0] / "mp_rank_00_model_states.pt").is_file()
    assert not (partial[0] / "manifest.json").exists()
    result = smoke.train(run_dir)
    assert "resumed from step_00000004" in result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert Checkpointer(run_dir, keep=2, spec_digest="").verify("step_00000008") is None
    assert not list((run_dir / "checkpoints").glob(".partial-*"))


def test_truncated_checkpoint_is_detected_named_and_the_previous_one_used(smoke, baseline_run, tmp_path):
    """Fault: the newest checkpoint's optimizer shard is truncated. Outcome: the resume names the file,
    falls back to the step-4 checkpoint, and the run finishes."""
    run_dir = tmp_path / "run"
    shutil.copytree(baseline_run, run_dir)
    shard = run_dir / "checkpoints" / "step_00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    result = smoke.train(run_dir, *smoke.BASELINE, "--set", "train.max_steps=10", "--allow-spec-change")
    assert "checkpoint step_00000008 is not usable" in result.stderr
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt has 1000 bytes" in result.stderr
    assert "resumed from step_00000004" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 10


def test_flipped_bytes_in_a_checkpoint_are_detected_by_checksum(smoke, baseline_run, tmp_path):
    """Fault: one byte of the newest model file is flipped (same size). Outcome: the sha256 check names it."""
    run_dir = tmp_path / "run"
    shutil.copytree(baseline_run, run_dir)
    target = run_dir / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    checkpointer = Checkpointer(run_dir, keep=2, spec_digest="")
    problem = checkpointer.verify("step_00000008")
    assert problem and "mp_rank_00_model_states.pt does not match its sha256" in problem
    assert checkpointer.find_resumable(log=lambda message: None)["tag"] == "step_00000004"


def test_disk_full_while_checkpointing_is_a_clear_error_and_keeps_the_previous_checkpoint(smoke, small_disk):
    """Fault: the run dir's filesystem fills up while the step-8 checkpoint is written. Outcome: the run
    stops with an error that says the save failed and that `latest` still names the previous checkpoint, exit
    code 1 (a full disk may be freed: restartable, and no restart is allowed here); the step-4 checkpoint is
    intact and verifies."""
    disk = small_disk("7M")
    run_dir = disk / "run"
    result = smoke.train(run_dir, "--set", "launcher.max_restarts=0", check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "checkpoint step_00000008" in result.stderr or "checkpoint step 8" in result.stderr
    assert "No space left on device" in result.stderr
    assert "'latest' still points to the previous complete checkpoint" in result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert Checkpointer(run_dir, keep=2, spec_digest="").verify("step_00000004") is None


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/vilscale-pwned-by-checkpoint"),))


def test_checkpoint_client_state_is_loaded_without_running_pickled_code(smoke, baseline_run, tmp_path):
    """Fault: a checkpoint's client state is replaced by a pickle that runs code when unpickled (its
    manifest updated to match). Outcome: loading refuses it (weights_only=True); the code never runs."""
    marker = Path("/tmp/vilscale-pwned-by-checkpoint")
    marker.unlink(missing_ok=True)
    run_dir = tmp_path / "run"
    shutil.copytree(baseline_run, run_dir)
    directory = run_dir / "checkpoints" / "step_00000008"
    client = directory / "client_rank0.pt"
    torch.save({"evil": _Payload()}, client, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["client_rank0.pt"] = {"sha256": sha256_of(client), "bytes": client.stat().st_size}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    result = smoke.train(run_dir, *smoke.BASELINE, "--set", "train.max_steps=10", "--set", "launcher.max_restarts=0",
                         "--allow-spec-change", check=False)
    assert result.returncode == 1 and "Weights only load failed" in result.stderr, result.stderr[-3000:]
    assert not marker.exists(), "unpickling the checkpoint ran code"


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_metrics_endpoint_is_not_reachable_from_other_interfaces_by_default(tmp_path):
    """Fault: a client on another interface tries to scrape a rank. Outcome: refused (binds 127.0.0.1)."""
    from vilscale.orchestration.config import MetricsConfig
    from vilscale.orchestration.training.metrics import TrainingMetrics

    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try from")
    metrics = TrainingMetrics(tmp_path, run_id="r", rank=0, host=MetricsConfig().host, port=0, serve=True)
    try:
        port = int(metrics.endpoint.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()
    finally:
        metrics.close()


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256)."""
    return {str(path.relative_to(folder)): sha256_of(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_launch_woken_after_another_took_its_run_dir_stops_before_touching_it(smoke, tmp_path):
    """#36 scenario 1 end to end. A run (launcher and ranks) is stopped with SIGSTOP at step 6 for longer than its
    lease (2 s here); a second launch of the same job takes the run dir over, resumes from step 4 and finishes
    (checkpoint 8, `latest`, summary). Then the first is woken and trains on to its own step-8 save. Before, it
    wrote over the step-8 checkpoint and moved `latest` under the second; now its save is fenced: it stops with
    exit code 6 (not restarted) and every file of the second run's checkpoints is as the second left it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir, gate = tmp_path / "run", tmp_path / "release"
    lease = {"VILSCALE_LOCK_LEASE_S": "2"}
    args = ["train", str(smoke_job()), "--nproc", "1", *smoke.args(run_dir, "--set", "train.log_every=1")]
    first = subprocess.Popen([sys.executable, "-m", "vilscale.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, **lease, "VILSCALE_INJECT_HOLD": f"6:{gate}"})
    try:
        deadline = time.monotonic() + 300
        while not _held_at(run_dir, 5) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None and _held_at(run_dir, 5), "the first run never reached its hold before step 6"
        os.killpg(first.pid, signal.SIGSTOP)  # launcher and rank: heartbeat and training frozen
        second = smoke.train(run_dir, "--set", "train.log_every=1", nproc=1, env=lease)
        assert "took over its lock" in second.stderr and "resumed from step_00000004" in second.stderr
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
        checkpoints, summary = _tree(run_dir / "checkpoints"), (run_dir / "summary.json").read_text()
        os.killpg(first.pid, signal.SIGCONT)
        gate.touch()
        _, err = first.communicate(timeout=300)
    finally:
        gate.touch()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGCONT)
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 6, err[-3000:]
    assert "was taken over by another launch" in err and "stops before declaring checkpoint step_00000008" in err, \
        err[-3000:]
    assert "not restarting" in err and "restarting from the latest checkpoint" not in err
    after = {name: digest for name, digest in _tree(run_dir / "checkpoints").items() if not name.startswith(".partial")}
    assert after == checkpoints  # its own step-8 files stayed under a partial name, which no resume reads
    assert (run_dir / "summary.json").read_text() == summary


def _held_at(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(json.loads(line).get("step") == step for line in path.read_text().splitlines()
                                 if '"loss"' in line)


def smoke_job() -> Path:
    return Path(__file__).resolve().parents[2] / "jobs" / "smoke.yaml"


def test_a_run_dir_whose_checkpoints_all_fail_stops_and_start_over_is_the_users_choice(smoke, baseline_run,
                                                                                        tmp_path):
    """#36 scenario 4 end to end. Every checkpoint of a finished run is damaged; a relaunch that extends it stops at
    once with exit code 7 (never restarted), naming each checkpoint and `--start-over`, and writes nothing. Before,
    the run trained from step 0 with its initial weights, and pruning then deleted its new checkpoint while keeping
    the broken old ones. With --start-over it trains from step 0 and the old checkpoints sit in discarded-*/."""
    run_dir = tmp_path / "run"
    shutil.copytree(baseline_run, run_dir)
    for tag in ("step_00000004", "step_00000008"):
        target = run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    before = _tree(run_dir)
    extend = [*smoke.BASELINE, "--set", "train.max_steps=10", "--allow-spec-change"]
    stopped = smoke.train(run_dir, *extend, check=False)
    assert stopped.returncode == 7, stopped.stderr[-3000:]
    for tag in ("step_00000008", "step_00000004"):
        assert f"{tag}: {run_dir / 'checkpoints' / tag / 'mp_rank_00_model_states.pt'} does not match its sha256" \
            in stopped.stderr, stopped.stderr[-3000:]
    assert "--start-over" in stopped.stderr and "not restarting" in stopped.stderr
    changed = {name for name, digest in _tree(run_dir).items() if before.get(name) != digest}
    assert changed <= {"spec.yaml"}, changed  # the accepted max_steps change only
    fresh = smoke.train(run_dir, *extend, "--start-over")
    assert "--start-over: moved the checkpoints aside into" in fresh.stderr and "resumed from" not in fresh.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 10
    discarded = next(run_dir.glob("discarded-*"))
    assert {"latest", "step_00000004", "step_00000008"} <= {p.name for p in (discarded / "checkpoints").iterdir()}


@pytest.mark.extended
def test_a_resize_whose_conversion_outlasts_the_collective_timeout_is_not_a_restart_loop(smoke, tmp_path):
    """#37 scenario 8: a checkpoint of 1 rank resumed on 2 goes through DeepSpeed's universal format, converted by
    rank 0 while rank 1 waits. The conversion is made to take 12 s, longer than train.collective_timeout_s (5 s).
    Before, rank 1 gave up after 5 s, the group restarted (a large checkpoint would make that a loop); now the
    peers wait for the conversion in a group bounded by the conversion's own limit, and the run resumes at once."""
    run_dir = tmp_path / "run"
    smoke.train(run_dir, "--set", "train.exit_after_steps=4", nproc=1)
    result = smoke.train(run_dir, "--set", "train.collective_timeout_s=5", nproc=2,
                         env={"VILSCALE_INJECT_SLOW_CONVERSION": "12"})
    assert "converting it to a universal checkpoint" in result.stderr
    assert "restarting from the latest checkpoint" not in result.stderr, result.stderr[-3000:]
    assert "resumed from step_00000004" in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 8
