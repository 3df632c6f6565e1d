"""The run directory: who owns it, what it trains, and its id.

A run dir holds one run for its whole life: ``spec.yaml`` (the resolved spec it trains),
``checkpoints/``, ``metrics.jsonl``, ``prometheus_targets.json``, ``run_id`` and logs. Two rules keep it
trustworthy:

- **One owner at a time.** A live run holds an exclusive POSIX record lock (``fcntl.lockf``) on
  ``RUN_DIR/.lock``. The kernel (or, on NFS, the lock manager) drops it when the holder dies, so a
  crashed run never leaves a stale lock; a second launch into the same run dir is refused with the
  owner's host, pid and start time, which the holder writes into the lock file.
- **One spec.** Relaunching into a run dir resumes it, so the new spec may differ from ``spec.yaml``
  only in execution keys (where and how it runs); keys that change what is trained are refused, unless
  they are adjustable and the user passes ``--allow-spec-change`` (see ``config.spec.key_kind``).

Both are checked before anything is written, so a launch that is refused leaves the run dir untouched.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

import yaml

from vilscale.files import atomic_write_text
from vilscale.orchestration.config import JobSpec, SpecError, spec_from_dict
from vilscale.orchestration.config.spec import spec_changes

SPEC_FILE = "spec.yaml"
LOCK_FILE = ".lock"
RUN_ID_FILE = "run_id"
# Set by a launcher that holds the lock for its ranks (local processes, a Ray driver): rank 0 then does
# not try to take it again.
LOCK_HELD_ENV = "VILSCALE_RUN_LOCK_HELD"


class RunDirError(SpecError):
    """The run dir cannot be used as asked (owned by another run, a file, a changed spec); nothing was
    written. A user's mistake: exit code 2, never restarted."""


def check_usable(run_dir: Path) -> None:
    """RunDirError if ``run_dir`` is a file, or a non-empty directory that is not a vilscale run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir={str(run_dir)!r} is a file, not a directory; give a directory for the run "
                          "(it is created if missing)")
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE) if run_dir.is_dir() else []
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
        raise RunDirError(f"{path} is unreadable ({error}); restore it or start a new run_dir") from None
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
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / SPEC_FILE
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    if not target.is_file() or target.read_text() != text:  # an unchanged spec is left as it is
        atomic_write_text(target, text, durable=False)
    return target


def read_or_create_run_id(run_dir: Path) -> str:
    """The run's id (``<dir name>-<8 hex>``), created once and kept across restarts and relaunches."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    value = f"{Path(run_dir).name}-{uuid.uuid4().hex[:8]}"
    atomic_write_text(path, value + "\n", durable=False)
    return value


class RunLock:
    """The exclusive lock of a run dir, held for a run's life (see the module docstring).

    POSIX record locks belong to the process and are dropped when the process closes ANY descriptor of
    the file, so the holder keeps its one descriptor open and never opens the lock file again.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, *, wait_s: float = 0.0, what: str = "") -> RunLock:
        """Take the lock (creating the run dir), waiting up to ``wait_s`` for a previous holder to end.

        Raises RunDirError naming the holder when another live process keeps it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunDirError(f"run dir {self.path.parent} is in use by another run ({holder}); wait for it to "
                                      "end (or stop it), or give this launch another run_dir") from None
                time.sleep(0.5)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "what": what or "vilscale"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        holder = {}
    if not holder:
        return "owner unknown"
    what = holder.get("what", "vilscale")
    return f"{what}, pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def lock_holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock right now (None if nobody), without taking it for long.

    Never call this in a process that holds the lock itself: closing the probe's descriptor would drop it.
    """
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return _read_holder(fd)
            raise
        return None  # free; closing below drops the probe's lock at once
    finally:
        os.close(fd)
