"""SLURM through submitit: one task per GPU (or `cpu_workers_per_node` tasks per node on CPU), no
torchrun inside; `--backend local` runs the same task on this machine through submitit's local executor.

Each task exports the torch rendezvous variables (`TorchDistributedEnvironment().export()`) and calls
`run_worker(spec)`. `TrainTask` is a submitit `Checkpointable`. On timeout or preemption SLURM sends
USR2 (`--signal=USR2@signal_delay_s`) to every task: the ranks finish the step they are in, save a
checkpoint at it together, and stop; then rank 0 hands over to submitit, which pickles the task again
and runs `scontrol requeue`, and the new allocation resumes from that checkpoint (at most the step in
flight is lost). An administrator's `scontrol requeue`, or a node lost with the job (requeued by SLURM
under ``--requeue``), restarts the job from the latest checkpoint the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from vilscale.orchestration.config import JobSpec, spec_from_dict
from vilscale.orchestration.launch.common import LaunchError, LogFollower, with_absolute_paths
from vilscale.orchestration.launch.exit_codes import classify

# Seconds between SLURM's USR2 and the kill at the time limit: enough for rank 0 to requeue.
SIGNAL_DELAY_S = 120
# squeue states of a job that is running or will run (again) without anyone's help.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                 "RESIZING", "SIGNALING", "STAGE_OUT"}


class TaskFailed(RuntimeError):
    """A task ended with an error (the one line the rank printed; the job fails, SLURM does not requeue it)."""


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

        signal.signal(signal.SIGUSR2, preemption_notice)
        # LOCAL_RANK indexes the node's GPUs, so CUDA_VISIBLE_DEVICES stays as SLURM set it. A requeued
        # task inherits nothing from its previous allocation, but overwrite in case the batch script set any.
        environment = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                             overwrite=True)
        if environment.rank == 0:
            print(f"[vilscale] task {environment.rank}/{environment.world_size} on {environment.master_addr}:"
                  f"{environment.master_port}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}",
                  file=sys.stderr, flush=True)
        try:
            summary = run_worker(spec, stop_requested=notice.is_set)
        except Exception as error:
            code, line = classify(error)
            if not line:
                raise
            print(f"vilscale: rank {environment.rank}: {line}", file=sys.stderr, flush=True)
            raise TaskFailed(f"[exit code {code}] {line}") from None
        if summary.get("preempted") and callable(requeue):
            requeue(signal.SIGUSR2, None)  # rank 0: pickle this task again, `scontrol requeue`, exit
        return summary

    def checkpoint(self):
        """Called by submitit in rank 0 on USR2: resubmit this very task.

        The training state is already in the run dir (its `checkpoints/latest`), so the task carries
        nothing new; the requeued job resumes from there.
        """
        return submitit.helpers.DelayedSubmission(self)


@dataclass(frozen=True, slots=True)
class SlurmNode:
    name: str
    cpus: int
    memory_mb: int
    gpus: int
    partitions: tuple[str, ...]
    default_partitions: tuple[str, ...]
    state: str


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
    usable = [n for n in pool if not any(bad in n.state for bad in ("down", "drain", "fail", "maint"))]
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


def make_executor(spec: JobSpec, backend: str):
    """A submitit executor configured from the spec's launcher section (``backend``: "slurm" or "local")."""
    launcher = spec.launcher
    folder = Path(spec.run_dir) / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=backend, slurm_max_num_timeout=launcher.max_restarts)
    parameters = dict(name=f"vilscale-{Path(spec.run_dir).name}", nodes=launcher.nodes,
                      tasks_per_node=launcher.ranks_per_node, gpus_per_node=launcher.gpus_per_node,
                      cpus_per_task=launcher.cpus_per_task, timeout_min=launcher.time_min)
    if backend == "slurm":
        parameters.update(slurm_signal_delay_s=SIGNAL_DELAY_S,
                          # --requeue: clusters with JobRequeue=0 would otherwise refuse rank 0's requeue.
                          slurm_additional_parameters={"requeue": True})
        if launcher.mem_gb:
            parameters["mem_gb"] = launcher.mem_gb
        if launcher.partition:
            parameters["slurm_partition"] = launcher.partition
        if launcher.account:
            parameters["slurm_account"] = launcher.account
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
    executor = make_executor(spec, backend)
    job = executor.submit(TrainTask(spec.to_dict()))
    folder = Path(spec.run_dir) / "submitit"
    print(f"submitted {backend} job {job.job_id} ({spec.launcher.world_size} task(s))\n  run dir: {spec.run_dir}\n"
          f"  logs: {folder}/{job.job_id}_0_log.out and .err", file=out, flush=True)
    if not wait:
        return 0
    return wait_for_submitit(job, backend=backend, out=out)


def _squeue_state(job_id: str) -> str | None:
    """The job's state per squeue ("RUNNING", "PENDING", "COMPLETED", ...), None once SLURM forgot it."""
    result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--states=all", "--format=%T"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return None  # "Invalid job id specified" once the job left the controller's memory (MinJobAge)
    states = result.stdout.split()
    return states[0] if states else None


def wait_for_submitit(job, *, backend: str, out=None, poll_s: float = 2.0) -> int:
    """Follow rank 0's log until the job has ended with every task's result (or without them)."""
    out = out or sys.stdout
    tasks = [job.task(i) for i in range(len(job._tasks))] if len(job._tasks) > 1 else [job]
    rank0 = tasks[0]
    follower = LogFollower([rank0.paths.stdout, rank0.paths.stderr], out=out)
    ended_since = None
    while True:
        follower.poll()
        results = all(task.paths.result_pickle.exists() for task in tasks)
        if backend == "local":
            if results or job.done():
                break
        elif _squeue_state(job.job_id) in ACTIVE_STATES:
            # Running, or requeued and waiting to run again: result files of an earlier attempt may exist,
            # but the allocation now running will write the final ones.
            ended_since = None
        elif results:
            break
        else:
            # Result files can trail the job's end on a shared file system: give them a moment.
            ended_since = ended_since or time.monotonic()
            if time.monotonic() - ended_since > 30:
                break
        time.sleep(poll_s)
    follower.poll()
    try:
        summary = rank0.result()
    except Exception as error:
        print(f"job {job.job_id} failed: {str(error).strip()[-4000:]}", file=sys.stderr, flush=True)
        return 1
    for task in tasks[1:]:
        try:
            task.result()
        except Exception as error:
            print(f"job {job.job_id} task {task.task_id} failed: {str(error).strip()[-2000:]}", file=sys.stderr)
            return 1
    print(f"job {job.job_id} finished: {summary}", file=out, flush=True)
    return 0


__all__ = ["TrainTask", "check_slurm_fits", "make_executor", "slurm_nodes", "submit_submitit", "wait_for_submitit"]
