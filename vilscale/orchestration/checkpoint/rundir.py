"""The run directory: who owns it, what it trains, and its id.

A run dir holds one run for its whole life: ``spec.yaml`` (the resolved spec it trains),
``checkpoints/``, ``metrics.jsonl``, ``prometheus_targets.json``, ``run_id`` and logs. Two rules keep it
trustworthy:

- **One owner at a time.** A live run owns ``RUN_DIR/.lock.lease``, a file it creates exclusively
  (written under a private name, then hard-linked into place) holding its host, pid, scheduler job,
  start time and a heartbeat that a daemon thread rewrites (and fsyncs) every ``lease / 6`` s. A second
  launch is refused naming that owner, unless the owner is gone, which it tells by one of:

  - its heartbeat stopped: the value did not change for ``LEASE_S`` (or ``VILSCALE_LOCK_LEASE_S``) seconds as
    measured on the launcher's own monotonic clock (it died, or its node was lost). The writer's timestamp is
    never compared with this machine's clock to declare it dead (clocks of two nodes may disagree by more than a
    lease); it only decides whether the launcher starts watching, so a lease that looks fresh by its writer's
    clock is refused at once;
  - the owner is an older incarnation of the same scheduler job: a requeued SLURM job keeps its
    ``SLURM_JOB_ID`` with a higher ``SLURM_RESTART_COUNT``, and a supervisor's relaunch inside the allocation runs
    a later ``SLURM_STEP_ID``; the owner is gone or on its way out. Two live launches of one job (two `vilscale
    train` in one salloc) are of one incarnation: the second is refused. A Ray job is the same job as its own
    submission id;
  - the owner ran on this host and held the POSIX record lock (``fcntl.lockf``) on ``RUN_DIR/.lock``,
    which every owner also takes where the filesystem has record locks, and that lock is now free: the
    kernel dropped it, so the owner died. A crash on one machine is taken over at once.

  The new owner removes the old lease, creates its own and prints one line naming the previous owner.
  Removal is a compare-and-delete: a process removes a lease only while it holds the exclusively created
  marker ``.lock.lease.break-<its token>.<n>`` and has checked that the lease is still the one it judged,
  so two launchers never both take over one stale lease, and an owner that releases late never removes
  its successor's lease (its heartbeat sees the change and says so, once).

  Why the lease decides and the record lock only helps: record locks are missing where clusters keep
  run dirs (Lustre without ``flock`` fails with ENOSYS or ENOLCK), and on NFSv3 a lost node's lock
  outlives the node until it reboots. A kernel or NFS lock cannot be broken, so a requeued job that
  waited for one would never run; the lease works wherever hard links do, and is broken as above
  (the lost node's record lock stays behind, ignored). An owner frozen longer than its lease (``scontrol suspend``,
  Ctrl-Z, an NFS client hung) loses the run dir, and it is fenced when it wakes: every write that changes what a
  resume would read (``fence``: checkpoint directories, manifest, ``latest``, pruning, ``spec.yaml``, ``run_id``,
  ``summary.json``) first checks that the lease is still this launch's, and stops the process with
  ``RunDirLost`` (exit 6, never restarted) when it is not.
- **One spec.** Relaunching into a run dir resumes it, so the new spec may differ from ``spec.yaml``
  only in execution keys (where and how it runs); keys that change what is trained are refused, unless
  they are adjustable and the user passes ``--allow-spec-change`` (see ``config.spec.key_kind``).

Both are checked before anything is written, so a launch that is refused leaves the run dir untouched.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

from vilscale.files import atomic_write_text
from vilscale.orchestration.config import JobSpec, SpecError, spec_from_dict
from vilscale.orchestration.config.spec import spec_changes

SPEC_FILE = "spec.yaml"
LOCK_FILE = ".lock"
LEASE_FILE = LOCK_FILE + ".lease"
LEASE_S = 30.0
"""How long an owner's heartbeat stays valid: a launch waiting on a lost owner waits this long at most."""
LEASE_ENV = "VILSCALE_LOCK_LEASE_S"
HEARTBEATS_PER_LEASE = 6
_NO_RECORD_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})
_LEASE_BYTES = 1024
# run dir -> (pid of the process holding its lock here, its lease token); a forked child holds none
_HELD_HERE: dict[str, tuple[int, str]] = {}
RUN_ID_FILE = "run_id"
# Set by a launcher that holds the lock for its ranks (local processes, a Ray driver) to its lease's token: rank 0 then
# does not try to take it again, and fences its writes on that token.
LOCK_HELD_ENV = "VILSCALE_RUN_LOCK_HELD"


class RunDirError(SpecError):
    """The run dir cannot be used as asked (owned by another run, a file, a changed spec); nothing was
    written. A user's mistake: exit code 2, never restarted."""


class RunDirLost(RuntimeError):
    """Another launch took the run dir over while this process held it (it was paused, suspended or cut off longer
    than its lease): this process must not write to it again. Exit code 6, never restarted."""


def fence(run_dir: Path, doing: str) -> None:
    """RunDirLost unless the run dir's lease is still the one this process's launch holds; call it right before
    every write that changes what a resume reads. A process that holds no lease for ``run_dir`` (a tool, a test)
    is not fenced."""
    token = _our_token(Path(run_dir))
    if token is None:
        return
    current = _read_lease(Path(run_dir) / LEASE_FILE)
    if current is not None and current.get("token") == token:
        return
    now = f"now {_describe(current)}" if current is not None else "its lease is gone"
    raise RunDirLost(f"run dir {run_dir} was taken over by another launch ({now}) while this one was paused, "
                     "suspended or cut off for longer than its lease; this process stops before "
                     f"{doing}, so nothing it writes replaces the new owner's work")


def _our_token(run_dir: Path) -> str | None:
    """The lease token this process writes under: its own lock's, or the one its launcher passed in LOCK_HELD_ENV."""
    held = _HELD_HERE.get(str(run_dir.resolve()))
    if held is not None and held[0] == os.getpid():
        return held[1]
    token = os.environ.get(LOCK_HELD_ENV, "")
    return token if len(token) == 32 else None  # "1": a launcher of an older vilscale, which passed no token


def check_usable(run_dir: Path) -> None:
    """RunDirError if ``run_dir`` is a file, or a non-empty directory that is not a vilscale run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir={str(run_dir)!r} is a file, not a directory; give a directory for the run "
                          "(it is created if missing)")
    # the lock's files (.lock, .lock.lease, removal markers) may outlive a launch that wrote nothing else
    entries = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(LOCK_FILE)) if run_dir.is_dir() else []
    if entries and SPEC_FILE not in entries:
        raise RunDirError(f"run_dir={str(run_dir)!r} is not empty and holds no vilscale run (no {SPEC_FILE}; it has "
                          f"{entries[:5]}); give an empty or new directory")


def stored_spec(run_dir: Path) -> dict | None:
    """The plain spec of the run in ``run_dir`` (its spec.yaml), None when there is none."""
    path = Path(run_dir) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        from vilscale.orchestration.config.loading import yaml_problem

        problem = yaml_problem(error) if isinstance(error, yaml.YAMLError) else str(error)
        raise RunDirError(f"{path} is unreadable ({problem}); restore it or start a new run_dir") from None
    if not isinstance(raw, dict):
        raise RunDirError(f"{path} is not a job spec; restore it or start a new run_dir")
    return raw


def load_run_spec(run_dir: Path) -> JobSpec:
    """The `JobSpec` a run dir was trained with (for eval/export); RunDirError when it is not a run dir."""
    raw = stored_spec(Path(run_dir))
    if raw is None:
        raise RunDirError(f"{run_dir} is not a vilscale run directory (no {SPEC_FILE}); give the run_dir of a job")
    return spec_from_dict(raw)


def check_resume_compatible(spec: JobSpec, *, allow_change: bool = False) -> list[tuple[str, object, object]]:
    """RunDirError when ``spec`` would resume its run dir with a change to what is trained.

    Returns the accepted changes (adjustable keys, with ``allow_change``), for the launcher to report.
    """
    stored = stored_spec(Path(spec.run_dir))
    if stored is None:
        return []
    changes = spec_changes(stored, spec.to_dict())
    if not changes:
        return []
    from vilscale.orchestration.config.spec import key_kind

    described = "; ".join(f"{key}: {before!r} -> {after!r}" for key, before, after in changes[:8])
    fixed = [key for key, _, _ in changes if key_kind(key) == "fixed"]
    new_run = (f"To train this spec from scratch, use a new run_dir (e.g. --set run_dir={spec.run_dir}-2); to start "
               f"from this run's weights, use a new run_dir with --set model.init_weights={spec.run_dir}")
    if fixed:
        raise RunDirError(f"{spec.run_dir} holds a run trained with a different spec ({described}); "
                          f"{', '.join(fixed)} cannot change in a resumed run. {new_run}")
    if not allow_change:
        raise RunDirError(f"{spec.run_dir} holds a run trained with a different spec ({described}). These keys may "
                          f"change when the run resumes: pass --allow-spec-change to accept them. {new_run}")
    return changes


def write_spec(spec: JobSpec) -> Path:
    """Write the resolved spec into its run dir (atomically)."""
    run_dir = Path(spec.run_dir)
    make_run_dir(run_dir, spec.launcher.run_dir_mode)
    target = run_dir / SPEC_FILE
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    if not target.is_file() or target.read_text() != text:  # an unchanged spec is left as it is
        fence(run_dir, "rewriting spec.yaml")
        atomic_write_text(target, text, durable=False)
    return target


def make_run_dir(run_dir: Path, mode: str = "0700") -> None:
    """Create ``run_dir`` (and missing parents) with ``mode`` (``launcher.run_dir_mode``; owner-only by default: the
    supervisor and `submit --wait` unpickle files from it). An existing directory keeps its mode."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir(mode=int(mode, 8))
    except FileExistsError:  # another launcher made it meanwhile
        return
    os.chmod(run_dir, int(mode, 8))  # mkdir's mode is filtered by the umask


def read_or_create_run_id(run_dir: Path) -> str:
    """The run's id (``<dir name>-<8 hex>``), created once and kept across restarts and relaunches."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    value = f"{Path(run_dir).name}-{uuid.uuid4().hex[:8]}"
    fence(Path(run_dir), "writing the run's id")
    atomic_write_text(path, value + "\n", durable=False)
    return value


class RunLock:
    """The exclusive ownership of a run dir, held for a run's life (see the module docstring).

    POSIX record locks belong to the process and are dropped when the process closes ANY descriptor of
    ``.lock``, so the holder keeps its one descriptor open and never opens that file again: a process takes
    a run dir's lock once (a second ``acquire`` is a RuntimeError) and ``lock_holder`` does not probe there.

    Args:
        run_dir: the run directory (created by ``acquire``).
        lease_s: how long a heartbeat stays valid; default ``VILSCALE_LOCK_LEASE_S``, else ``LEASE_S``.
        mode: the mode a run dir that does not exist yet is created with (``launcher.run_dir_mode``).
    """

    def __init__(self, run_dir: Path, *, lease_s: float | None = None, mode: str = "0700"):
        self.path = Path(run_dir) / LOCK_FILE
        self.lease_path = Path(run_dir) / LEASE_FILE
        self.lease_s = _lease_seconds(lease_s)
        self.mode = mode
        self._watched: dict[str, tuple[float, float]] = {}  # lease token -> (heartbeat seen, monotonic time seen)
        self._record_fd: int | None = None
        self._lease_fd: int | None = None
        self._lease: dict = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lost_said = False
        self._held_key: str | None = None

    @property
    def token(self) -> str:
        """This holder's lease token (what its ranks fence their writes on, through LOCK_HELD_ENV)."""
        return self._lease["token"]

    def acquire(self, *, wait_s: float = 0.0, what: str = "") -> RunLock:
        """Take the run dir (creating it), waiting up to ``wait_s`` for a previous owner to end.

        Raises RunDirError naming the owner while it is alive and not an older incarnation of this scheduler job. A
        lease whose heartbeat looks old by its writer's clock is watched (up to the lease) before it is taken: its
        value must stop changing on this machine's monotonic clock, so a writer whose clock lags is not declared
        dead while it beats.
        """
        if _held_here(self.path.parent):
            raise RuntimeError(f"this process already holds the lock of run dir {self.path.parent}; take it once "
                               "and keep that RunLock (a second one would drop the first's record lock)")
        make_run_dir(self.path.parent, self.mode)
        deadline = time.monotonic() + wait_s
        while (owner := self._try_acquire(what)) is not None:
            description, alive = owner
            if alive and time.monotonic() >= deadline:
                raise RunDirError(f"run dir {self.path.parent} is in use by another run ({description}); wait for it "
                                  f"to end (or stop it; a run that died is taken over once its heartbeat has not "
                                  f"changed for {self.lease_s:g} s), or give this launch another run_dir")
            time.sleep(min(0.5, self.lease_s / HEARTBEATS_PER_LEASE / 2))
        return self

    def release(self) -> None:
        """Stop the heartbeat, remove the lease if it is still ours, drop the record lock."""
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join()
            self._heartbeat = None
        if self._lease_fd is not None:
            try:
                if not _remove_lease(self.lease_path, self._lease):
                    self._say_lost(_read_lease(self.lease_path))
            except OSError as error:
                _log(f"run dir {self.path.parent}: could not remove its lease ({error}); the next launch takes it "
                     f"over when its heartbeat is {self.lease_s:g} s old")
            finally:
                os.close(self._lease_fd)
                self._lease_fd = None
        if self._record_fd is not None:
            os.close(self._record_fd)  # closing drops the record lock
            self._record_fd = None
        if self._held_key is not None:
            _HELD_HERE.pop(self._held_key, None)
            self._held_key = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _try_acquire(self, what: str) -> tuple[str, bool] | None:
        """One attempt: None when the run dir is now ours, else (its owner's description, whether the owner is known
        to be alive: False while its heartbeat is being watched)."""
        record_fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        record_lock = _try_record_lock(record_fd)
        if not record_lock:
            os.close(record_fd)
            record_fd = None
        mine = _new_lease(what, self.lease_s, record_lock=record_lock)
        owner, alive, taken_over = "owner unknown", True, ""
        for _ in range(10):  # the lease may change while we look (a launcher racing us): look again
            lease_fd = _create_lease(self.lease_path, mine)
            if lease_fd is not None:
                self._hold(record_fd, lease_fd, mine)
                if taken_over:
                    _log(f"run dir {self.path.parent}: took over its lock from {taken_over}")
                return None
            current = _read_lease(self.lease_path)
            if current is None:
                continue  # released meanwhile
            owner = _describe(current)
            reason = _takeover_reason(current, mine, record_lock_free=record_lock)
            if reason is None:
                alive, reason = self._watch(current)
            if reason is None:
                break
            if _remove_lease(self.lease_path, current):
                taken_over = f"{owner}: {reason}"
            else:
                time.sleep(0.05)  # another launcher is judging or replacing this lease
        if record_fd is not None:
            os.close(record_fd)
        return owner, alive

    def _watch(self, lease: dict) -> tuple[bool, str | None]:
        """(alive, takeover reason) of a lease no instant rule settles, from watching its heartbeat on this machine's
        monotonic clock: dead once the value has not changed for the lease; alive as soon as it changes, or while
        it is fresh by its writer's clock (a lease that looks old by it is watched before anything is decided, so a
        live writer whose clock lags this machine's is not declared dead)."""
        lease_s = lease.get("lease_s") or self.lease_s
        key = lease.get("token") or f"inode{lease['inode']}"
        seen = self._watched.get(key)
        now = time.monotonic()
        if seen is None or seen[0] != lease["heartbeat"]:
            self._watched[key] = (lease["heartbeat"], now)
            if seen is not None:  # it changed while watched: the owner beats
                return True, None
        elif now - seen[1] >= lease_s:
            return False, f"its heartbeat stopped (unchanged for {now - seen[1]:.0f} s here; lease {lease_s:g} s)"
        return time.time() - lease["heartbeat"] <= lease_s, None

    def _hold(self, record_fd: int | None, lease_fd: int, lease: dict) -> None:
        self._record_fd, self._lease_fd, self._lease = record_fd, lease_fd, lease
        self._stop, self._lost_said = threading.Event(), False
        self._held_key = str(self.path.parent.resolve())
        _HELD_HERE[self._held_key] = (os.getpid(), lease["token"])
        self._heartbeat = threading.Thread(target=self._beat, name="vilscale-run-dir-heartbeat", daemon=True)
        self._heartbeat.start()

    def _say_lost(self, current: dict | None) -> bool:
        """Whether ``current`` (the lease now) is no longer ours; the first time, say so in one line."""
        if current is not None and current.get("token") == self._lease["token"]:
            return False
        if not self._lost_said:
            now = f" (now {_describe(current)})" if current else ""
            _log(f"run dir {self.path.parent}: this process no longer holds its lock{now}")
            self._lost_said = True
        return True

    def _beat(self) -> None:
        """Renew the heartbeat until released; stop (saying so once) when the lease is no longer ours."""
        lease, failing = self._lease, False
        while not self._stop.wait(self.lease_s / HEARTBEATS_PER_LEASE):
            try:
                current = _read_lease(self.lease_path)
                if self._say_lost(current):
                    return
                lease["heartbeat"] = time.time()
                _write_lease(self._lease_fd, lease)
                failing = False
            except OSError as error:
                if not failing:
                    _log(f"run dir {self.path.parent}: cannot renew its lock's heartbeat ({error}); another launch "
                         f"may take the run dir over if this lasts {self.lease_s:g} s")
                failing = True


def lock_holder(run_dir: Path) -> str | None:
    """Who owns ``run_dir``, as a launch now would be refused naming it; None when a launch would get it."""
    run_dir = Path(run_dir)
    current = _read_lease(run_dir / LEASE_FILE)
    if current is None:
        return None
    if _held_here(run_dir):
        return _describe(current)  # probing would drop this process's own record lock
    record_lock_free = False
    if current.get("record_lock") and (run_dir / LOCK_FILE).is_file():
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
        try:
            record_lock_free = _try_record_lock(fd)
        finally:
            os.close(fd)  # drops the probe's record lock at once
    mine = {"job": _scheduler_job(), "incarnation": _incarnation(), "host": socket.gethostname(),
            "lease_s": _lease_seconds(None)}
    if _takeover_reason(current, mine, record_lock_free=record_lock_free):
        return None
    lease_s = current.get("lease_s") or mine["lease_s"]
    # fresh by its writer's clock: held; else a launch watches it (RunLock.acquire) and decides then
    return _describe(current) if time.time() - current["heartbeat"] <= lease_s else None


def _held_here(run_dir: Path) -> bool:
    held = _HELD_HERE.get(str(Path(run_dir).resolve()))
    return held is not None and held[0] == os.getpid()


def _lease_seconds(lease_s: float | None) -> float:
    """``lease_s`` if given, else ``VILSCALE_LOCK_LEASE_S``, else ``LEASE_S``."""
    if lease_s is not None:
        if not (lease_s > 0 and math.isfinite(lease_s)):
            raise ValueError(f"lease_s={lease_s!r} must be a positive number of seconds")
        return float(lease_s)
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise RunDirError(f"{LEASE_ENV}={raw!r} is not a positive number of seconds; unset it (the default is "
                          f"{LEASE_S:g}) or give one, e.g. {LEASE_ENV}=60")
    return value


def _scheduler_job() -> str | None:
    """The scheduler job this process runs in ("SLURM job 12", "Ray job raysubmit_ab"), None outside one.

    A requeued SLURM job keeps its SLURM_JOB_ID; a Ray job's driver gets its submission id from the Ray job
    supervisor (in RAY_JOB_CONFIG_JSON_ENV_VAR), Ray's workers get RAY_JOB_ID.
    """
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        return f"SLURM job {env['SLURM_JOB_ID']}"
    try:
        submission = json.loads(env.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")["metadata"]["job_submission_id"]
    except (ValueError, KeyError, TypeError):
        submission = None
    ray_job = submission or env.get("RAY_JOB_ID")
    return f"Ray job {ray_job}" if ray_job else None


def _incarnation() -> list[int] | None:
    """Which incarnation of its SLURM job this process is: [SLURM_RESTART_COUNT, SLURM_STEP_ID] (-1 for no step, as
    in a batch script or a shell of salloc); None outside SLURM."""
    env = os.environ
    if not env.get("SLURM_JOB_ID"):
        return None

    def number(name: str) -> int:
        value = env.get(name, "")
        return int(value) if value.isdigit() else -1

    return [max(0, number("SLURM_RESTART_COUNT")), number("SLURM_STEP_ID")]


def _try_record_lock(fd: int) -> bool:
    """Take the record lock on ``fd`` without waiting; False when another process (or a lost NFS node) keeps it,
    or when the filesystem has no record locks."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN) or error.errno in _NO_RECORD_LOCKS:
            return False
        raise


def _new_lease(what: str, lease_s: float, *, record_lock: bool) -> dict:
    now = time.time()
    return {"what": (what or "vilscale")[:200], "host": socket.gethostname(), "pid": os.getpid(),
            "job": _scheduler_job(), "incarnation": _incarnation(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
            "heartbeat": now, "lease_s": lease_s, "record_lock": record_lock, "token": uuid.uuid4().hex}


def _write_lease(fd: int, lease: dict) -> None:
    """Rewrite the lease in place, at a fixed size (a reader never sees a shorter file with a stale tail), and
    fsync it, so that other NFS clients see the heartbeat."""
    text = json.dumps({key: value for key, value in lease.items() if key != "inode"})
    os.pwrite(fd, text.ljust(_LEASE_BYTES).encode(), 0)
    os.fsync(fd)


def _create_lease(path: Path, lease: dict) -> int | None:
    """Create the lease file holding ``lease``; its descriptor, or None when a lease exists.

    It is written under a private name and linked into place, so it appears whole, and only once: like an
    exclusive create, a link fails when the name exists.
    """
    private = path.with_name(f"{path.name}.new-{lease['token']}")
    fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    linked = False
    try:
        _write_lease(fd, lease)
        try:
            os.link(private, path)
        except FileExistsError:
            pass
        except OSError as error:
            raise RunDirError(f"run dir {path.parent} is on a filesystem without hard links ({error}), which its "
                              "lock needs; give a run_dir on a POSIX filesystem (NFS, Lustre, GPFS, local)") from None
        # the link count says whether it is ours, not the error: NFS may retry a LINK and report EEXIST for it
        linked = os.fstat(fd).st_nlink == 2
    finally:
        private.unlink(missing_ok=True)
        if not linked:
            os.close(fd)
    if not linked:
        return None
    lease["inode"] = os.fstat(fd).st_ino
    return fd


def _read_lease(path: Path) -> dict | None:
    """The lease in ``path`` with its file's inode, None when there is none. An unreadable one (a torn write, or
    the empty file a crashed machine leaves) has no owner and its file's mtime as heartbeat."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        status, raw = os.fstat(fd), os.pread(fd, 4 * _LEASE_BYTES, 0)
    finally:
        os.close(fd)
    try:
        lease = json.loads(raw.decode())
        if not (isinstance(lease, dict) and isinstance(lease.get("heartbeat"), (int, float)) and lease.get("token")):
            raise ValueError("not a lease")
    except (ValueError, UnicodeDecodeError):
        lease = {"heartbeat": status.st_mtime}
    lease["inode"] = status.st_ino
    return lease


def _takeover_reason(lease: dict, mine: dict, *, record_lock_free: bool) -> str | None:
    """Why the owner of ``lease`` is gone without watching it (so that ``mine`` may replace it at once): an older
    incarnation of the same scheduler job, or a record lock the kernel dropped on this host; None otherwise."""
    if mine["job"] and lease.get("job") == mine["job"]:
        theirs, ours = lease.get("incarnation"), mine.get("incarnation")
        if ours is None or theirs is None:  # a Ray job, or a lease written by a vilscale that recorded none
            return f"the same {mine['job']} (a requeued job keeps its id)"
        if list(theirs) < list(ours):
            return (f"an older incarnation of the same {mine['job']} (requeue {theirs[0]}, step {theirs[1]}; this "
                    f"is requeue {ours[0]}, step {ours[1]})")
    if record_lock_free and lease.get("record_lock") and lease.get("host") == mine["host"]:
        return "it ended without releasing (its record lock is free)"
    return None


def _remove_lease(path: Path, judged: dict) -> bool:
    """Remove the lease in ``path`` if it still is the one ``judged`` was read from; False when it is not, or when
    another process is removing it now (a compare-and-delete, see the module docstring)."""
    marker = _claim_removal(path, judged)
    if marker is None:
        return False
    try:
        current = _read_lease(path)
        if current is None or current["inode"] != judged["inode"] or current.get("token") != judged.get("token"):
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        marker.unlink(missing_ok=True)


def _claim_removal(path: Path, judged: dict) -> Path | None:
    """Create the marker that entitles one process to remove the lease ``judged`` (exclusive create); None while
    another process holds it. A marker older than the lease belongs to a process that died holding it: the next
    generation is claimed instead."""
    name = judged.get("token") or f"inode{judged['inode']}"
    for generation in itertools.count():
        marker = path.with_name(f"{path.name}.break-{name}.{generation}")
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return marker
        except FileExistsError:
            try:
                age = time.time() - marker.stat().st_mtime
            except FileNotFoundError:
                return None  # its holder just finished: the lease has changed
            if age <= judged.get("lease_s", LEASE_S):
                return None


def _describe(lease: dict) -> str:
    if not lease.get("token"):
        return "owner unknown: its lease file is unreadable"
    job = f" ({lease['job']})" if lease.get("job") else ""
    age = max(0.0, time.time() - lease["heartbeat"])
    return (f"{lease.get('what')}, pid {lease.get('pid')} on {lease.get('host')}{job} since {lease.get('since')}, "
            f"heartbeat {age:.0f} s ago")


def _log(message: str) -> None:
    print(f"[vilscale] {message}", file=sys.stderr, flush=True)
