"""The run dir's lock on the filesystems clusters have (issue #22, scenario 7).

Every "other launcher" is a real process (forked, so it does not import torch again) holding a real lock
on real files. The one thing simulated is a filesystem without POSIX record locks (Lustre without
``flock``): ``fcntl.lockf`` then raises ENOLCK, as it does there. A lost NFS node is a SIGSTOPped holder:
its record lock stays, its heartbeat stops. Leases are 2 s here (``VILSCALE_LOCK_LEASE_S``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from vilscale.orchestration.checkpoint.rundir import LOCK_FILE, RunDirError, RunLock, check_usable, lock_holder

LEASE_S = 2.0
LEASE_PATH = LOCK_FILE + ".lease"
HOST = socket.gethostname()
FORK = multiprocessing.get_context("fork")
SCHEDULER_ENV = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_ID", "RAY_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR")
RAY_SUBMISSION = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"metadata": {"job_submission_id": "raysubmit_7"}})}


def no_record_locks(*args, **kwargs):
    """fcntl.lockf as on Lustre mounted without flock."""
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


def _launcher(run_dir: str, env: dict, record_locks: bool, stderr_path: str, go_file: str | None, conn) -> None:
    """Take the lock, report, then keep it until told to release it (or killed)."""
    os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)  # not pytest's capture, inherited by the fork
    os.environ.update(env)
    if not record_locks:
        fcntl.lockf = no_record_locks
    if go_file:
        Path(f"{go_file}.ready-{os.getpid()}").touch()  # forked and about to spin: the test waits for all of them
    while go_file and not os.path.exists(go_file):
        time.sleep(0.001)
    try:
        lock = RunLock(Path(run_dir)).acquire(what="other launcher")
    except RunDirError as error:
        conn.send(("refused", str(error)))
        return
    conn.send(("held", ""))
    if conn.recv() == "release":
        lock.release()
        conn.send("released")
    conn.recv()  # until killed, or the test ends


class Launcher:
    """Another launcher into the same run dir, in its own process."""

    def __init__(self, run_dir: Path, stderr_path: Path, *, env: dict, record_locks: bool, go_file: Path | None):
        self.conn, child = FORK.Pipe()
        self.stderr_path = stderr_path
        self.process = FORK.Process(target=_launcher, daemon=True,
                                    args=(str(run_dir), env, record_locks, str(stderr_path),
                                          str(go_file) if go_file else None, child))
        self.process.start()
        self.pid = self.process.pid
        self.state, self.message = None, None

    def outcome(self) -> str:
        if self.state is None:
            assert self.conn.poll(20), f"launcher {self.pid} did not answer: {self.stderr()}"
            self.state, self.message = self.conn.recv()
        return self.state

    def release(self) -> None:
        self.conn.send("release")
        assert self.conn.poll(10) and self.conn.recv() == "released"

    def kill(self, sig=signal.SIGKILL) -> None:
        os.kill(self.pid, sig)
        if sig == signal.SIGKILL:
            self.process.join(10)

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    for name in SCHEDULER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VILSCALE_LOCK_LEASE_S", str(LEASE_S))
    return tmp_path / "run"


@pytest.fixture
def launch(run_dir, tmp_path):
    """``launch(env=..., record_locks=...)``: start another launcher; all are killed at the end."""
    started = []

    def start(*, env: dict | None = None, record_locks: bool = True, go_file: Path | None = None, wait=True):
        launcher = Launcher(run_dir, tmp_path / f"launcher-{len(started)}.stderr", env=env or {},
                            record_locks=record_locks, go_file=go_file)
        started.append(launcher)
        if wait:
            launcher.outcome()
        return launcher

    yield start
    for launcher in started:
        if launcher.process.is_alive():
            os.kill(launcher.pid, signal.SIGCONT)
            launcher.kill()


def stderr_lines(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def lease_owner_pid(run_dir: Path) -> int | None:
    path = run_dir / LEASE_PATH
    return json.loads(path.read_text())["pid"] if path.exists() else None


def test_without_record_locks_a_lease_owns_the_run_dir_until_its_holder_dies_and_it_expires(
        run_dir, launch, capfd, monkeypatch):
    holder = launch(record_locks=False)
    assert holder.outcome() == "held", holder.stderr()
    monkeypatch.setattr(fcntl, "lockf", no_record_locks)
    with pytest.raises(RunDirError, match=rf"in use by another run \(other launcher, pid {holder.pid} on {HOST}"):
        RunLock(run_dir).acquire()
    assert f"pid {holder.pid} on {HOST}" in lock_holder(run_dir)

    holder.kill()  # dies without releasing: its lease stays until its heartbeat is older than the lease
    killed = time.monotonic()
    with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
        RunLock(run_dir).acquire()
    lock = RunLock(run_dir).acquire(wait_s=10)
    assert LEASE_S - 0.5 < time.monotonic() - killed < LEASE_S + 2
    lines = stderr_lines(capfd)
    assert len(lines) == 1, lines
    assert "took over" in lines[0] and f"pid {holder.pid} on {HOST}" in lines[0] and "since" in lines[0], lines
    assert "heartbeat stopped" in lines[0], lines
    assert lease_owner_pid(run_dir) == os.getpid()
    lock.release()
    assert not (run_dir / LEASE_PATH).exists()


@pytest.mark.parametrize("job_env, job_name, record_locks", [
    ({"SLURM_JOB_ID": "4242"}, "SLURM job 4242", True),
    ({"SLURM_JOB_ID": "4242"}, "SLURM job 4242", False),
    (RAY_SUBMISSION, "Ray job raysubmit_7", True),
], ids=["slurm-record-lock", "slurm-lease", "ray-record-lock"])
def test_the_same_scheduler_job_takes_over_a_live_holder_at_once(run_dir, launch, capfd, monkeypatch,
                                                                 job_env, job_name, record_locks):
    """A requeued job starts while its predecessor is still exiting (or its node is lost with an NFS lock
    the node keeps): it must not wait, and its predecessor must not remove its lock afterwards."""
    previous = launch(env=job_env, record_locks=record_locks)
    assert previous.outcome() == "held", previous.stderr()
    for name, value in job_env.items():
        monkeypatch.setenv(name, value)
    if "SLURM_JOB_ID" in job_env:  # the requeued incarnation (a live one of the same incarnation is refused)
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    if not record_locks:
        monkeypatch.setattr(fcntl, "lockf", no_record_locks)
    started = time.monotonic()
    lock = RunLock(run_dir).acquire(what="requeued")
    assert time.monotonic() - started < 1.0
    lines = stderr_lines(capfd)
    assert len(lines) == 1, lines
    assert "took over" in lines[0] and f"pid {previous.pid} on {HOST}" in lines[0] and job_name in lines[0], lines

    # the predecessor still runs (and, with record locks, still holds its record lock): the lock is ours
    other_job = launch(env={"SLURM_JOB_ID": "999"}, record_locks=record_locks)
    assert other_job.outcome() == "refused" and f"requeued, pid {os.getpid()} on {HOST}" in other_job.message
    previous.release()  # what it does on its way out: the lease is no longer its own, so it stays
    assert lease_owner_pid(run_dir) == os.getpid()
    assert "no longer holds" in previous.stderr()
    lock.release()
    assert not (run_dir / LEASE_PATH).exists()


@pytest.mark.parametrize("record_locks", [True, False], ids=["record-lock", "lease"])
def test_another_job_is_refused_while_the_holder_beats(run_dir, launch, monkeypatch, record_locks):
    """Longer than the lease: the heartbeat keeps it."""
    holder = launch(env={"SLURM_JOB_ID": "1"}, record_locks=record_locks)
    assert holder.outcome() == "held", holder.stderr()
    monkeypatch.setenv("SLURM_JOB_ID", "2")
    if not record_locks:
        monkeypatch.setattr(fcntl, "lockf", no_record_locks)
    with pytest.raises(RunDirError) as refused:
        RunLock(run_dir).acquire(wait_s=LEASE_S + 1)
    message = str(refused.value)
    assert f"in use by another run (other launcher, pid {holder.pid} on {HOST} (SLURM job 1)" in message, message
    assert "another run_dir" in message
    assert lease_owner_pid(run_dir) == holder.pid


def test_a_record_lock_kept_by_a_lost_node_is_taken_over_when_its_heartbeat_expires(run_dir, launch, capfd,
                                                                                    monkeypatch):
    """NFSv3 keeps a lost node's lock until the node reboots; a stopped holder keeps its lock and stops beating."""
    lost = launch(env={"SLURM_JOB_ID": "1"})
    assert lost.outcome() == "held", lost.stderr()
    lost.kill(signal.SIGSTOP)
    monkeypatch.setenv("SLURM_JOB_ID", "2")
    lock = RunLock(run_dir).acquire(wait_s=LEASE_S + 4)
    lines = stderr_lines(capfd)
    assert len(lines) == 1 and f"pid {lost.pid} on {HOST} (SLURM job 1)" in lines[0], lines
    assert "heartbeat stopped" in lines[0], lines
    assert lease_owner_pid(run_dir) == os.getpid()

    lost.kill(signal.SIGCONT)  # the node comes back: its holder learns it lost the run dir, once
    deadline = time.monotonic() + 5
    while "no longer holds" not in lost.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lost.stderr().count("no longer holds") == 1, lost.stderr()
    assert lease_owner_pid(run_dir) == os.getpid()
    lock.release()


def test_a_crashed_holder_is_replaced_at_once_where_record_locks_work(run_dir, launch, capfd):
    """The kernel drops a dead process's record lock: no need to wait for its lease."""
    holder = launch()
    assert holder.outcome() == "held", holder.stderr()
    holder.kill()
    assert lock_holder(run_dir) is None
    check_usable(run_dir)  # its leftover lock files do not make the run dir look foreign
    with RunLock(run_dir).acquire():
        lines = stderr_lines(capfd)
        assert len(lines) == 1 and f"pid {holder.pid} on {HOST}" in lines[0], lines
        assert "ended without releasing" in lines[0], lines


@pytest.mark.parametrize("record_locks", [True, False], ids=["record-lock", "lease"])
def test_release_removes_the_lease_and_the_next_launch_takes_it_silently(run_dir, launch, monkeypatch,
                                                                         record_locks):
    if not record_locks:
        monkeypatch.setattr(fcntl, "lockf", no_record_locks)
    with RunLock(run_dir).acquire(what="first") as lock:
        assert lease_owner_pid(run_dir) == os.getpid()
        assert launch(record_locks=record_locks).outcome() == "refused"
    assert not (run_dir / LEASE_PATH).exists()
    lock.release()  # twice is harmless
    following = launch(env={"SLURM_JOB_ID": "3"}, record_locks=record_locks)
    assert following.outcome() == "held" and following.stderr() == ""


@pytest.mark.parametrize("record_locks", [True, False], ids=["record-lock", "lease"])
def test_launchers_racing_for_an_expired_lease_take_it_once(run_dir, launch, tmp_path, record_locks):
    crashed = launch(record_locks=False)
    assert crashed.outcome() == "held", crashed.stderr()
    crashed.kill()
    time.sleep(LEASE_S + 0.2)
    go = tmp_path / "go"
    racers = [launch(record_locks=record_locks, go_file=go, wait=False) for _ in range(6)]
    deadline = time.monotonic() + 30
    while not all(Path(f"{go}.ready-{racer.pid}").exists() for racer in racers):  # all forked and spinning
        assert time.monotonic() < deadline, "the racers did not start"
        time.sleep(0.01)
    go.touch()
    outcomes = {racer.pid: racer.outcome() for racer in racers}
    winners = [pid for pid, outcome in outcomes.items() if outcome == "held"]
    assert len(winners) == 1, outcomes
    assert lease_owner_pid(run_dir) == winners[0]
    for racer in racers:
        if racer.pid != winners[0]:
            assert f"pid {winners[0]} on {HOST}" in racer.message, racer.message
    assert sum("took over" in racer.stderr() for racer in racers) <= 1


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_lease_setting_is_refused_naming_it(run_dir, monkeypatch, value):
    monkeypatch.setenv("VILSCALE_LOCK_LEASE_S", value)
    with pytest.raises(RunDirError, match=rf"VILSCALE_LOCK_LEASE_S={value!r} .*seconds"):
        RunLock(run_dir).acquire()


def test_the_holding_process_can_ask_who_holds_without_dropping_its_record_lock(run_dir, launch):
    """Closing any descriptor of .lock drops the process's record lock; then a launcher on this host would
    think the holder crashed and take over."""
    with RunLock(run_dir).acquire(what="holder"):
        assert f"holder, pid {os.getpid()} on {HOST}" in lock_holder(run_dir)
        with pytest.raises(RuntimeError, match="already holds the lock"):
            RunLock(run_dir).acquire()
        other = launch()
        assert other.outcome() == "refused" and f"pid {os.getpid()}" in other.message, other.message
