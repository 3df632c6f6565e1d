"""Local multi-process runs through torchrun's elastic agent (`torch.distributed.run`).

`train_local` starts N ranks on this machine with ``elastic_launch`` (the API behind ``torchrun``:
c10d rendezvous on a port the agent binds itself, so there is no free-port race, worker environment,
signal forwarding, stopping the survivors when a rank dies). The restart policy stays ours: torchrun's
``--max-restarts`` restarts whatever the exit code, but an error no restart can fix (a bad spec, bad
data, repeated non-finite losses; see `exit_codes`) must stop the run at once. So the agent runs with
``max_restarts=0`` and this module relaunches the group, from the latest checkpoint, only after a
restartable failure, up to ``launcher.max_restarts`` times.

The launcher holds the run dir's lock for the whole run, restarts included; its ranks know it through
``VILSCALE_RUN_LOCK_HELD``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from vilscale.orchestration.checkpoint.rundir import LOCK_HELD_ENV
from vilscale.orchestration.config import JobSpec
from vilscale.orchestration.launch.exit_codes import EXIT_FAILED, EXIT_OUT_OF_MEMORY, NOT_RESTARTABLE

RANK_MODULE = "vilscale.orchestration.launch.rank"


@dataclass(frozen=True, slots=True)
class LocalResult:
    summary: dict | None
    """The run's summary; None when it failed (the reason is already printed)."""
    code: int
    """0, or the exit code the failed run ends with (a rank's own code when no restart could fix it)."""


def train_local(spec: JobSpec, spec_path: Path, nproc: int, *, lease_token: str, max_restarts: int | None = None
                ) -> LocalResult:
    """Run the job (its resolved spec at ``spec_path``) on ``nproc`` local processes, under the run dir's lease whose
    token is ``lease_token`` (held by this process: the ranks fence their writes on it)."""
    restarts = spec.launcher.max_restarts if max_restarts is None else max_restarts
    env = {LOCK_HELD_ENV: lease_token, **spec.launcher.env}
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    oom = OomKills()
    for attempt in range(restarts + 1):
        oom_kills = oom.count()
        code = _run_group(spec_path, nproc, env)
        if code == -9 and oom_kills is not None and (oom.count() or 0) > oom_kills:
            _say(f"a rank was killed by the kernel's out-of-memory killer (counted in {oom.where}); not restarting: "
                 f"the same run would again. Lower train.micro_batch (now {spec.train.micro_batch}), "
                 f"data.num_workers (now {spec.data.num_workers}) or data.batches_ahead (now "
                 f"{spec.data.batches_ahead}), run fewer ranks per machine, or stop what else uses its memory")
            return LocalResult(None, EXIT_OUT_OF_MEMORY)
        if code == 0:
            summary_path = Path(spec.run_dir) / "summary.json"
            return LocalResult(json.loads(summary_path.read_text()) if summary_path.is_file() else {}, 0)
        if code in NOT_RESTARTABLE:  # a restart cannot fix these; the rank printed why
            _say(f"a rank stopped with exit code {code} ({NOT_RESTARTABLE[code]}); not restarting")
            return LocalResult(None, code)
        if attempt < restarts:
            why = (" (SIGABRT: NCCL's watchdog aborts a rank whose collective timed out or whose peer was lost)"
                   if code == -6 else "")
            _say(f"a rank failed (exit code {code}{why}); restarting from the latest checkpoint "
                 f"({attempt + 1}/{restarts})")
    _say(f"giving up after {restarts} restarts")
    return LocalResult(None, EXIT_FAILED)


class OomKills:
    """Counts the kernel OOM killer's kills of this launch: in its own memory cgroup (which the ranks inherit:
    cgroup v2's ``memory.events``, v1's ``memory.oom_control``), so another job's OOM kill on a shared node is not
    taken for ours; the host-wide count (``/proc/vmstat``) only where no cgroup can be read, which ``where`` says."""

    def __init__(self, proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")):
        self.path, self.field, self.where = Path("/proc/vmstat"), "oom_kill", "the host (no memory cgroup readable)"
        try:
            lines = proc_cgroup.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            number, controllers, group = line.split(":", 2)
            candidates = []
            if number == "0" and controllers == "":  # cgroup v2 (unified)
                candidates = [root / group.lstrip("/") / "memory.events", root / "unified" / group.lstrip("/") /
                              "memory.events"]
            elif "memory" in controllers.split(","):  # cgroup v1's memory controller
                candidates = [root / "memory" / group.lstrip("/") / "memory.oom_control"]
            for candidate in candidates:
                if self._read(candidate, "oom_kill") is not None:
                    self.path, self.where = candidate, f"its memory cgroup {candidate.parent}"
                    return

    @staticmethod
    def _read(path: Path, field: str) -> int | None:
        try:
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == field and value.strip().isdigit():
                    return int(value)
        except OSError:
            pass
        return None

    def count(self) -> int | None:
        """Kills so far where this counter looks, None where unknown."""
        return self._read(self.path, self.field)



def _run_group(spec_path: Path, nproc: int, env: dict[str, str]) -> int:
    """One attempt: the agent runs the ranks until all succeed (0) or one fails (the root cause's code)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"vilscale-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn", local_addr="127.0.0.1", shutdown_timeout=10)
    with _quiet_agent(), _environment(env):
        try:
            elastic_launch(config, sys.executable)("-m", RANK_MODULE, str(spec_path))
        except ChildFailedError as error:
            codes = [failure.exitcode for failure in error.failures.values()]
            # The root cause outranks the survivors that only lost their peer.
            return next((code for code in codes if code in NOT_RESTARTABLE), error.get_first_failure()[1].exitcode)
    return 0


@contextlib.contextmanager
def _environment(extra: dict[str, str]):
    """The agent passes this process's environment to the ranks: add ``extra`` for the duration."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_agent():
    """The agent logs every worker it stops and a report per failure; the ranks and this module already say
    what matters in one line each."""
    loggers = [logging.getLogger(name) for name in logging.root.manager.loggerDict
               if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.launcher")]
    loggers.append(logging.getLogger("torch.distributed.elastic"))
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _say(message: str) -> None:
    print(f"[vilscale] {message}", file=sys.stderr, flush=True)
