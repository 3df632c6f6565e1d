"""No run lost on shared storage (#36): the supervisor's own state, the run dir's lease fencing a woken holder,
durable checkpoints, and a run that never silently restarts from step 0."""

from __future__ import annotations

from vilscale.orchestration.launch.slurm import restarts_used


def test_a_damaged_restart_counter_is_counted_as_zero_not_a_crash(tmp_path, capsys):
    """Before, `int(counter.read_text())` of an empty counter (a supervisor killed mid-write) crashed the supervisor
    and ended the job FAILED. The counter is written atomically now, and one that is damaged anyway is said."""
    counter = tmp_path / "7_failure_restarts"
    assert restarts_used(counter) == 0  # no restart used yet
    counter.write_text("2\n")
    assert restarts_used(counter) == 2
    for damaged in ("", "\x00\x00", "two"):
        counter.write_text(damaged)
        assert restarts_used(counter) == 0
        assert "not a count; counting the restarts used as 0" in capsys.readouterr().err



# ---------------------------------------------------------------------------------------------------- the lease
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vilscale.orchestration.checkpoint.rundir import LOCK_FILE, RunDirError, RunLock  # noqa: E402

FORK = multiprocessing.get_context("fork")
SCHEDULER_ENV = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_ID", "RAY_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR")


def _holder(run_dir: str, env: dict, clock_behind_s: float, conn) -> None:
    """Take the run dir's lock (a writer whose clock is ``clock_behind_s`` behind, if given), report, then do
    what the test asks: "fence" (a write that changes what a resume reads), or just keep it."""
    os.environ.update(env)
    if clock_behind_s:
        real = time.time
        time.time = lambda: real() - clock_behind_s
    RunLock(Path(run_dir)).acquire(what="holder")
    conn.send("held")
    while True:
        order = conn.recv()
        if order == "write":
            from vilscale.orchestration.checkpoint.rundir import RunDirLost, read_or_create_run_id

            try:
                read_or_create_run_id(Path(run_dir))  # fenced: creates RUN_DIR/run_id
                conn.send("wrote")
            except RunDirLost as error:
                conn.send(f"lost: {error}")


class Holder:
    def __init__(self, run_dir: Path, env: dict | None = None, clock_behind_s: float = 0.0):
        self.conn, child = FORK.Pipe()
        self.process = FORK.Process(target=_holder, args=(str(run_dir), env or {}, clock_behind_s, child), daemon=True)
        self.process.start()
        assert self.conn.poll(20) and self.conn.recv() == "held"

    def ask(self, order: str) -> str:
        self.conn.send(order)
        assert self.conn.poll(20), "the holder did not answer"
        return self.conn.recv()

    def signal(self, sig) -> None:
        os.kill(self.process.pid, sig)

    def stop(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGCONT)
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.join(10)


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    for name in SCHEDULER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VILSCALE_LOCK_LEASE_S", "1")
    return tmp_path / "run"


@pytest.fixture
def holders():
    started = []

    def start(*args, **kwargs) -> Holder:
        started.append(Holder(*args, **kwargs))
        return started[-1]

    yield start
    for holder in started:
        holder.stop()


def test_a_woken_holder_is_fenced_after_another_launch_took_the_run_dir(run_dir, holders):
    """#36 scenario 1 (split brain). The holder is SIGSTOPped past its 1-s lease (scontrol suspend, Ctrl-Z, a hung
    NFS client); another launch takes the run dir over; the holder is woken. Its next write that a resume would read
    raises RunDirLost, and what the new owner wrote stays as it is. Before, nothing checked ownership before a
    write: the woken holder wrote over the new owner's files."""
    holder = holders(run_dir)
    holder.signal(signal.SIGSTOP)
    with RunLock(run_dir).acquire(wait_s=10, what="new owner"):
        assert json.loads((run_dir / (LOCK_FILE + ".lease")).read_text())["what"] == "new owner"
        holder.signal(signal.SIGCONT)
        answer = holder.ask("write")
        assert answer.startswith("lost: ") and "was taken over by another launch (now new owner, pid" in answer
        assert "stops before writing the run's id" in answer, answer
        assert not (run_dir / "run_id").exists()  # the fenced write did not happen


def test_a_live_holder_whose_clock_lags_is_not_taken_over(run_dir, holders):
    """#36 scenario 3. A holder whose clock is 10 s behind this machine's (lease 1 s) writes heartbeats that look
    10 s old here; it is alive and beating. Before, a launch compared its own clock with the heartbeat and took the
    run dir over at once; now staleness is judged by the heartbeat not changing on this machine's monotonic clock."""
    holder = holders(run_dir, clock_behind_s=10)
    started = time.monotonic()
    with pytest.raises(RunDirError, match="in use by another run \\(holder, pid"):
        RunLock(run_dir).acquire()
    assert time.monotonic() - started < 1.0  # refused as soon as the heartbeat was seen to move
    assert holder.ask("write") == "wrote"  # still the owner


def test_two_launches_of_one_slurm_job_are_told_apart(run_dir, holders, monkeypatch, capfd):
    """#36 scenario 2. Before, a lease of the same SLURM_JOB_ID was taken over at once, so two `vilscale train` in
    one salloc both trained into the run dir. Now only an older incarnation (a lower SLURM_RESTART_COUNT, or an
    earlier SLURM_STEP_ID of the same allocation: the supervisor's relaunch) is taken over at once."""
    holders(run_dir, env={"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "0"})
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(RunDirError, match=r"in use by another run \(holder, pid \d+ on .* \(SLURM job 5\)"):
        RunLock(run_dir).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job requeued: its previous incarnation is on its way out
    started = time.monotonic()
    with RunLock(run_dir).acquire(what="requeued"):
        assert time.monotonic() - started < 0.5
    assert "an older incarnation of the same SLURM job 5 (requeue 0, step -1; this is requeue 1, step -1)" \
        in capfd.readouterr().err


def test_a_relaunch_inside_the_allocation_takes_over_its_earlier_step(run_dir, holders, monkeypatch):
    holders(run_dir, env={"SLURM_JOB_ID": "6", "SLURM_RESTART_COUNT": "2", "SLURM_STEP_ID": "0"})
    for name, value in {"SLURM_JOB_ID": "6", "SLURM_RESTART_COUNT": "2", "SLURM_STEP_ID": "1"}.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with RunLock(run_dir).acquire():
        assert time.monotonic() - started < 0.5


def test_a_new_run_dir_is_private_to_its_owner(run_dir):
    """#36 scenario 7: the supervisor and `submit --wait` unpickle files from the run dir."""
    with RunLock(run_dir).acquire():
        assert run_dir.stat().st_mode & 0o777 == 0o700
    other = run_dir.parent / "group"
    with RunLock(other, mode="0750").acquire():
        assert other.stat().st_mode & 0o777 == 0o750


def test_a_result_pickle_others_could_have_written_is_never_unpickled(tmp_path, capsys):
    """#36 scenario 7: a pickle planted in a group-writable run dir, or owned by another user, would run its code
    as whoever reads it. Before, the supervisor and `submit --wait` unpickled every result file."""
    import pickle

    from vilscale.orchestration.launch.slurm import UnsafePickle, _task_results, load_result

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "submitit"
    folder.mkdir(mode=0o700)
    planted = folder / "7_0_result.pkl"
    planted.write_bytes(pickle.dumps(Payload()))
    planted.chmod(0o664)  # group-writable
    with pytest.raises(UnsafePickle, match="it is writable by group"):
        load_result(planted)
    assert _task_results(folder, "7") == {} and "refusing to read" in capsys.readouterr().err
    if os.geteuid() == 0:
        planted.chmod(0o600)
        os.chown(planted, 65534, 65534)
        with pytest.raises(UnsafePickle, match="belongs to uid 65534"):
            load_result(planted)
    assert not marker.exists()
    mine = folder / "8_0_result.pkl"
    mine.write_bytes(pickle.dumps(("success", {"step": 8})))
    mine.chmod(0o600)
    assert load_result(mine) == ("success", {"step": 8})


# ---------------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(root: Path, step: int, content: bytes = b"weights") -> str:
    """A complete checkpoint as Checkpointer writes it: its file and a manifest with the file's sha256."""
    import hashlib

    from vilscale.orchestration.checkpoint import tag_for

    tag = tag_for(step)
    (root / tag).mkdir(parents=True)
    (root / tag / "model.pt").write_bytes(content)
    manifest = {"step": step, "world_size": 1, "spec_digest": "x", "created": 0.0,
                "files": {"model.pt": {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}}}
    (root / tag / "manifest.json").write_text(json.dumps(manifest))
    return tag


def test_a_run_dir_whose_checkpoints_all_fail_verification_stops_naming_each_one(tmp_path):
    """#36 scenario 4. Before, find_resumable returned None and the run trained from step 0 with its initial
    weights, silently; now it stops, naming each checkpoint's problem, with a code no launcher restarts."""
    from vilscale.orchestration.checkpoint import Checkpointer, NoUsableCheckpoint
    from vilscale.orchestration.launch.exit_codes import EXIT_NO_CHECKPOINT, classify, is_restartable

    root = tmp_path / "run" / "checkpoints"
    for step in (4, 8):
        _checkpoint(root, step)
    (root / "latest").write_text("step_00000008\n")
    (root / "step_00000008" / "model.pt").write_bytes(b"weightS")  # a byte changed, the size kept
    (root / "step_00000004" / "model.pt").write_bytes(b"weig")
    checkpointer = Checkpointer(tmp_path / "run", keep=3, spec_digest="x")
    with pytest.raises(NoUsableCheckpoint) as stopped:
        checkpointer.find_resumable(log=lambda line: None)
    message = str(stopped.value)
    assert "step_00000008:" in message and "does not match its sha256" in message, message
    assert "step_00000004:" in message and "has 4 bytes, the manifest says 7" in message, message
    assert "--start-over" in message
    code, line = classify(stopped.value)
    assert code == EXIT_NO_CHECKPOINT and not is_restartable(code) and line == message
    assert Checkpointer(tmp_path / "fresh", keep=3, spec_digest="x").find_resumable() is None  # a new run: step 0


def test_start_over_moves_the_checkpoints_aside_and_deletes_nothing(tmp_path):
    from vilscale.orchestration.checkpoint import Checkpointer, discard_checkpoints

    run_dir = tmp_path / "run"
    _checkpoint(run_dir / "checkpoints", 4, b"broken")
    (run_dir / "tensorboard").mkdir()
    aside = discard_checkpoints(run_dir)
    assert aside.parent == run_dir and aside.name.startswith("discarded-")
    assert (aside / "checkpoints" / "step_00000004" / "model.pt").read_bytes() == b"broken"
    assert (aside / "tensorboard").is_dir() and not (run_dir / "checkpoints").exists()
    assert Checkpointer(run_dir, keep=3, spec_digest="x").find_resumable() is None
    assert discard_checkpoints(run_dir) is None  # nothing left to move


def test_pruning_never_removes_the_checkpoint_latest_names(tmp_path):
    """Before, _prune kept the last `keep` complete checkpoints by name: in a run dir that also held checkpoints of
    higher steps (an old run's), it deleted the new checkpoint that `latest` had just been moved to."""
    from vilscale.orchestration.checkpoint import Checkpointer

    root = tmp_path / "run" / "checkpoints"
    for step in (100, 200, 300, 20, 50):
        _checkpoint(root, step)
    (root / "latest").write_text("step_00000050\n")
    (root / ".partial-step_00000060-0a1b2c3d").mkdir()  # a save interrupted before it was declared
    Checkpointer(tmp_path / "run", keep=1, spec_digest="x")._prune()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000050", "step_00000100", "step_00000200",
                                                      "step_00000300"]


SAVE_AND_RECORD_FSYNCS = """
import json, os, sys, torch
from pathlib import Path
from vilscale.orchestration.config import spec_from_dict
from vilscale.orchestration.training.distributed import init_distributed
from vilscale.orchestration.training.engine import build_engine, build_model
from vilscale.orchestration.checkpoint import Checkpointer
from vilscale.orchestration.checkpoint import store

events = []
real_fsync = os.fsync
def fsync(fd):
    events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    return real_fsync(fd)
os.fsync = fsync
real_write = store.atomic_write_text
def atomic_write_text(path, text, **kwargs):
    events.append(("write", str(path)))
    return real_write(path, text, **kwargs)
store.atomic_write_text = atomic_write_text

init_distributed("cpu")
run_dir = Path(sys.argv[1])
spec = spec_from_dict({"run_dir": str(run_dir), "data": {},
                       "model": {"name": "vil_nano", "img_size": 32, "window": 2, "num_classes": 10},
                       "train": {"zero_stage": 2, "precision": "fp32", "device": "cpu", "micro_batch": 4}})
torch.manual_seed(0)
engine, _ = build_engine(spec, build_model(spec), world_size=1, device=torch.device("cpu"))
ema = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
final = Checkpointer(run_dir, keep=2, spec_digest="x").save(engine, step=3, client_state={"step": 3}, ema=ema)
print(json.dumps({"events": events, "files": sorted(str(p.relative_to(final)) for p in final.rglob("*")
                                                      if p.is_file())}))
"""


@pytest.mark.slow  # a DeepSpeed engine built in a subprocess: 47 s in the quick tier, 70 s in the full run
def test_every_checkpoint_file_is_on_disk_before_the_manifest_declares_it(tmp_path):
    """#36 scenario 5. Before, only the manifest and `latest` were fsynced: DeepSpeed's files, the client states and
    the EMA could still sit in the page cache when `latest` named them (with keep_checkpoints 1, a node crash then
    left a `latest` whose files were empty). Now each rank fsyncs every file and directory of the checkpoint, under a
    partial name, before rank 0 writes the manifest and renames the directory into place."""
    import subprocess
    import sys

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1",
           "RANK": "0", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SAVE_AND_RECORD_FSYNCS, str(tmp_path / "run")], capture_output=True,
                            text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    events = [tuple(event) for event in report["events"]]
    manifest_at = next(i for i, (kind, path) in enumerate(events) if kind == "write" and path.endswith("manifest.json"))
    before = {Path(path) for kind, path in events[:manifest_at] if kind == "fsync"}
    partial = next(path.parent for path in before if path.parent.name.startswith(".partial-step_00000003-"))
    files = [name for name in report["files"] if name != "manifest.json"]
    assert {"client_rank0.pt", "ema.safetensors", "mp_rank_00_model_states.pt"} <= set(files), files
    missing = [name for name in files if partial / name not in before]
    assert not missing, f"not fsynced before the manifest: {missing}"
    assert partial in before  # the directory's entries too


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
