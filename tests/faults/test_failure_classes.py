"""Which failures a launcher restarts, and which it stops at once with their cause and fix.

Deterministic failures (out of memory on the device or the host, a resume into data of another size) are
never restarted: a restart would fail the same way, ``launcher.max_restarts`` times. A transient error of a
shared file system is retried where it happens, and only when it outlasts the retries does it count as a
(restartable) failure, never as bad data.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vilscale.data.manifest import DataError
from vilscale.files import TransientIOError, retry_transient
from vilscale.orchestration.launch.exit_codes import EXIT_DATA_ERROR, EXIT_FAILED, EXIT_OUT_OF_MEMORY, classify

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_out_of_memory_stops_with_the_batch_and_the_fix_and_is_not_restarted(smoke, tmp_path):
    run_dir = tmp_path / "run"
    result = smoke.train(run_dir, env={"VILSCALE_INJECT_OOM": "3:1:device"}, check=False)
    assert result.returncode == EXIT_OUT_OF_MEMORY, result.stderr[-3000:]
    line = next(line for line in result.stderr.splitlines() if line.startswith("vilscale: rank 1: out of memory"))
    assert "micro_batch=16" in line and "lower train.micro_batch (now 16" in line, line
    assert "restarting from" not in result.stderr and "exit code 5 (out of memory); not restarting" in result.stderr


@pytest.mark.slow
def test_a_rank_killed_by_the_kernels_oom_killer_is_not_restarted(smoke, tmp_path, memory_cgroup):
    """Fault: rank 1 allocates memory without end at step 3, inside a 3 GiB memory cgroup holding the whole
    launch: the kernel's OOM killer ends it (SIGKILL). Outcome: exit 5 with the memory knobs, no restart."""
    group = memory_cgroup(3 * 2**30)
    command = [sys.executable, "-m", "vilscale.cli", "train", str(REPO / "jobs" / "smoke.yaml"), "--nproc", "2",
               *smoke.args(tmp_path / "run")]
    joined = ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *command]
    result = subprocess.run(joined, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "VILSCALE_INJECT_OOM": "3:1:host"})
    assert result.returncode == EXIT_OUT_OF_MEMORY, result.stderr[-3000:]
    assert "killed by the kernel's out-of-memory killer" in result.stderr
    assert "Lower train.micro_batch (now 16)" in result.stderr and "restarting from" not in result.stderr


@pytest.mark.slow
def test_a_mid_epoch_resume_into_a_dataset_of_another_size_stops_at_once(smoke, tmp_path):
    """The run stops mid-epoch at step 3; relaunched with data.train_manifest pointing at a smaller dataset (the
    validation split) it cannot continue the epoch's sample order: exit 2 naming the cause, never restarted."""
    run_dir = tmp_path / "run"
    smoke.train(run_dir, "--set", "train.exit_after_steps=3", nproc=1)
    other = smoke.digits / "val" / "manifest.json"
    result = smoke.train(run_dir, "--allow-spec-change", "--set", f"data.train_manifest={other}", nproc=1,
                         check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot resume step_00000003" in result.stderr and "num_samples" in result.stderr
    assert "restarting from" not in result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 3


def test_transient_file_system_errors_are_retried_then_counted_as_restartable(monkeypatch):
    monkeypatch.setenv("VILSCALE_IO_BACKOFF_S", "0.01,0.01,0.01")
    failures = iter([errno.EIO, errno.ESTALE])

    def flaky():
        code = next(failures, None)
        if code is not None:
            raise OSError(code, os.strerror(code))
        return "read"

    assert retry_transient(flaky, what="opening shard x") == "read"  # two transient errors, then it reads

    def dead():
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(TransientIOError) as failed:
        retry_transient(dead, what="opening shard x")
    assert "after 4 attempts" in str(failed.value)
    code, line = classify(failed.value)
    assert code == EXIT_FAILED and "opening shard x" in line  # restartable, and not "rewrite the shards"
    assert classify(DataError("shard x is corrupt"))[0] == EXIT_DATA_ERROR

    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    with pytest.raises(FileNotFoundError):
        retry_transient(missing, what="opening shard x")
    assert len(calls) == 1  # a missing file is not waited for


@pytest.mark.slow
def test_a_shard_whose_file_system_fails_transiently_is_opened_after_the_retries(digits, monkeypatch):
    """The real shard reader, its open failing twice with ESTALE (a stale NFS handle) before the server is back."""
    import ffcv.reader

    from vilscale.data.pipeline import ShardHandle

    monkeypatch.setenv("VILSCALE_IO_BACKOFF_S", "0.01,0.01,0.01")
    shard = sorted((digits / "train").glob("*.beton"))[0]
    real_reader, failures = ffcv.reader.Reader, [errno.ESTALE, errno.ESTALE]

    def reader(path, *args, **kwargs):
        if failures:
            code = failures.pop()
            raise OSError(code, os.strerror(code))
        return real_reader(path, *args, **kwargs)

    monkeypatch.setattr(ffcv.reader, "Reader", reader)
    handle = ShardHandle(shard, os_cache=True)
    assert handle.path == shard and not failures and len(handle.metadata) > 0


@pytest.mark.extended
@pytest.mark.slow
def test_another_jobs_oom_kill_is_not_taken_for_ours(smoke, tmp_path, memory_cgroup):
    """#37 scenario 5: while this launch runs in its own memory cgroup, a process of another job (another cgroup, 64
    MiB) is ended by the kernel's OOM killer, and then a rank of ours is SIGKILLed (a crash, not memory). Before,
    the launcher read the host-wide oom_kill count, saw it rise and stopped with exit 5 (never restarted); now it
    reads its own cgroup's count, and the rank's death is a restartable failure: the run restarts and finishes."""
    import time

    ours, tenant = memory_cgroup(6 * 2**30), memory_cgroup(64 * 2**20)
    run_dir, gate = tmp_path / "run", tmp_path / "release"
    command = [sys.executable, "-m", "vilscale.cli", "train", str(REPO / "jobs" / "smoke.yaml"), "--nproc", "2",
               *smoke.args(run_dir, "--set", "train.log_every=1")]
    launch = subprocess.Popen(["sh", "-c", f'echo $$ > {ours / "cgroup.procs"} && exec "$@"', "sh", *command],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "VILSCALE_INJECT_HOLD": f"6:{gate}",
                                   "VILSCALE_INJECT_FAULT": "mid-step:6:1"})
    try:
        deadline = time.monotonic() + 300
        while launch.poll() is None and time.monotonic() < deadline and not (
                (run_dir / "metrics.jsonl").exists() and '"step": 5' in (run_dir / "metrics.jsonl").read_text()):
            time.sleep(0.2)
        assert launch.poll() is None, launch.stderr.read()[-3000:]
        hog = "import torch\nhoard = []\nwhile True:\n    hoard.append(torch.ones(2**22))\n"
        other = subprocess.run(["sh", "-c", f'echo $$ > {tenant / "cgroup.procs"} && exec "$@"', "sh",
                                sys.executable, "-c", hog], capture_output=True, timeout=120)
        assert other.returncode == -9  # the OOM killer ended the other job's process
        gate.touch()
        _, err = launch.communicate(timeout=600)
    finally:
        gate.touch()
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode == 0, err[-3000:]
    assert "a rank failed (exit code -9); restarting from the latest checkpoint" in err, err[-3000:]
    assert "out-of-memory killer" not in err
