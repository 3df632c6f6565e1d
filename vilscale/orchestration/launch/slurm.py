"""SLURM through submitit: one task per GPU (or `cpu_workers_per_node` tasks per node on CPU), no
torchrun inside; `--backend local` runs the same task on this machine through submitit's local executor.

Each task exports the torch rendezvous variables (`TorchDistributedEnvironment().export()`) and calls
`run_worker(spec)`. `TrainTask` is a submitit `Checkpointable`. Before the time limit SLURM sends USR2 to the
batch step (`--signal=B:USR2@launcher.slurm.signal_lead_s`), and SIGTERM on preemption; the supervisor passes
either on to the tasks (`_Notices`): the ranks finish the step they are in, save a checkpoint at it together,
and stop; then rank 0 hands over to submitit, which pickles the task again and runs `scontrol requeue`, and
the new allocation resumes from that checkpoint (at most the step in flight is lost). An administrator's
`scontrol requeue`, or a node lost with the job (requeued by SLURM under ``--requeue``), restarts the job from
the latest checkpoint the same way. None of these count against `launcher.max_restarts`.

A rank that fails on its own (SIGKILLed, a driver crash, exit code 1) is restarted within the
allocation: the batch script runs `supervise` (this module as a program) instead of submitit's single
`srun`. It runs the tasks with `srun --kill-on-bad-exit` and, after a restartable failure
(`exit_codes`), runs them again, up to `launcher.max_restarts` times per job; the count lives in the
submitit folder, so requeues neither reset it nor use it up. An error no restart can fix (a code of
`NOT_RESTARTABLE` in a rank's result), or a kill that SLURM reports as the kernel's OOM killer, ends
the job with that code (exit 5 for the OOM killer). An allocation short of launcher.nodes (a node failed
under --no-kill) is requeued rather than launched on fewer nodes, a node named in two failures in a row is
excluded from the job, and a guard process requeues the job if the supervisor itself is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths, pickle_load

from vilscale.files import atomic_write_text
from vilscale.orchestration.checkpoint.rundir import make_run_dir, write_spec
from vilscale.orchestration.config import JobSpec, spec_from_dict
from vilscale.orchestration.launch.common import LaunchError, LogFollower, with_absolute_paths
from vilscale.orchestration.launch.exit_codes import EXIT_FAILED, EXIT_OUT_OF_MEMORY, NOT_RESTARTABLE, classify

SUPERVISOR_MODULE = "vilscale.orchestration.launch.slurm"
# The signals that are a preemption notice: SLURM's USR2 before the time limit (`--signal=B:USR2@lead`, to the batch
# step, which passes it on to the tasks), and the SIGTERM of preemption (PreemptMode=REQUEUE) or of a requeue.
NOTICE_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# Requeues at the time limit (submitit's max_num_timeout). A long run needs one allocation per launcher.time_min,
# so this is no budget: it only keeps a job that never gets past its start-up within an allocation from
# requeueing forever. Failures have their own budget, launcher.max_restarts.
MAX_TIME_LIMIT_REQUEUES = 1000
# Job states (`scontrol show job`) of a job that has not ended: it runs, or will run (again) without anyone's
# help. COMPLETING comes before a requeue as well as before the end: the state after it decides.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                 "RESIZING", "SIGNALING", "STAGE_OUT", "COMPLETING"}
# How srun reports a task that ended badly: "srun: error: NODE: task 3: Killed", "...: tasks 0-1: Exited with
# exit code 1" (the signal's strsignal text, or the exit code).
SRUN_TASK_END = re.compile(r"^srun: error: (\S+): tasks? ([\d,-]+): (.+)$")
SIGNAL_NAMES = {signal.strsignal(number): number.name for number in signal.Signals if signal.strsignal(number)}
# How SLURM says the kernel's OOM killer ended a task of the step (where it enforces memory with cgroups):
# srun's "task 1: Out Of Memory", slurmstepd's "Detected 1 oom-kill event(s) in StepId=...".
SRUN_OOM = re.compile(r"oom[-_]kill event|: Out Of Memory$")


class TaskFailed(RuntimeError):
    """A task ended with an error; the message is "[exit code N] LINE": its code (`exit_codes`) and the line the
    rank printed. submitit keeps only the traceback in the task's result; `_task_failure` reads both back."""


def _task_failure(traceback_text: str) -> tuple[int, str] | None:
    """(exit code, line) of the `TaskFailed` in a task's error result (submitit keeps only the traceback)."""
    match = re.search(r"TaskFailed: \[exit code (\d+)\] ([^\n]*)", traceback_text)
    return (int(match.group(1)), match.group(2)) if match else None


class TrainTask(submitit.helpers.Checkpointable):
    """The callable submitit runs in every task: rendezvous from SLURM's variables, then train."""

    def __init__(self, spec: dict):
        self.spec = spec
        """The job spec as plain data (`JobSpec.to_dict()`), with absolute paths."""

    def __call__(self) -> dict:
        spec = spec_from_dict(self.spec)
        os.environ.update(spec.launcher.env)
        # One compute thread per allocated core: with torch's default (every core of the node) per task,
        # the tasks of a node oversubscribe it (CPU steps ran many times slower on a 2-core node).
        os.environ.setdefault("OMP_NUM_THREADS", str(spec.launcher.cpus_per_task))
        import torch

        from vilscale.orchestration.training.loop import run_worker

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # submitit's USR2 handler requeues at once; ours only asks the loop to save first, then hands over.
        notice = threading.Event()
        requeue = signal.getsignal(signal.SIGUSR2)

        def preemption_notice(signum, frame):
            print(f"[vilscale] {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
                  "requeueing", file=sys.stderr, flush=True)
            notice.set()

        for notice_signal in NOTICE_SIGNALS:  # submitit's own handler ignores SIGTERM: the work since the last
            signal.signal(notice_signal, preemption_notice)  # checkpoint would be lost at SLURM's SIGKILL
        # LOCAL_RANK indexes the node's GPUs, so CUDA_VISIBLE_DEVICES stays as SLURM set it. A requeued
        # task inherits nothing from its previous allocation, but overwrite in case the batch script set any.
        environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                             overwrite=True)
        if environment.rank == 0:
            print(f"[vilscale] task {environment.rank}/{environment.world_size} on {environment.master_addr}:"
                  f"{environment.master_port}, requeue {os.environ.get('SLURM_RESTART_COUNT', '0')}",
                  file=sys.stderr, flush=True)
        try:
            summary = run_worker(spec, stop_requested=notice.is_set)
        except Exception as error:
            code, line = classify(error)
            if not line:
                raise
            print(f"vilscale: rank {environment.rank}: {line}", file=sys.stderr, flush=True)
            raise TaskFailed(f"[exit code {code}] {line}") from None
        if summary.get("preempted") and callable(requeue) and not _being_requeued(environment.rank):
            requeue(signal.SIGUSR2, None)  # rank 0: pickle this task again, `scontrol requeue`, exit
        return summary

    def checkpoint(self):
        """Called by submitit in rank 0 on USR2: resubmit this very task.

        The training state is already in the run dir (its `checkpoints/latest`), so the task carries
        nothing new; the requeued job resumes from there.
        """
        return submitit.helpers.DelayedSubmission(self)


def _being_requeued(rank: int) -> bool:
    """The job is already on its way back to the queue (the SIGTERM of `scontrol requeue` or of a preemption that
    requeues: its restart count has moved on, or it is no longer RUNNING): rank 0 saved and stops, without a second
    `scontrol requeue`, which SLURM would refuse. False when it cannot tell (rank 0 then requeues as usual)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if rank != 0 or not job_id:
        return False
    try:
        record = _job_record(job_id)
    except ControllerUnreachable:
        return False
    if record is None or (record.state == "RUNNING"
                          and record.restarts == int(os.environ.get("SLURM_RESTART_COUNT", "0"))):
        return False
    print(f"[vilscale] the job is being requeued already ({record.state.lower()}, requeue {record.restarts}): "
          "stopping at the saved step", file=sys.stderr, flush=True)
    return True


@dataclass(frozen=True, slots=True)
class SlurmNode:
    name: str
    cpus: int
    memory_mb: int
    gpus: int
    partitions: tuple[str, ...]
    default_partitions: tuple[str, ...]
    state: str

    @property
    def up(self) -> bool:
        """Takes jobs: not down, drained, failing or in maintenance (sinfo's short state, e.g. "idle", "mix")."""
        return not any(bad in self.state for bad in ("down", "drain", "fail", "maint"))


def _gpus_from_gres(gres: str) -> int:
    """GPUs in a sinfo GRES string such as "gpu:8", "gpu:a100:4(S:0-1)" or "gpu:2,shard:4"."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def slurm_nodes() -> list[SlurmNode]:
    """The cluster's nodes as `sinfo` reports them (one entry per node, partitions merged)."""
    try:
        result = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N|%c|%m|%G|%P|%t"],
                                capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError("sinfo not found on PATH; run `vilscale submit --backend slurm` on a SLURM login node") \
            from None
    if result.returncode != 0:
        raise LaunchError(f"sinfo failed (exit code {result.returncode}): {result.stderr.strip()}; is the SLURM "
                          "controller reachable from this machine (SLURM_CONF, munge)?")
    nodes: dict[str, dict] = {}
    for line in result.stdout.splitlines():
        name, cpus, memory, gres, partition, state = line.strip().split("|")
        node = nodes.setdefault(name, dict(name=name, cpus=int(cpus), memory_mb=int(memory.rstrip("+") or 0),
                                           gpus=_gpus_from_gres(gres), partitions=[], default_partitions=[],
                                           state=state))
        node["partitions"].append(partition.rstrip("*"))
        if partition.endswith("*"):
            node["default_partitions"].append(partition.rstrip("*"))
    return [SlurmNode(**{**n, "partitions": tuple(n["partitions"]),
                         "default_partitions": tuple(n["default_partitions"])}) for n in nodes.values()]


def check_slurm_fits(spec: JobSpec, nodes: list[SlurmNode]) -> None:
    """LaunchError naming the numbers when no set of `launcher.nodes` nodes can hold the job."""
    launcher = spec.launcher
    if launcher.partition:
        pool = [n for n in nodes if launcher.partition in n.partitions]
        where = f"partition {launcher.partition!r}"
        if not pool:
            known = sorted({p for n in nodes for p in n.partitions})
            raise LaunchError(f"launcher.partition={launcher.partition!r} does not exist; partitions: {known}")
    else:
        pool = [n for n in nodes if n.default_partitions]
        where = "the default partition"
    usable = [n for n in pool if n.up]
    cpus_needed = launcher.ranks_per_node * launcher.cpus_per_task
    mem_needed = launcher.mem_gb * 1024
    fitting = [n for n in usable if n.gpus >= launcher.gpus_per_node and n.cpus >= cpus_needed
               and n.memory_mb >= mem_needed]
    if len(fitting) >= launcher.nodes:
        return
    largest = max(usable, key=lambda n: (n.gpus, n.cpus, n.memory_mb), default=None)
    biggest = (f"the largest has {largest.gpus} GPU(s), {largest.cpus} CPU(s) and {largest.memory_mb} MB"
               if largest else "none is up")
    asked = (f"{launcher.nodes} node(s) with {launcher.gpus_per_node} GPU(s), {cpus_needed} CPU(s) "
             f"({launcher.ranks_per_node} rank(s) x {launcher.cpus_per_task} launcher.cpus_per_task)"
             + (f" and {mem_needed} MB" if mem_needed else ""))
    raise LaunchError(f"the job asks for {asked}, but {where} has {len(fitting)} such node(s) out of "
                      f"{len(usable)} up ({biggest}); lower launcher.nodes, gpus_per_node, cpu_workers_per_node "
                      "or cpus_per_task, or choose another launcher.partition")


def job_name(spec: JobSpec) -> str:
    """The SLURM job name of a run: ``vilscale-`` and the run dir's name, with anything sbatch would not read as one
    directive value (white space, newlines, quotes) replaced by ``_``."""
    return "vilscale-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(spec.run_dir).name)


def make_executor(spec: JobSpec, backend: str):
    """A submitit executor configured from the spec's launcher section (``backend``: "slurm" or "local")."""
    launcher = spec.launcher
    folder = Path(spec.run_dir) / "submitit"
    # submitit's batch script runs `PYTHON -u -m submitit.core._submit FOLDER`, by default under one `srun`;
    # without that srun (use_srun=False), and with the supervisor before the interpreter, it runs
    # `supervise`, which runs the tasks under srun itself and again after a failure.
    # `exec`: the guard is the batch shell itself, so the notice SLURM sends the batch step reaches it (bash, waiting
    # on a child, would die of USR2 and end the job).
    supervisor = (f"exec {shlex.quote(sys.executable)} -u -m {SUPERVISOR_MODULE} --folder {shlex.quote(str(folder))} "
                  f"--max-restarts {launcher.max_restarts} --nodes {launcher.nodes} --ntasks {launcher.world_size} "
                  f"--max-excluded-nodes {launcher.slurm.max_excluded_nodes} -- {shlex.quote(sys.executable)}")
    executor = submitit.AutoExecutor(folder=folder, cluster=backend, slurm_max_num_timeout=MAX_TIME_LIMIT_REQUEUES,
                                     slurm_python=supervisor)
    parameters = dict(name=job_name(spec), nodes=launcher.nodes,
                      tasks_per_node=launcher.ranks_per_node, gpus_per_node=launcher.gpus_per_node,
                      cpus_per_task=launcher.cpus_per_task, timeout_min=launcher.time_min)
    if backend == "slurm":
        site = launcher.slurm
        # An empty value is a bare flag (`--overcommit`); submitit writes True as one.
        additional = {option: value or True for option, value in site.additional.items()}
        if site.reservation:  # submitit 1.5 has no parameter of its own for it
            additional["reservation"] = site.reservation
        parameters.update(slurm_signal_delay_s=site.signal_lead_s, slurm_use_srun=False,
                          # --requeue: clusters with JobRequeue=0 would otherwise refuse rank 0's requeue. The notice
                          # goes to the batch step (B:), whose supervisor passes it to the running tasks and keeps it
                          # when none runs (between two sruns), so it is never lost.
                          slurm_additional_parameters={**additional, "requeue": True,
                                                       "signal": f"B:USR2@{site.signal_lead_s}"})
        if launcher.mem_gb:
            parameters["mem_gb"] = launcher.mem_gb
        if launcher.partition:
            parameters["slurm_partition"] = launcher.partition
        if launcher.account:
            parameters["slurm_account"] = launcher.account
        for option in ("qos", "constraint", "exclude"):
            if getattr(site, option):
                parameters[f"slurm_{option}"] = getattr(site, option)
        if site.exclusive:
            parameters["slurm_exclusive"] = True
    executor.update_parameters(**parameters)
    return executor


def submit_submitit(spec: JobSpec, *, backend: str = "slurm", wait: bool = False, check_resources: bool = True,
                    out=None) -> int:
    """Submit the job through submitit; with ``wait``, follow rank 0's log and return 0 only on success.

    Raises LaunchError before submitting when `sbatch` is missing or the cluster is too small.
    """
    out = out or sys.stdout
    if backend not in ("slurm", "local"):
        raise ValueError(f"backend={backend!r}; use 'slurm' or 'local'")
    if backend == "slurm":
        if shutil.which("sbatch") is None:
            raise LaunchError("sbatch not found on PATH: `--backend slurm` must run where SLURM's client commands "
                              "are installed (a login node); use --backend local to run on this machine")
        if check_resources:
            check_slurm_fits(spec, slurm_nodes())
    elif spec.launcher.nodes > 1:
        raise LaunchError(f"--backend local runs on this machine only, but launcher.nodes={spec.launcher.nodes}; "
                          "use --set launcher.nodes=1 or --backend slurm")
    spec = with_absolute_paths(spec, Path.cwd())
    # The run dir's spec.yaml says what it trains from now on (the launch's pre-flight accepted any change):
    # a job still queued under an older spec is refused by its ranks when it starts.
    write_spec(spec)
    # submitit's folder holds the pickles the tasks run and the results this process and the supervisor read back:
    # as private as the run dir (submitit itself would create it with the umask's permissions)
    make_run_dir(Path(spec.run_dir) / "submitit", spec.launcher.run_dir_mode)
    executor = make_executor(spec, backend)
    job = executor.submit(TrainTask(spec.to_dict()))
    folder = Path(spec.run_dir) / "submitit"
    print(f"submitted {backend} job {job.job_id} ({spec.launcher.world_size} task(s))\n  run dir: {spec.run_dir}\n"
          f"  logs: {folder}/{job.job_id}_0_log.out and .err", file=out, flush=True)
    if not wait:
        return 0
    return wait_for_submitit(job, backend=backend, out=out)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What slurmctld says of a job (`scontrol show job`; no accounting needed)."""

    state: str
    """RUNNING, PENDING, COMPLETING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ..."""
    exit_code: str
    """The batch script's "CODE:SIGNAL", e.g. "2:0", or "0:9" for a batch script killed by SIGKILL."""
    restarts: int
    """Times the job was requeued (SLURM_RESTART_COUNT in its next allocation)."""
    nodes: int = 0
    """Nodes the job holds now (NumNodes; a --no-kill job keeps running on fewer after a node fails)."""
    excluded: str = ""
    """Nodes the job may not run on (ExcNodeList)."""

    def ending(self) -> str:
        """"FAILED (exit code 2)", "COMPLETED", "CANCELLED (killed by SIGTERM)", ..."""
        code, _, number = self.exit_code.partition(":")
        if number not in ("", "0"):
            name = next((s.name for s in signal.Signals if str(s.value) == number), f"signal {number}")
            return f"{self.state} (killed by {name})"
        return f"{self.state} (exit code {code})" if code not in ("", "0") else self.state


class ControllerUnreachable(RuntimeError):
    """`scontrol` got no answer from slurmctld (it may be restarting): ask again later."""


def _job_record(job_id: str) -> JobRecord | None:
    """The job as slurmctld knows it, None once it has forgotten the job (MinJobAge after its end)."""
    try:
        result = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                                timeout=60)
    except subprocess.TimeoutExpired:
        raise ControllerUnreachable(f"scontrol show job {job_id} timed out") from None
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise ControllerUnreachable(result.stderr.strip())
    fields = dict(re.findall(r"(?:^|\s)(JobState|ExitCode|Restarts|NumNodes|ExcNodeList)=(\S+)", result.stdout))
    nodes = fields.get("NumNodes", "0").split("-")[0]
    return JobRecord(state=fields.get("JobState", "UNKNOWN"), exit_code=fields.get("ExitCode", ""),
                     restarts=int(fields.get("Restarts", 0)), nodes=int(nodes) if nodes.isdigit() else 0,
                     excluded="" if fields.get("ExcNodeList", "(null)") == "(null)" else fields["ExcNodeList"])


# ------------------------------------------------------------------------------------- the batch step


@dataclass(frozen=True, slots=True)
class StepEnd:
    """How one `srun` of the tasks ended, as srun told it."""

    code: int
    """srun's exit code."""
    ended: list[tuple[str, str]]
    """The task ends srun reported, in order: [("1", "Killed"), ("0-1", "Exited with exit code 1"), ...]."""
    out_of_memory: bool
    """SLURM reported a task ended by the kernel's OOM killer."""
    nodes: list[str] = field(default_factory=list)
    """The node of each task end srun reported, in the same order."""
    shrunk: str = ""
    """Why srun was stopped because the allocation lost a node while it ran (a --no-kill job), else ""."""


class _Notices:
    """The preemption notices the batch step received (USR2, SIGTERM): each is passed on to the srun running, which
    forwards it to the tasks, and remembered, so one that comes between two sruns, or kills a task before the task
    could handle it, still sends the job back to the queue instead of counting as a failure."""

    def __init__(self):
        self.received: list[str] = []
        self.srun: subprocess.Popen | None = None
        for notice in NOTICE_SIGNALS:
            signal.signal(notice, self._on_notice)

    def _on_notice(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)
        running = self.srun
        if running is not None and running.poll() is None:
            running.send_signal(signum)


def _requeue_on_notice(job_id: str, requeues: int, notices: _Notices, record: JobRecord | None = None) -> int:
    """After a preemption notice: the job is requeued (by rank 0, or here when no task could), never relaunched."""
    if record is None:
        try:
            record = _job_record(job_id)
        except ControllerUnreachable:
            record = None
    if record is not None and (record.restarts != requeues or record.state != "RUNNING"):
        how = "requeued" if record.restarts != requeues else record.state.lower()
        _say(f"{', '.join(notices.received)}: the job was {how}; this allocation stops here")
        return 0
    _say(f"{', '.join(notices.received)}: requeueing job {job_id} (the next allocation resumes from the latest "
         "checkpoint; not counted as a restart)")
    subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    return 0


def _srun(command: list[str], notices: _Notices | None = None, *, job_id: str = "", nodes_needed: int = 0) -> StepEnd:
    """Run ``command`` (srun), copying its stderr to ours (the job's log); ``notices`` passes preemption notices on.
    With ``job_id`` and ``nodes_needed``, the allocation is watched while srun runs: when a node fails under --no-kill,
    srun can wait for the lost node's tasks for good (its step was killed, the tasks on the other nodes ended, and no
    end ever comes from the lost node), so srun is stopped once the allocation holds fewer nodes."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
    if notices is not None:
        notices.srun = process
    shrunk: list[str] = []
    watching = threading.Event()
    if job_id and nodes_needed > 1:
        threading.Thread(target=_watch_allocation, args=(process, job_id, nodes_needed, shrunk, watching),
                         daemon=True).start()
    ended, nodes, out_of_memory = [], [], False
    try:
        for line in process.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if match := SRUN_TASK_END.match(line.rstrip()):
                nodes.append(match.group(1))
                ended.append((match.group(2), match.group(3)))
            out_of_memory = out_of_memory or bool(SRUN_OOM.search(line.rstrip()))
        code = process.wait()
    finally:
        watching.set()
    return StepEnd(code=code, ended=ended, out_of_memory=out_of_memory, nodes=nodes,
                   shrunk=shrunk[0] if shrunk else "")


ALLOCATION_POLL_S = 10.0
"""How often the batch step asks slurmctld whether the allocation still holds its nodes while srun runs."""


def _watch_allocation(process: subprocess.Popen, job_id: str, nodes: int, shrunk: list[str],
                      done: threading.Event) -> None:
    """Stop ``process`` (srun) when the allocation holds fewer than ``nodes`` nodes; ``shrunk`` gets the reason."""
    while not done.wait(ALLOCATION_POLL_S) and process.poll() is None:
        short = _allocation_short_of(job_id, nodes)
        if not short:
            continue
        shrunk.append(short)
        _say(f"{short} while the ranks ran: stopping srun")
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        return


def _cause(step: StepEnd) -> str:
    """The first task end srun reported, in words ("rank 3 was killed by SIGKILL"): srun reports them in the
    order they happen, and after the first, the other ranks only lost their peer or were stopped by srun."""
    if not step.ended:
        return f"srun failed with exit code {step.code}"
    ranks, how = step.ended[0]
    who = f"rank {ranks}" if ranks.isdigit() else f"ranks {ranks}"
    if exited := re.fullmatch(r"Exited with exit code (\d+)", how):
        return f"{who} exited with code {exited.group(1)}"
    name = SIGNAL_NAMES.get(how.removesuffix(" (core dumped)"))
    if name == "SIGABRT":  # what torch's NCCL watchdog does to a rank after a collective timed out: a peer is lost
        return f"{who} was aborted (SIGABRT: NCCL's watchdog, after a collective timed out or a peer was lost)"
    return f"{who} was killed by {name}" if name else f"{who}: {how}"


def _task_results(folder: Path, job_id: str) -> dict[int, tuple[str, object]]:
    """{task: (outcome, value)} of the tasks of ``job_id`` that wrote a result ("success" or "error"; submitit
    writes each under a temporary name and renames it, so a task killed while writing leaves none). A result file
    that is not safe to unpickle is said and left out."""
    results = {}
    for path in folder.glob(f"{job_id}_*_result.pkl"):
        task = path.name.removeprefix(f"{job_id}_").removesuffix("_result.pkl")
        if task.isdigit():
            try:
                results[int(task)] = load_result(path)
            except UnsafePickle as error:
                _say(str(error))
    return results


class UnsafePickle(RuntimeError):
    """A pickle someone other than this user could have written: reading it could run their code as this user."""


def load_result(path: Path):
    """submitit's pickled result at ``path``, after checking that only this user could have written it: the file is
    this user's and not writable by group or others, and so is its folder (or the folder is sticky). Unpickling
    runs code, so a result planted in a group-writable run dir would run as whoever reads it (the supervisor, the
    submitter's `--wait`)."""
    status, folder = path.stat(), path.parent.stat()
    problems = []
    if status.st_uid != os.getuid():
        problems.append(f"it belongs to uid {status.st_uid}, not to this user (uid {os.getuid()})")
    if status.st_mode & 0o022:
        problems.append(f"it is writable by {'group' if status.st_mode & 0o020 else 'others'} (mode "
                        f"{status.st_mode & 0o777:o})")
    if folder.st_mode & 0o022 and not folder.st_mode & 0o1000:
        problems.append(f"its folder {path.parent} is writable by others than its owner (mode "
                        f"{folder.st_mode & 0o777:o})")
    if problems:
        raise UnsafePickle(f"refusing to read {path}: {'; '.join(problems)}. Whoever could write it could run code "
                           "as you through it; keep run dirs private (launcher.run_dir_mode, chmod go-w)")
    return pickle_load(path)


def supervise(task_command: list[str], *, folder: Path, max_restarts: int, nodes: int | None = None,
              ntasks: int | None = None, max_excluded_nodes: int = 0) -> int:
    """The batch step of a job: run the tasks (``task_command`` under srun, one per rank, on ``nodes`` nodes) until
    they succeed, an error no restart can fix stops them, or ``max_restarts`` relaunches after a failure are used
    up. Before each launch the allocation must still hold ``nodes`` nodes (a --no-kill job keeps running on fewer
    after a node fails): when it does not, the job is requeued, to run again on as many. A node named in two
    failures in a row is excluded from the job (up to ``max_excluded_nodes``) and the job requeued. Returns the
    batch script's exit code: 0, the rank's code for an error no restart fixes, else 1."""
    job_id = os.environ["SLURM_JOB_ID"]
    requeues = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    counter = folder / f"{job_id}_failure_restarts"
    notices = _Notices()

    def ended(state: str, code: int) -> int:
        _write_outcome(folder, job_id, requeues=requeues, state=state, code=code)
        return code

    # The same files submitit's own srun line writes: FOLDER/JOBID_TASK_log.{out,err}, appended to.
    paths = JobPaths(folder)
    # The step's shape given explicitly: inherited from a shrunken allocation, srun would squeeze the ranks onto the
    # nodes left, or wait for step creation without end.
    shape = ([f"--nodes={nodes}"] if nodes else []) + ([f"--ntasks={ntasks}"] if ntasks else [])
    srun = ["srun", "--unbuffered", "--output", str(paths.stdout), "--error", str(paths.stderr), *shape,
            # One rank failing stops the others at once (they would wait in a collective for the dead one). Under a
            # --no-kill job srun inherits SLURM_NO_KILL, which turns --kill-on-bad-exit off and keeps the step waiting
            # for the tasks of a failed node for good: --no-kill=off ends the step, the job itself still runs on.
            "--kill-on-bad-exit=1", "--no-kill=off", *task_command]
    while True:
        for stale in folder.glob(f"{job_id}_*_result.pkl"):  # the results of an earlier attempt
            stale.unlink(missing_ok=True)
        if notices.received:  # a notice came between two sruns: nothing to save, the job goes back to the queue
            return ended("REQUEUED", _requeue_on_notice(job_id, requeues, notices))
        if nodes and (short := _allocation_short_of(job_id, nodes)):
            _say(f"{short}: requeueing the job, to run again on {nodes} node(s) (not counted as a restart)")
            _requeue(job_id)
            return ended("REQUEUED", 0)
        step = _srun(srun, notices, job_id=job_id, nodes_needed=nodes or 0)
        if step.code == 0:
            return ended("COMPLETED", 0)
        if step.shrunk and not notices.received:
            _say(f"{step.shrunk}: requeueing the job, to run again on {nodes} node(s) (not counted as a restart)")
            _requeue(job_id)
            return ended("REQUEUED", 0)
        try:
            record = _job_record(job_id)
        except ControllerUnreachable:
            record = None
        if notices.received:  # the tasks saved and rank 0 requeued, or a task died of the notice before it could
            return ended("REQUEUED", _requeue_on_notice(job_id, requeues, notices, record))
        if record and (record.state != "RUNNING" or record.restarts != requeues):
            # Requeued (rank 0 on a preemption notice, an administrator, a lost node) or cancelled: this
            # allocation ends here, and the next one, if any, resumes without using a restart.
            _say(f"the job was {'requeued' if record.restarts != requeues else record.state.lower()}: this "
                 "allocation stops here")
            return ended("REQUEUED" if record.restarts != requeues else record.state, step.code)
        failures = {task: _task_failure(value) for task, (outcome, value) in _task_results(folder, job_id).items()
                    if outcome == "error"}
        final = {task: failure for task, failure in failures.items() if failure and failure[0] in NOT_RESTARTABLE}
        if final:
            task, (rank_code, line) = min(final.items())
            _say(f"rank {task} stopped with exit code {rank_code} ({line}); not restarting")
            return ended("FAILED", rank_code)
        if step.out_of_memory:  # as the local launcher: the same run would run out again
            _say(f"{_cause(step)}: SLURM reports the kernel's out-of-memory killer; not restarting. Lower "
                 "train.micro_batch, data.num_workers or data.batches_ahead, run fewer ranks per node, or ask for "
                 "more memory (launcher.mem_gb)")
            return ended("FAILED", EXIT_OUT_OF_MEMORY)
        if step.nodes and max_excluded_nodes and _exclude_a_failing_node(job_id, folder, step.nodes[0], record,
                                                                         max_excluded_nodes, nodes or 1):
            return ended("REQUEUED", 0)
        used = restarts_used(counter)
        if used >= max_restarts:
            _say(f"{_cause(step)}; giving up after {max_restarts} restart(s) (launcher.max_restarts)")
            return ended("FAILED", EXIT_FAILED)
        atomic_write_text(counter, f"{used + 1}\n")  # a crash mid-write leaves the old count, never a torn file
        _say(f"restart {used + 1}/{max_restarts} after {_cause(step)}: launching the ranks again, "
             "from the latest checkpoint")


def _requeue(job_id: str) -> None:
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        _say(f"scontrol requeue {job_id} failed: {result.stderr.strip()}")


def _allocation_short_of(job_id: str, nodes: int) -> str | None:
    """Why the allocation cannot run ``nodes`` nodes' tasks now (it holds fewer: a node failed and the job, submitted
    with --no-kill, kept running), None when it can or the controller does not say."""
    try:
        record = _job_record(job_id)
    except ControllerUnreachable:
        return None
    if record is None or not record.nodes or record.nodes >= nodes:
        return None
    return f"the allocation holds {record.nodes} of the {nodes} node(s) the job needs (a node failed under --no-kill)"


def _exclude_a_failing_node(job_id: str, folder: Path, node: str, record: JobRecord | None, budget: int,
                            job_nodes: int = 1) -> bool:
    """Remember that ``node`` was named in this failure; when it was named in the previous one too, exclude it from
    the job (ExcNodeList, at most ``budget`` nodes per job, and only while the job's partition keeps ``job_nodes``
    other nodes up) and requeue the job. True when the job was requeued."""
    from vilscale.files import atomic_write_json

    history = folder / f"{job_id}_failed_nodes.json"
    try:
        named = json.loads(history.read_text())
    except (OSError, ValueError):
        named = []
    named.append(node)
    atomic_write_json(history, named)
    excluded = [n for n in (record.excluded.split(",") if record and record.excluded else []) if n]
    if len(named) < 2 or named[-2] != node or node in excluded:
        return False
    if len(excluded) >= budget:
        _say(f"node {node} failed twice in a row, but launcher.slurm.max_excluded_nodes={budget} node(s) are excluded "
             "already; restarting on it")
        return False
    others = _nodes_left_without([*excluded, node])
    if others is not None and others < job_nodes:
        _say(f"node {node} failed twice in a row, but without it the partition has {others} node(s) up for the job's "
             f"{job_nodes}: excluding it would leave the job pending for good; restarting on it")
        return False
    _say(f"node {node} was named in two failures in a row: requeueing the job without it (excluded: "
         f"{', '.join([*excluded, node])}; not counted as a restart)")
    held = subprocess.run(["scontrol", "requeuehold", job_id], capture_output=True, text=True, timeout=60)
    if held.returncode != 0:
        _say(f"scontrol requeuehold {job_id} failed: {held.stderr.strip()}; restarting on {node}")
        return False
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={','.join([*excluded, node])}"],
                   capture_output=True, text=True, timeout=60)
    subprocess.run(["scontrol", "release", job_id], capture_output=True, text=True, timeout=60)
    return True


def _nodes_left_without(excluded: list[str]) -> int | None:
    """Nodes up in this job's partition (SLURM_JOB_PARTITION) other than ``excluded``; None when sinfo cannot say."""
    try:
        nodes = slurm_nodes()
    except (LaunchError, OSError, subprocess.SubprocessError, ValueError):
        return None
    partition = os.environ.get("SLURM_JOB_PARTITION", "")
    pool = [n for n in nodes if (partition in n.partitions if partition else n.default_partitions)]
    return sum(1 for n in pool if n.name not in excluded and n.up)


OUTCOME_SUFFIX = "_outcome.json"


def _write_outcome(folder: Path, job_id: str, *, requeues: int, state: str, code: int) -> None:
    """The run dir's own record of how this allocation of the job ended (COMPLETED, FAILED, REQUEUED, ...): what
    `submit --wait` reads when slurmctld has forgotten the job (after MinJobAge) and no accounting can tell."""
    from vilscale.files import atomic_write_json

    try:
        atomic_write_json(folder / f"{job_id}{OUTCOME_SUFFIX}", {"job": job_id, "requeue": requeues, "state": state,
                                                                 "exit_code": code, "time": time.time()})
    except OSError as error:
        _say(f"could not record how job {job_id} ended in {folder} ({error})")


def ended_record(job_id: str, folder: Path) -> JobRecord | None:
    """How a job slurmctld no longer knows ended: accounting's word (`sacct`), else the supervisor's record in the
    run dir (``JOBID_outcome.json``); None when neither can tell."""
    try:
        result = subprocess.run(["sacct", "--jobs", job_id, "--allocations", "--noheader", "--parsable2",
                                 "--format=State,ExitCode"], capture_output=True, text=True, timeout=60)
        line = result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout.strip() else ""
        if line:
            state, exit_code = line.split("|")[:2]
            return JobRecord(state=state.split()[0], exit_code=exit_code, restarts=0)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        outcome = json.loads((folder / f"{job_id}{OUTCOME_SUFFIX}").read_text())
    except (OSError, ValueError):
        return None
    if outcome.get("state") in (None, "REQUEUED"):  # requeued: its later allocation left no record
        return None
    return JobRecord(state=outcome["state"], exit_code=f"{outcome.get('exit_code', 0)}:0",
                     restarts=int(outcome.get("requeue", 0)))


def restarts_used(counter: Path) -> int:
    """Relaunches after a failure this job has used (its counter file; 0 when there is none). A counter that cannot
    be read as a count (damaged by something else: vilscale writes it atomically) is said and counted as 0, rather
    than ending the job."""
    try:
        text = counter.read_text().strip()
    except FileNotFoundError:
        return 0
    if text.isdigit():
        return int(text)
    _say(f"the restart counter {counter} holds {text[:40]!r}, not a count; counting the restarts used as 0")
    return 0


def _say(message: str) -> None:
    print(f"[vilscale] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- the submitter


def wait_for_submitit(job, *, backend: str, out=None, poll_s: float = 2.0) -> int:
    """Follow rank 0's log until the job has ended; print how it ended and return 0 only if it succeeded.

    On SLURM the job's end is slurmctld's word (`scontrol show job`), not the tasks' result files: a task
    that was killed writes none, and `sacct` (which submitit asks) needs accounting, which many clusters lack.
    """
    out = out or sys.stdout
    tasks = [job.task(i) for i in range(len(job._tasks))] if len(job._tasks) > 1 else [job]
    rank0 = tasks[0]
    follower = LogFollower([rank0.paths.stdout, rank0.paths.stderr], out=out)
    record = None
    while True:
        follower.poll()
        if backend == "local":
            if all(task.paths.result_pickle.exists() for task in tasks) or job.done():
                break
        else:
            try:
                latest = _job_record(job.job_id)
            except ControllerUnreachable:  # slurmctld busy or restarting: ask again
                time.sleep(poll_s)
                continue
            if latest is None and (record is None or record.state in ACTIVE_STATES):
                # forgotten (MinJobAge) before this loop saw it end: accounting or the run dir's record tells how
                record = ended_record(job.job_id, Path(job.paths.folder)) or record
                break
            record = latest or record
            if latest is None or latest.state not in ACTIVE_STATES:
                break  # ended (None: forgotten since the last look, which saw how it ended)
        time.sleep(poll_s)
    if record is not None and record.state == "COMPLETED":
        # Result files can trail the job's end on a shared file system: give them a moment.
        deadline = time.monotonic() + 30
        while not all(task.paths.result_pickle.exists() for task in tasks) and time.monotonic() < deadline:
            time.sleep(0.5)
    follower.poll()
    results = {}
    for i, task in enumerate(tasks):
        if task.paths.result_pickle.exists():
            try:
                results[i] = load_result(task.paths.result_pickle)
            except UnsafePickle as error:
                print(f"  task {i}: {error}", file=sys.stderr, flush=True)
    succeeded = len(results) == len(tasks) and all(outcome == "success" for outcome, _ in results.values())
    if backend == "local":
        ending = "COMPLETED" if succeeded else "FAILED"
    else:
        ending = record.ending() if record and record.state not in ACTIVE_STATES else \
            "(SLURM no longer knows the job, and neither accounting nor the run dir recorded how it ended)"
    if succeeded and (record is None or record.state == "COMPLETED" or record.state in ACTIVE_STATES):
        print(f"job {job.job_id} ended {ending}: {results[0][1]}", file=out, flush=True)
        return 0
    print(f"job {job.job_id} ended {ending}", file=sys.stderr, flush=True)
    for i in range(len(tasks)):
        outcome, value = results.get(i, (None, None))
        if outcome is None:
            print(f"  task {i} left no result (killed, or stopped with the others)", file=sys.stderr, flush=True)
        elif outcome == "error":
            failure = _task_failure(str(value))
            reason = f"exit code {failure[0]}: {failure[1]}" if failure else str(value).strip()[-2000:]
            print(f"  task {i} failed: {reason}", file=sys.stderr, flush=True)
    return 1


SUPERVISOR_CHILD_ENV = "VILSCALE_SUPERVISOR_CHILD"


def guard(argv: list[str]) -> int:
    """Run the supervisor (this program again, as a child) and outlive it: a supervisor killed by a signal while its
    job still runs (the kernel's OOM killer picked it, a stray ``kill -9``) would end the job FAILED with nobody to
    requeue it; the guard requeues the job instead, and the next allocation resumes from the latest checkpoint
    without using a restart. A job that is being cancelled or requeued already is left to SLURM. The guard imports
    nothing heavy and holds no state, so the OOM killer has nothing to pick in it."""
    child = subprocess.Popen([sys.executable, "-u", "-m", SUPERVISOR_MODULE, *argv],
                             env={**os.environ, SUPERVISOR_CHILD_ENV: "1"})
    for notice in NOTICE_SIGNALS:  # SLURM signals the batch step (this process): the supervisor acts on it
        signal.signal(notice, lambda signum, frame: child.poll() is None and child.send_signal(signum))
    code = child.wait()
    if code >= 0:
        return code
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
    job_id = os.environ["SLURM_JOB_ID"]
    try:
        record = _job_record(job_id)
    except ControllerUnreachable:
        record = None
    if record is not None and record.state != "RUNNING":
        _say(f"the supervisor ended by {name} while the job is {record.state.lower()}: leaving it to SLURM")
        return 128 - code
    _say(f"the supervisor was killed by {name}; requeueing job {job_id}: the next allocation resumes from the latest "
         "checkpoint (not counted as a restart)")
    requeued = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if requeued.returncode != 0:
        _say(f"scontrol requeue {job_id} failed: {requeued.stderr.strip()}")
        return 128 - code
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {SUPERVISOR_MODULE}",
                                     description="The batch step of a vilscale SLURM job (see `supervise`).")
    parser.add_argument("--folder", type=Path, required=True, help="the job's submitit folder")
    parser.add_argument("--max-restarts", type=int, required=True, help="relaunches after a failure, per job")
    parser.add_argument("--nodes", type=int, default=None, help="nodes the tasks run on (launcher.nodes)")
    parser.add_argument("--ntasks", type=int, default=None, help="tasks in all (launcher.world_size)")
    parser.add_argument("--max-excluded-nodes", type=int, default=0, help="launcher.slurm.max_excluded_nodes")
    parser.add_argument("task_command", nargs=argparse.REMAINDER, help="-- the command srun runs in every task")
    args = parser.parse_args(argv)
    if not os.environ.get(SUPERVISOR_CHILD_ENV) and os.environ.get("SLURM_JOB_ID"):
        return guard(argv)
    command = args.task_command[1:] if args.task_command[:1] == ["--"] else args.task_command
    return supervise(command, folder=args.folder, max_restarts=args.max_restarts, nodes=args.nodes,
                     ntasks=args.ntasks, max_excluded_nodes=args.max_excluded_nodes)


__all__ = ["TrainTask", "check_slurm_fits", "make_executor", "slurm_nodes", "submit_submitit", "supervise",
           "wait_for_submitit"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
