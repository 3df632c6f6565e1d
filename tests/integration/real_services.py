"""Real services for the integration and multinode tests: a Ray head (and worker nodes), a SLURM
cluster (munge, slurmctld, one slurmd per node) and a Prometheus server. Each starts in its own temporary
directory, on free ports, and stops only the processes it started.

By default everything runs on loopback (one node). The multinode tests pass nodes that live in network
namespaces (tests/multinode/namespace_hosts.py): each node then has an address and a ``launch_prefix``,
the command prefix that runs a program on that node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---------------------------------------------------------------------------------- running vilscale

SMOKE = REPO / "jobs" / "smoke.yaml"


def vilscale(*args: str, env: dict | None = None, timeout_s: float = 600, cwd: Path = REPO):
    """Run the `vilscale` CLI as a user would (a subprocess); returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "vilscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **(env or {})}, cwd=cwd)


def smoke_overrides(digits: Path, run_dir: Path, extra: dict | None = None, **train) -> list[str]:
    """`--set` arguments pointing jobs/smoke.yaml at the session's shards and a test's run dir, plus
    ``train.KEY=VALUE`` for each keyword and any ``extra`` assignments."""
    pairs = {"run_dir": run_dir, "data.train_manifest": digits / "train" / "manifest.json",
             "data.val_manifest": digits / "val" / "manifest.json",
             **{f"train.{key}": value for key, value in train.items()}, **(extra or {})}
    args = []
    for key, value in pairs.items():
        args += ["--set", f"{key}={json.dumps(str(value)) if isinstance(value, Path) else value}"]
    return args


def held_before(step: int, gate: Path) -> dict[str, str]:
    """`smoke_overrides` extras that make every rank wait before ``step`` until ``gate`` exists
    (VILSCALE_INJECT_HOLD, vilscale/orchestration/faults.py): a test kills, loses or signals while the run
    is surely mid-way, however fast the machine steps, then creates ``gate``."""
    return {"launcher.env.VILSCALE_INJECT_HOLD": f"{step}:{gate}"}


def metric_steps(run_dir: Path) -> list[int]:
    """The step of every training record in metrics.jsonl, in the order the run wrote them."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if "loss" in r]


def sample_records(run_dir: Path) -> dict[int, list[tuple[int, list[int]]]]:
    """{rank: (step, sample indices) of every step the rank trained, in order} from RUN_DIR/samples/rank{r}.jsonl
    (``train.record_samples=true``); a step trained again after a resume appears again."""
    out = {}
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[int(path.stem.removeprefix("rank"))] = [(r["step"], r["indices"]) for r in records]
    return out


def check_trained_steps(run_dir: Path, expected: dict[int, list[int]]) -> None:
    """Each rank trained exactly the steps ``expected[rank]``, in that order (a step redone after a resume listed
    again), and a step trained twice read the same samples both times; the ranks read disjoint samples."""
    records = sample_records(run_dir)
    assert sorted(records) == sorted(expected), f"sample records of ranks {sorted(records)}"
    final = {}
    for rank, trained in records.items():
        assert [step for step, _ in trained] == expected[rank], f"rank {rank} trained steps {[s for s, _ in trained]}"
        for step, indices in trained:
            assert final.setdefault((rank, step), indices) == indices, f"rank {rank} redid step {step} on other samples"
    seen = [i for indices in final.values() for i in indices]
    assert len(seen) == len(set(seen)), "the ranks read overlapping samples"


# ------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports. Every probe stays bound until all are chosen: ports asked for one at a
    time can repeat (the kernel may hand a just-closed port out again), and a Ray head given the same port for
    two components refuses to start."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def find_binary(name: str) -> str | None:
    """A binary on PATH or in the system sbin folders (root's daemons live there)."""
    return shutil.which(name) or shutil.which(name, path=SYSTEM_PATH)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


class ServiceDied(RuntimeError):
    """The process being waited for has exited: waiting longer cannot help."""


def wait_until(predicate, *, timeout_s: float, what: str, logs: tuple[Path, ...] = (), poll_s: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; fail with the logs' tails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except ServiceDied:
            raise
        except Exception as error:  # the service is not up yet
            last_error = error
        time.sleep(poll_s)
    details = "\n".join(f"--- {log} ---\n{tail(log)}" for log in logs)
    raise TimeoutError(f"{what} not reached within {timeout_s:.0f} s (last error: {last_error})\n{details}")


def http_json(url: str, timeout_s: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def stop_process(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; only this process (and its group when it leads one)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; an exited daemon waiting to be reaped by init (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# ------------------------------------------------------------------------------------------------ Ray


def _stop_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the leader of a process group started with ``start_new_session=True``, then SIGKILL what is
    left of its group after ``grace_s`` (the group holds only the processes this leader started)."""
    group = process.pid
    stop_process(process, timeout_s=grace_s)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(group):
        time.sleep(0.2)
    if _group_alive(group):
        os.killpg(group, signal.SIGKILL)


def _ray_binary() -> Path:
    ray = Path(sys.executable).parent / "ray"
    if not ray.exists():
        raise FileNotFoundError(str(ray))
    return ray


def _ray_env(env: dict | None) -> dict:
    # The Ray job's entrypoint and workers inherit this environment (PATH included).
    process_env = {**os.environ, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(env or {})}
    process_env["PATH"] = f"{Path(sys.executable).parent}:{process_env.get('PATH', SYSTEM_PATH)}"
    return process_env


@dataclass
class RayHead:
    dashboard_url: str
    """http://127.0.0.1:PORT, the Job Submission API and state API address."""
    gcs_address: str
    """NODE_IP:PORT, what `ray.init(address=...)` and `ray start --address` take."""
    temp_dir: Path
    log: Path
    process: subprocess.Popen
    node_ip_address: str = "127.0.0.1"
    """The address the head was started with (on loopback Ray registers it at the machine's address)."""

    def stop(self) -> None:
        # `ray start --block` tears down the processes it started when it gets SIGTERM (`ray stop` would
        # stop every Ray cluster on the machine, other people's included).
        # The head was started in a session of its own, so its process group holds only this cluster's
        # processes: whatever is left of it after a grace period is killed.
        _stop_group(self.process)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def alive_workers(self, class_name: str = "RayTrainWorker") -> list[int]:
        """PIDs of this cluster's alive actors of ``class_name``."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True,
                             raise_on_missing_output=False)
        return [a.pid for a in actors if class_name in (a.class_name or "") and a.pid]

    def nodes(self) -> dict[str, str]:
        """{node IP address: state (ALIVE or DEAD)} of every node the cluster has known; a node that was
        replaced at the same address shows its newest incarnation's state."""
        from ray.util.state import list_nodes

        states: dict[str, str] = {}
        for node in list_nodes(address=self.dashboard_url, detail=True, raise_on_missing_output=False):
            if states.get(node.node_ip) != "ALIVE":
                states[node.node_ip] = node.state
        return states


def start_ray_head(num_cpus: int = 2, env: dict | None = None, node_ip_address: str = "127.0.0.1") -> RayHead:
    """A Ray head whose GCS and raylet use ``node_ip_address`` (loopback: a one-node cluster; an address
    that other nodes reach: the head of a multi-node cluster). The dashboard, hence the Job Submission
    and state APIs, listens on 127.0.0.1 either way."""
    ray = _ray_binary()
    # Short path: Ray's unix sockets live under it (108-character limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="vsray-", dir="/tmp"))
    log = temp_dir / "ray-start.log"
    flags = ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
    dashboard_port, gcs_port, *component_ports = free_ports(2 + len(flags))
    ports = dict(zip(flags, component_ports))
    command = [str(ray), "start", "--head", "--block", f"--node-ip-address={node_ip_address}", f"--port={gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={100 * 2**20}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats",
               *[f"{flag}={port}" for flag, port in ports.items()]]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_ray_env(env),
                                   start_new_session=True)
    head = RayHead(dashboard_url=f"http://127.0.0.1:{dashboard_port}", gcs_address=f"{node_ip_address}:{gcs_port}",
                   temp_dir=temp_dir, log=log, process=process, node_ip_address=node_ip_address)
    try:
        def ready():
            if process.poll() is not None:
                raise ServiceDied(f"ray start exited with code {process.returncode}:\n{tail(log)}")
            # Any alive node: asked for 127.0.0.1, Ray registers the head at the machine's own address.
            return http_json(f"{head.dashboard_url}/api/version") and "ALIVE" in head.nodes().values()

        wait_until(ready, timeout_s=120, what="Ray head ready", logs=(log,), poll_s=1.0)
    except BaseException:
        head.stop()
        raise
    return head


@dataclass
class RayWorkerNode:
    """A non-head node of a Ray cluster, in a process group (and a temp dir) of its own."""

    head: RayHead
    node_ip_address: str
    temp_dir: Path
    log: Path
    process: subprocess.Popen

    def raylet_pid(self) -> int | None:
        """The PID of this node's raylet (None once it is gone)."""
        return next((pid for pid in _group_members(self.process.pid) if _command_name(pid) == "raylet"), None)

    def kill_raylet(self) -> int:
        """SIGKILL this node's raylet (node loss as Ray sees it); returns its PID. `ray start --block` notices
        and ends the node's other processes; `wait_stopped` waits for that."""
        pid = self.raylet_pid()
        if pid is None:
            raise RuntimeError(f"the Ray node {self.node_ip_address} has no raylet running\n{tail(self.log)}")
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_stopped(self, timeout_s: float = 30) -> None:
        wait_until(lambda: self.process.poll() is not None and not _group_alive(self.process.pid),
                   timeout_s=timeout_s, what=f"Ray node {self.node_ip_address} stopped", logs=(self.log,))

    def stop(self) -> None:
        if self.process.poll() is None or _group_alive(self.process.pid):
            _stop_group(self.process)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == group:
                    members.append(int(entry.name))
            except ProcessLookupError:
                pass
    return members


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def start_ray_worker(head: RayHead, node_ip_address: str, *, num_cpus: int = 1, env: dict | None = None,
                     launch_prefix: tuple[str, ...] = ()) -> RayWorkerNode:
    """A worker node joined to ``head``'s cluster at ``node_ip_address``, started through ``launch_prefix``
    (e.g. the command that enters a network-namespace host). It has its own temp dir, so stopping it
    touches nothing of the head's or of any other Ray cluster on the machine."""
    ray = _ray_binary()
    temp_dir = Path(tempfile.mkdtemp(prefix="vsrayw-", dir="/tmp"))
    log = temp_dir / "ray-start.log"
    command = [*launch_prefix, str(ray), "start", "--block", f"--address={head.gcs_address}",
               f"--node-ip-address={node_ip_address}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--object-store-memory={100 * 2**20}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_ray_env(env),
                                   start_new_session=True)
    node = RayWorkerNode(head=head, node_ip_address=node_ip_address, temp_dir=temp_dir, log=log, process=process)
    try:
        def ready():
            if process.poll() is not None:
                raise ServiceDied(f"ray start (worker at {node_ip_address}) exited with code "
                                  f"{process.returncode}:\n{tail(log)}")
            return head.nodes().get(node_ip_address) == "ALIVE"

        wait_until(ready, timeout_s=120, what=f"Ray worker node {node_ip_address} alive", logs=(log, head.log),
                   poll_s=0.5)
    except BaseException:
        node.stop()
        raise
    return node


# ---------------------------------------------------------------------------------------------- SLURM


@dataclass(frozen=True)
class SlurmNode:
    """One node of a test SLURM cluster."""

    name: str
    """NodeName (slurmd -N NAME); what SLURM_JOB_NODELIST and `scontrol show hostnames` list."""
    address: str
    """NodeAddr: where slurmctld and srun reach this node's slurmd."""
    launch_prefix: tuple[str, ...] = ()
    """Command prefix that runs a program on this node (empty: this machine's root namespace)."""


LOCALHOST_NODE = SlurmNode("localhost", "127.0.0.1")


@dataclass
class SlurmCluster:
    conf: Path
    """The generated slurm.conf; client commands find it through SLURM_CONF."""
    root: Path
    munged_pid_file: Path
    nodes: tuple[SlurmNode, ...] = (LOCALHOST_NODE,)
    processes: list = field(default_factory=list)

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str, check: bool = True, timeout_s: float = 30) -> str:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s,
                                env={**os.environ, **self.env})
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def node(self, name: str) -> SlurmNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in this cluster; it has {[n.name for n in self.nodes]}")

    def slurmd_log(self, name: str) -> Path:
        return self.root / "log" / f"slurmd-{name}.log"

    def logs(self) -> tuple[Path, ...]:
        return (self.root / "log" / "slurmctld.log", *(self.slurmd_log(node.name) for node in self.nodes))

    def node_states(self) -> dict[str, str]:
        """{node name: sinfo's short state}: idle, alloc, mix, down, down*, idle*, ..."""
        output = self.command("sinfo", "--noheader", "--Node", "--format=%N %t", check=False)
        return dict(line.split() for line in output.splitlines() if len(line.split()) == 2)

    def start_slurmd(self, name: str) -> None:
        """Start (or restart, after a node loss) the slurmd of node ``name`` on that node."""
        node = self.node(name)
        subprocess.run([*node.launch_prefix, find_binary("slurmd"), "-N", node.name, "-f", str(self.conf)],
                       check=True, env={**os.environ, **self.env}, timeout=30)

    def wait_idle(self, names: tuple[str, ...] | None = None, timeout_s: float = 60) -> None:
        """Wait until every node in ``names`` (default: all) is idle, i.e. up and free."""
        names = names or tuple(node.name for node in self.nodes)
        wait_until(lambda: all(self.node_states().get(name) == "idle" for name in names), timeout_s=timeout_s,
                   what=f"SLURM node(s) {', '.join(names)} idle", logs=self.logs())

    def stop(self) -> None:
        try:
            self.command("scancel", "--user", "root", check=False)
            wait_until(lambda: not self.command("squeue", "--noheader", check=False).strip(), timeout_s=30,
                       what="SLURM queue empty")
        except Exception:
            pass
        self.command("scontrol", "shutdown", check=False)
        pid_files = [(path, 10) for path in sorted(self.root.glob("slurmd-*.pid"))]
        for pid_file, grace_s in (*pid_files, (self.root / "slurmctld.pid", 10),
                                  (self.munged_pid_file, 0)):  # munged does not stop with the cluster
            try:
                pid = int(pid_file.read_text().strip())
            except (FileNotFoundError, ValueError):
                continue
            deadline = time.monotonic() + grace_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def _hardware() -> dict:
    """This machine's CPUs and memory as slurmd sees them (`slurmd -C`)."""
    output = subprocess.run([find_binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in output.split() if "=" in item)
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {key: fields[key] for key in keys if key in fields}


def start_slurm(nodes: tuple[SlurmNode, ...] = (LOCALHOST_NODE,), controller_address: str = "127.0.0.1",
                task_env: dict[str, str] | None = None, slurmd_timeout_s: int = 300) -> SlurmCluster:
    """munged with a generated key, slurmctld on ``controller_address`` and one slurmd per node, with a
    generated slurm.conf. Each node is this machine's hardware (nodes on one machine share it).

    ``task_env``: variables every task gets whatever the submitter's environment (set by a TaskProlog, as a
    site administrator would, e.g. GLOO_SOCKET_IFNAME for the nodes' network interface).
    ``slurmd_timeout_s``: how long a silent slurmd may go before slurmctld marks its node DOWN.
    """
    for binary in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo"):
        if find_binary(binary) is None:
            raise FileNotFoundError(binary)
    root = Path(tempfile.mkdtemp(prefix="vsslurm-", dir="/tmp"))
    root.chmod(0o755)  # munged wants its socket's folder reachable by everyone
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    # One munged serves every node: its socket is on the filesystem, which all nodes share.
    socket_path = root / "munge" / "munge.socket"
    munged_pid_file = root / "munge" / "munged.pid"
    subprocess.run([find_binary("munged"), "--force", f"--key-file={key}", f"--socket={socket_path}",
                    f"--pid-file={munged_pid_file}", f"--log-file={root / 'log' / 'munged.log'}",
                    f"--seed-file={root / 'munge' / 'seed'}"], check=True, capture_output=True, timeout=30)
    cluster = SlurmCluster(conf=root / "slurm.conf", root=root, munged_pid_file=munged_pid_file, nodes=tuple(nodes))
    try:
        hardware = " ".join(f"{k}={v}" for k, v in _hardware().items())
        (root / "plugstack.conf").write_text("")
        # slurmctld checks that it runs on SlurmctldHost; "localhost" is accepted on loopback only.
        controller = "localhost" if controller_address == "127.0.0.1" else socket.gethostname().split(".")[0]
        task_prolog = ""
        if task_env:
            prolog = root / "task_prolog.sh"
            prolog.write_text("#!/bin/sh\n" + "".join(f"echo export {k}={v}\n" for k, v in task_env.items()))
            prolog.chmod(0o755)
            task_prolog = f"TaskProlog={prolog}"
        node_lines = "\n".join(f"NodeName={n.name} NodeHostname={n.name} NodeAddr={n.address} {hardware} "
                               "State=UNKNOWN" for n in nodes)
        slurmctld_port, slurmd_port = free_ports(2)
        cluster.conf.write_text(f"""\
ClusterName=vilscale-test
SlurmctldHost={controller}({controller_address})
SlurmctldPort={slurmctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={socket_path},cred_expire=5
StateSaveLocation={root / 'state'}
# %n: the node's name, so that several slurmd on one machine keep their files apart.
SlurmdSpoolDir={root / 'spool' / '%n'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd-%n.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}
PlugStackConfig={root / 'plugstack.conf'}
{task_prolog}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
# Look at pending jobs every second, so a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout={slurmd_timeout_s}
# A requeued job's processes get SIGKILL this long after SIGTERM (default 30 s); the test requeues mid-run.
KillWait=1
# Real preemption: a job of the higher-tier partition `urgent` requeues the jobs of `debug` whose resources it needs
# (SIGTERM to every process, then SIGKILL after the partition's GraceTime), as a site with PreemptMode=REQUEUE does.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{node_lines}
PartitionName=debug Nodes={",".join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 \
GraceTime=60
PartitionName=urgent Nodes={",".join(n.name for n in nodes)} MaxTime=INFINITE State=UP PriorityTier=2
""")
        subprocess.run([find_binary("slurmctld"), "-i", "-f", str(cluster.conf)], check=True,
                       env={**os.environ, **cluster.env}, timeout=30)
        for node in nodes:
            cluster.start_slurmd(node.name)
        cluster.wait_idle(timeout_s=60)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ----------------------------------------------------------------------------------------- Prometheus


@dataclass
class Prometheus:
    url: str
    root: Path
    targets_dir: Path
    """file_sd folder of the shipped config: link a run's prometheus_targets.json here as RUN.json."""
    process: subprocess.Popen

    def query(self, expression: str) -> list:
        data = http_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression}))
        if data.get("status") != "success":
            raise RuntimeError(f"query {expression!r} failed: {data}")
        return data["data"]["result"]

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


def start_prometheus(scrape_interval: str = "1s") -> Prometheus:
    """Prometheus with jobs/monitoring/prometheus.yml, scraping faster so a seconds-long run is seen."""
    binary = find_binary("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus")
    root = Path(tempfile.mkdtemp(prefix="vsprom-", dir="/tmp"))
    config = yaml.safe_load((REPO / "jobs" / "monitoring" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)  # must not exceed the interval
        for sd in job.get("file_sd_configs", []):
            sd["refresh_interval"] = scrape_interval
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    targets_dir = root / "targets"
    targets_dir.mkdir()
    port = free_port()
    log = root / "prometheus.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}",
                                    f"--web.listen-address=127.0.0.1:{port}",
                                    f"--storage.tsdb.path={root / 'tsdb'}"],
                                   stdout=handle, stderr=subprocess.STDOUT, cwd=root)
    server = Prometheus(url=f"http://127.0.0.1:{port}", root=root, targets_dir=targets_dir, process=process)
    try:
        def ready():
            if process.poll() is not None:
                raise ServiceDied(f"prometheus exited with code {process.returncode}:\n{tail(log)}")
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                return response.status == 200

        wait_until(ready, timeout_s=60, what="Prometheus ready", logs=(log,))
    except BaseException:
        server.stop()
        raise
    return server
