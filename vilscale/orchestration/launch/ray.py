"""Ray: submit a job to a cluster (`submit_ray`) and, inside that job, train on a Ray Train
`TorchTrainer` (`train_on_ray`).

`vilscale submit JOB --backend ray` ships the working dir to the cluster through the Job Submission
API and runs ``<python> -m vilscale.cli train JOB --launcher ray`` there; that driver runs the
pre-flight checks, holds the run dir's lock and calls `train_on_ray`, which starts one Ray Train
worker per rank and runs `run_worker(spec)` in each. Ray Train v2 creates the torch process group
before the train function runs, and `run_worker` reuses it.

Restarts: Ray's own ``FailureConfig`` retries whatever failed, but an error no retry can fix (a bad
spec, bad data, repeated non-finite losses) must end the run at once. So each `TorchTrainer.fit` runs
with ``max_failures=0``; a rank that meets such an error raises `FatalRankError`, and the driver
stops; after any other failure (a worker or node lost) it fits again, up to ``launcher.max_restarts``
times, and `run_worker` resumes from the run dir's own ``checkpoints/latest`` (never from Ray's
checkpoint registry, which can miss a checkpoint reported just before a crash).

Placement: exactly ``launcher.nodes`` nodes, ``launcher.ranks_per_node`` workers on each, ranks r on the
r // ranks_per_node-th chosen node (so local ranks are right). Before each fit the driver chooses that many
alive nodes that each have the resources free for all their ranks (`choose_nodes`: the previous fit's nodes
first, then the driver's own node, then the rest), waiting up to ``launcher.node_wait_s`` for them (a lost node coming
back), and pins each worker to its node with a per-worker ``label_selector`` on ``ray.io/node-id``: Ray Train
puts each worker's label selector on its placement-group bundle, creates worker i in bundle i and numbers the
workers node by node in the order their nodes first appear among the bundles.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vilscale.orchestration.checkpoint.rundir import LOCK_HELD_ENV
from vilscale.orchestration.config import JobSpec, spec_from_dict
from vilscale.orchestration.launch.common import LaunchError, path_overrides, probe_tcp, with_absolute_paths
from vilscale.orchestration.launch.exit_codes import EXIT_FAILED, EXIT_SPEC_ERROR, classify, is_restartable

RAY_DASHBOARD_PORT = 8265
RAY_CLIENT_PORT = 10001
RAY_GCS_PORT = 6379
# Ray Train's name for this run under <run_dir>/ray: stable, so a resubmitted run reuses it.
RAY_TRAIN_RUN_NAME = "ray_train"
# Set in every Ray job and worker: Ray Train otherwise prints each worker line twice.
DEFAULT_JOB_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONUNBUFFERED": "1"}
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
# The label every Ray node carries with its node id (ray.util.placement_group.NODE_ID_LABEL_KEY).
NODE_ID_LABEL = "ray.io/node-id"
# How long a fit waits for launcher.nodes nodes with room for their ranks (a lost node coming back, the
# previous fit's workers leaving) before the run fails, and how often it looks.
NODE_WAIT_S = 300.0
NODE_POLL_S = 2.0


# ------------------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class RayNode:
    """An alive node of a Ray cluster, as placement sees it."""

    node_id: str
    address: str
    total: dict[str, float]
    available: dict[str, float] = field(default_factory=dict)
    """Resources not held by anything now (the submit side does not know them: it leaves this empty)."""


class NotEnoughNodes(Exception):
    """Fewer alive nodes than launcher.nodes have the resources for launcher.ranks_per_node workers; the
    message says what is needed and what there is."""


def worker_resources(launcher) -> dict[str, float]:
    """What one worker (rank) reserves: launcher.cpus_per_task CPUs, and one GPU on a GPU job."""
    return {"CPU": float(launcher.cpus_per_task), **({"GPU": 1.0} if launcher.gpus_per_node > 0 else {})}


def node_resources(launcher) -> dict[str, float]:
    """What each of the job's nodes must have for its launcher.ranks_per_node workers."""
    return {key: value * launcher.ranks_per_node for key, value in worker_resources(launcher).items()}


def _has(resources: dict[str, float], need: dict[str, float]) -> bool:
    return all(resources.get(key, 0.0) + 1e-9 >= amount for key, amount in need.items())


def _keys(need: dict[str, float]) -> list[str]:
    return sorted(need, key=lambda key: (key != "GPU", key != "CPU", key))


def _describe(resources: dict[str, float], keys: Sequence[str]) -> str:
    return " and ".join(f"{resources.get(key, 0.0):g} {key}(s)" for key in keys)


def choose_nodes(nodes: Sequence[RayNode], count: int, need: dict[str, float], *,
                 prefer: Sequence[str] = ()) -> list[RayNode]:
    """``count`` of ``nodes`` that each have ``need`` available, in the order their ranks go on them.

    The nodes named in ``prefer`` come first, in that order (the previous fit's nodes, then the driver's own:
    rank 0 and the other ranks stay where they were when they can); the others follow by address, then node id.
    A preferred node without ``need`` free is passed over. Raises NotEnoughNodes when fewer than ``count`` have it.
    """
    rank = {node_id: index for index, node_id in enumerate(dict.fromkeys(prefer))}
    fitting = sorted((node for node in nodes if _has(node.available, need)),
                     key=lambda node: (rank.get(node.node_id, len(rank)), node.address, node.node_id))
    if len(fitting) < count:
        keys = _keys(need)
        have = ", ".join(f"{node.address} ({_describe(node.available, keys)} free)"
                         for node in sorted(nodes, key=lambda node: (node.address, node.node_id))) or "none"
        raise NotEnoughNodes(f"{count} node(s) with {_describe(need, keys)} free each; {len(fitting)} of the "
                             f"{len(nodes)} alive node(s) have that: {have}")
    return fitting[:count]


def worker_label_selectors(nodes: Sequence[RayNode], ranks_per_node: int) -> list[dict[str, str]]:
    """One label selector per worker pinning workers i * ranks_per_node .. (i + 1) * ranks_per_node - 1 to
    ``nodes[i]`` (ScalingConfig.label_selector)."""
    return [{NODE_ID_LABEL: node.node_id} for node in nodes for _ in range(ranks_per_node)]


def alive_ray_nodes() -> list[RayNode]:
    """The cluster's alive nodes with their total and available resources (from a connected Ray driver).

    A node counts as alive when Ray lists it so AND its raylet accepts a connection: Ray goes on listing a node
    whose raylet died as alive for several seconds (until its health checks have failed), and a fit placed there
    would wait for the worker group's start-up timeout (60 s) and fail.
    """
    import ray
    from ray._private.state import available_resources_per_node  # a DeveloperAPI, the one per-node view

    available = available_resources_per_node()
    return [RayNode(node_id=node["NodeID"], address=node["NodeManagerAddress"],
                    total={key: float(value) for key, value in node["Resources"].items()},
                    available={key: float(value) for key, value in available.get(node["NodeID"], {}).items()})
            for node in ray.nodes()
            if node["Alive"] and _answers(node["NodeManagerAddress"], int(node["NodeManagerPort"]))]


def _answers(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_nodes(count: int, need: dict[str, float], *, prefer: Sequence[str] = (),
                   list_nodes: Callable[[], list[RayNode]] = alive_ray_nodes, timeout_s: float = NODE_WAIT_S,
                   poll_s: float = NODE_POLL_S, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep, log=None) -> list[RayNode]:
    """`choose_nodes` over the alive nodes, looking again every ``poll_s`` while too few have room, for up to
    ``timeout_s``; one line in ``log`` (stderr) says what it waits for, and another every minute it goes on.
    Raises NotEnoughNodes (saying what was missing) after ``timeout_s``."""
    log = log or sys.stderr
    started = clock()
    said_at = None
    while True:
        try:
            return choose_nodes(list_nodes(), count, need, prefer=prefer)
        except NotEnoughNodes as missing:
            waited = clock() - started
            if waited >= timeout_s:
                raise NotEnoughNodes(f"waited {waited:.0f} s for {missing}") from None
            if said_at is None or clock() - said_at >= 60:
                print(f"[vilscale] waiting up to {timeout_s - waited:.0f} s more for {missing}", file=log,
                      flush=True)
                said_at = clock()
        sleep(poll_s)


# ----------------------------------------------------------------------------------------- submit side


def connect(address: str | None):
    """A `JobSubmissionClient` for ``address``, or LaunchError saying why the cluster cannot be reached.

    ``address``: "auto" / None (RAY_ADDRESS, else a cluster started on this machine), the dashboard URL
    ``http://HEAD:8265``, the Ray Client address ``ray://HEAD:10001`` or the GCS address ``HEAD:6379``.
    """
    from ray.job_submission import JobSubmissionClient

    address = None if address in (None, "", "auto") else address
    if address is not None:
        # Ray's own client waits 30-40 s before giving up on a silent host; answer at once instead.
        default_port = (RAY_CLIENT_PORT if address.startswith("ray://") else
                        RAY_DASHBOARD_PORT if "://" in address else RAY_GCS_PORT)
        try:
            probe_tcp(address, default_port=default_port)
        except LaunchError as error:
            raise LaunchError(f"cannot reach the Ray cluster: {error}. Start one with `ray start --head` and pass "
                              "its dashboard address (--address http://HEAD:8265, or launcher.ray_address in the "
                              "spec).") from None
    try:
        return JobSubmissionClient(address)
    except Exception as error:  # Ray raises ConnectionError, RpcError or ValueError depending on the form
        where = address or "auto (RAY_ADDRESS or a cluster on this machine)"
        reason = str(error).rstrip(".")
        raise LaunchError(f"cannot reach the Ray cluster at {where}: {reason}. Start one with `ray start --head` "
                          "or pass its dashboard address with --address http://HEAD:8265.") from None


def cluster_nodes(dashboard_url: str) -> list[RayNode]:
    """The cluster's alive nodes with their total resources (the state API does not say what is free)."""
    from ray.util.state import list_nodes

    nodes = []
    for _attempt in range(5):  # a head that has just started can list no node for a moment
        nodes = [n for n in list_nodes(address=dashboard_url, detail=True, raise_on_missing_output=False)
                 if n.state == "ALIVE"]
        if nodes:
            break
        time.sleep(1)
    return [RayNode(node_id=node.node_id, address=node.node_ip,
                    total={key: float(value) for key, value in (node.resources_total or {}).items()})
            for node in nodes]


def check_fits(spec: JobSpec, nodes: Sequence[RayNode], where: str) -> None:
    """LaunchError naming the numbers when the job asks for more GPUs or CPUs than the cluster's alive ``nodes``
    have, or when fewer than launcher.nodes of them can each hold launcher.ranks_per_node ranks."""
    launcher = spec.launcher
    layout = f"{launcher.nodes} node(s) x {launcher.ranks_per_node} rank(s)"
    gpus = launcher.nodes * launcher.gpus_per_node
    cpus = launcher.world_size * launcher.cpus_per_task
    resources = {key: sum(node.total.get(key, 0.0) for node in nodes) for key in ("CPU", "GPU")}
    have = f"{where} has {resources['GPU']:g} GPU(s) and {resources['CPU']:g} CPU(s) on {len(nodes)} node(s)"
    if gpus > resources["GPU"]:
        raise LaunchError(f"the job asks for {gpus} GPUs ({launcher.nodes} node(s) x {launcher.gpus_per_node} "
                          f"launcher.gpus_per_node) but {have}; lower launcher.nodes or launcher.gpus_per_node, "
                          "or add GPU nodes")
    if cpus > resources["CPU"]:
        raise LaunchError(f"the job asks for {cpus} CPUs ({layout} x {launcher.cpus_per_task} "
                          f"launcher.cpus_per_task) but {have}; lower launcher.cpus_per_task or the number of "
                          "ranks, or add nodes")
    # The ranks of one node share it: the totals are not enough.
    need, per_worker = node_resources(launcher), worker_resources(launcher)
    keys = _keys(need)
    fitting = [node for node in nodes if _has(node.total, need)]
    if len(fitting) < launcher.nodes:
        largest = max(nodes, key=lambda node: tuple(node.total.get(key, 0.0) for key in keys), default=None)
        per_node_key = "gpus_per_node" if launcher.gpus_per_node else "cpu_workers_per_node"
        raise LaunchError(
            f"the job asks for {launcher.nodes} node(s) with {_describe(need, keys)} each "
            f"({launcher.ranks_per_node} rank(s) per node x {_describe(per_worker, keys)}) but only {len(fitting)} "
            f"of the {len(nodes)} node(s) of {where} have that much (the largest has "
            f"{_describe(largest.total if largest else {}, keys)}); lower launcher.{per_node_key} (and raise "
            "launcher.nodes) or launcher.cpus_per_task, or add bigger nodes")


def entrypoint_for(spec_path: Path, working_dir: Path, spec: JobSpec, overrides: list[str], python: str, *,
                   allow_spec_change: bool = False) -> str:
    """The shell command the Ray job runs on the cluster, inside its copy of ``working_dir``. A job shipped with
    vilscale is named (the cluster's vilscale has it; `jobs/` in a checkout links into the package, which the job's
    working dir leaves out); any other job file must be inside the working dir."""
    from vilscale.orchestration.config import shipped

    resolved = shipped.resolve(spec_path).resolve()
    if resolved.parent == shipped.JOBS_DIR.resolve():
        job = resolved.stem
    else:
        try:
            job = resolved.relative_to(working_dir.resolve()).as_posix()
        except ValueError:
            raise LaunchError(f"the job spec {spec_path} is not inside launcher.working_dir={str(working_dir)!r}, so "
                              "it would not be shipped to the cluster; move it there or set launcher.working_dir") \
                from None
    command = [python, "-m", "vilscale.cli", "train", job, "--launcher", "ray"]
    for assignment in [*overrides, *path_overrides(spec)]:
        command += ["--set", assignment]
    if allow_spec_change:
        command.append("--allow-spec-change")
    return shlex.join(command)


def submit_ray(spec: JobSpec, *, spec_path: Path, overrides: list[str], address: str | None = None,
               wait: bool = False, python: str | None = None, check_resources: bool = True,
               allow_spec_change: bool = False, out=None) -> int:
    """Submit the job to a Ray cluster; with ``wait``, stream its log and return 0 only if it succeeded.

    Raises LaunchError before submitting when the cluster cannot be reached or is too small.
    """
    out = out or sys.stdout
    address = address or spec.launcher.ray_address
    client = connect(address)
    dashboard = client.get_address()
    if check_resources:
        check_fits(spec, cluster_nodes(dashboard), f"the Ray cluster at {dashboard}")
    working_dir = Path(spec.launcher.working_dir).expanduser()
    if not working_dir.is_dir():
        raise LaunchError(f"launcher.working_dir={spec.launcher.working_dir!r} is not a directory (it is resolved "
                          f"against the current directory, {Path.cwd()})")
    pinned = with_absolute_paths(spec, Path.cwd())
    entrypoint = entrypoint_for(spec_path, working_dir, pinned, overrides, python or sys.executable,
                                allow_spec_change=allow_spec_change)
    env = {**DEFAULT_JOB_ENV, **spec.launcher.env}
    submission_id = f"vilscale-{Path(pinned.run_dir).name}-{uuid.uuid4().hex[:8]}"
    # vilscale itself runs from the cluster's environment (where its compiled parts are built), never from the
    # shipped copy of the working dir, whose build artifacts Ray leaves out (they are gitignored).
    job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                               runtime_env={"working_dir": str(working_dir.resolve()), "env_vars": env,
                                            "excludes": ["/vilscale/"]},
                               metadata={"vilscale_run_dir": pinned.run_dir})
    print(f"submitted Ray job {job_id} to {dashboard}\n  entrypoint: {entrypoint}\n  run dir: {pinned.run_dir}\n"
          f"  follow it: ray job logs --address {dashboard} --follow {job_id}", file=out, flush=True)
    if not wait:
        return 0
    return wait_for_job(client, job_id, out=out)


def wait_for_job(client, job_id: str, *, out=None) -> int:
    """Stream the job's log until it ends; 0 if it succeeded, 1 otherwise."""
    out = out or sys.stdout

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(follow())
    except Exception as error:  # the log stream can drop (dashboard restart); the status below still counts
        print(f"[vilscale] log stream of {job_id} ended early ({error}); polling its status", file=sys.stderr)
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL_STATES:
            break
        time.sleep(2)
    status = str(info.status)
    if status == "SUCCEEDED":
        print(f"Ray job {job_id} succeeded", file=out, flush=True)
        return 0
    print(f"Ray job {job_id} ended {status}: {info.message or ''}".rstrip(), file=sys.stderr, flush=True)
    return 1


# ----------------------------------------------------------------------------------------- cluster side


class FatalRankError(RuntimeError):
    """Raised by a Ray Train worker for an error no restart can fix; carries the rank's exit code and line."""

    def __init__(self, code: int, line: str):
        super().__init__(f"[exit code {code}] {line}")
        self.code, self.line = code, line

    def __reduce__(self):
        return (self.__class__, (self.code, self.line))


class RayTrainFailed(Exception):
    """The Ray Train run failed for good; ``exit_code`` is what the driver ends with."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def _train_worker(config: dict) -> None:
    """Ray Train's train function: one call per worker, in the worker's process."""
    import ray.train

    from vilscale.orchestration.training.loop import run_worker

    spec = spec_from_dict(config["spec"])
    os.environ.update(spec.launcher.env)
    os.environ[LOCK_HELD_ENV] = config["lease_token"]  # the driver holds the run dir's lock: fence on its lease
    try:
        summary = run_worker(spec)
    except Exception as error:
        code, line = classify(error)
        if not is_restartable(code):
            print(f"vilscale: rank {ray.train.get_context().get_world_rank()}: {line}", file=sys.stderr, flush=True)
            raise FatalRankError(code, line) from None
        raise
    # Every worker reports (a report is a collective); the Result carries rank 0's summary.
    ray.train.report({key: value for key, value in summary.items() if isinstance(value, int | float | str | bool)})


def _fatal_failure(error: BaseException) -> FatalRankError | None:
    """The FatalRankError among a failed fit's worker errors, if any."""
    for failure in getattr(error, "worker_failures", {}).values():
        if isinstance(failure, FatalRankError):
            return failure
        cause = getattr(failure, "cause", None)  # a RayTaskError wraps the worker's exception
        if isinstance(cause, FatalRankError):
            return cause
    return None


def train_on_ray(spec: JobSpec, *, lease_token: str) -> dict:
    """Train on a Ray Train `TorchTrainer` from inside a Ray job's driver; returns rank 0's summary.

    One worker per rank (launcher.world_size), each with launcher.cpus_per_task CPUs and one GPU when
    launcher.gpus_per_node > 0, launcher.ranks_per_node of them on each of launcher.nodes nodes (see the module
    docstring). Raises RayTrainFailed when the cluster cannot hold the job, when a rank met an error no restart
    can fix, after launcher.max_restarts restarts, or when the nodes a refit needs did not come within
    launcher.node_wait_s (unless launcher.min_nodes lets it go on with fewer).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = with_absolute_paths(spec, Path.cwd())
    if "runtime_resources" in Path(spec.run_dir).parts or "working_dir_files" in spec.run_dir:
        print(f"[vilscale] warning: run_dir {spec.run_dir} is inside the Ray job's temporary copy of the working "
              "dir; checkpoints will be lost with it. Pass --set run_dir=/shared/path/run (absolute) or use "
              "`vilscale submit`, which pins relative paths to the submitting machine's directory.",
              file=sys.stderr, flush=True)
    launcher = spec.launcher
    if not ray.is_initialized():
        ray.init()
    try:  # `vilscale submit` checked this already; `ray job submit` did not
        check_fits(spec, alive_ray_nodes(), "the Ray cluster")
    except LaunchError as error:
        raise RayTrainFailed(EXIT_SPEC_ERROR, str(error)) from None
    driver_node = ray.get_runtime_context().get_node_id()
    previous: list[str] = []
    last = None
    for attempt in range(launcher.max_restarts + 1):
        nodes = _nodes_for_fit(spec, prefer=[*previous, driver_node])
        previous = [node.node_id for node in nodes]
        per_node = launcher.ranks_per_node
        print("[vilscale] placing " + ", ".join(
            f"ranks {index * per_node}-{(index + 1) * per_node - 1} on {node.address} (node {node.node_id[:8]})"
            for index, node in enumerate(nodes)), file=sys.stderr, flush=True)
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"spec": spec.to_dict(), "lease_token": lease_token},
            # Ray Train makes the process group: its collectives wait train.collective_timeout_s, not Ray's 1800 s.
            torch_config=TorchConfig(timeout_s=int(spec.train.collective_timeout_s)),
            scaling_config=ScalingConfig(num_workers=len(nodes) * per_node, use_gpu=launcher.gpus_per_node > 0,
                                         resources_per_worker=worker_resources(launcher), placement_strategy="PACK",
                                         label_selector=worker_label_selectors(nodes, per_node)),
            # Every failure comes back to this loop, which chooses the nodes again: Ray's own retries would
            # wait for the same (maybe lost) nodes, a worker-group start that timed out included.
            run_config=RunConfig(name=RAY_TRAIN_RUN_NAME, storage_path=str(Path(spec.run_dir) / "ray"),
                                 failure_config=FailureConfig(max_failures=0, controller_failure_limit=0,
                                                              max_preemption_failures=0)),
        )
        try:
            return dict(trainer.fit().metrics or {})
        except TrainingFailedError as error:
            fatal = _fatal_failure(error)
            if fatal is not None:
                raise RayTrainFailed(fatal.code, f"a rank stopped: {fatal.line} (not restarting)") from None
            last = str(error).strip().splitlines()
            if attempt < launcher.max_restarts:
                print(f"[vilscale] the Ray Train worker group failed ({_first_reason(last)}); restarting from the "
                      f"latest checkpoint ({attempt + 1}/{launcher.max_restarts})", file=sys.stderr, flush=True)
    raise RayTrainFailed(EXIT_FAILED, f"the Ray Train run failed after {launcher.max_restarts} restarts: "
                                      f"{_first_reason(last or [])}")


def _nodes_for_fit(spec: JobSpec, *, prefer: list[str]) -> list[RayNode]:
    """The nodes the next fit runs on: launcher.nodes of them, waiting up to launcher.node_wait_s; after that, as many
    as have room when that is at least launcher.min_nodes (the run goes on, smaller, with its global batch kept);
    else RayTrainFailed."""
    launcher = spec.launcher
    need = node_resources(launcher)
    try:
        return wait_for_nodes(launcher.nodes, need, prefer=prefer, timeout_s=launcher.node_wait_s)
    except NotEnoughNodes as missing:
        if launcher.fewest_nodes == launcher.nodes:
            raise RayTrainFailed(EXIT_FAILED, f"the Ray cluster has no room for the run: {missing}") from None
        alive = alive_ray_nodes()
        room = sum(_has(node.available, need) for node in alive)
        if room < launcher.fewest_nodes:
            raise RayTrainFailed(EXIT_FAILED, f"the Ray cluster has no room for the run: {missing}; and only {room} "
                                              f"node(s) have room, fewer than launcher.min_nodes="
                                              f"{launcher.fewest_nodes}") from None
        nodes = choose_nodes(alive, min(room, launcher.nodes), need, prefer=prefer)
        world = len(nodes) * launcher.ranks_per_node
        print(f"[vilscale] {launcher.nodes} node(s) did not come within launcher.node_wait_s="
              f"{launcher.node_wait_s:g} s: going on with {len(nodes)} (launcher.min_nodes={launcher.fewest_nodes}), "
              f"{world} rank(s) x {spec.train.micro_batch} x {spec.grad_accum(world)} accumulated = the global batch "
              f"{spec.global_batch(world)}; the next restart grows back if the nodes are there",
              file=sys.stderr, flush=True)
        return nodes


def _first_reason(lines: list[str]) -> str:
    meaningful = [line for line in lines if line and not line.startswith("Training failed due to")]
    return (meaningful[0] if meaningful else "unknown error")[:300]


__all__ = ["FatalRankError", "NotEnoughNodes", "RayNode", "RayTrainFailed", "check_fits", "choose_nodes",
           "cluster_nodes", "connect", "submit_ray", "train_on_ray", "wait_for_job", "wait_for_nodes"]
