"""Real services on loopback for the integration tests: a Ray head, a one-node SLURM cluster (munge,
slurmctld, slurmd) and a Prometheus server. Each starts in its own temporary directory, on free ports,
and stops only the processes it started.
"""

from __future__ import annotations

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


def metric_steps(run_dir: Path) -> list[int]:
    """The step of every training record in metrics.jsonl, in the order the run wrote them."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if "loss" in r]


# ------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------ Ray


@dataclass
class RayHead:
    dashboard_url: str
    """http://127.0.0.1:PORT, the Job Submission API and state API address."""
    gcs_address: str
    """127.0.0.1:PORT, what `ray.init(address=...)` takes."""
    temp_dir: Path
    log: Path
    process: subprocess.Popen

    def stop(self) -> None:
        # `ray start --block` tears down the processes it started when it gets SIGTERM (`ray stop` would
        # stop every Ray cluster on the machine, other people's included).
        # The head was started in a session of its own, so its process group holds only this cluster's
        # processes: whatever is left of it after a grace period is killed.
        group = self.process.pid
        stop_process(self.process, timeout_s=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _group_alive(group):
            time.sleep(0.2)
        if _group_alive(group):
            os.killpg(group, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def alive_workers(self, class_name: str = "RayTrainWorker") -> list[int]:
        """PIDs of this cluster's alive actors of ``class_name``."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True,
                             raise_on_missing_output=False)
        return [a.pid for a in actors if class_name in (a.class_name or "") and a.pid]


def start_ray_head(num_cpus: int = 2, env: dict | None = None) -> RayHead:
    ray = Path(sys.executable).parent / "ray"
    if not ray.exists():
        raise FileNotFoundError(str(ray))
    # Short path: Ray's unix sockets live under it (108-character limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="vsray-", dir="/tmp"))
    log = temp_dir / "ray-start.log"
    dashboard_port, gcs_port = free_port(), free_port()
    ports = {name: free_port() for name in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                            "--dashboard-agent-grpc-port", "--metrics-export-port",
                                            "--runtime-env-agent-port", "--node-manager-port",
                                            "--object-manager-port")}
    command = [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={100 * 2**20}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats",
               *[f"{flag}={port}" for flag, port in ports.items()]]
    # The Ray job's entrypoint and workers inherit this environment (PATH included).
    process_env = {**os.environ, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(env or {})}
    process_env["PATH"] = f"{Path(sys.executable).parent}:{process_env.get('PATH', SYSTEM_PATH)}"
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=process_env,
                                   start_new_session=True)
    head = RayHead(dashboard_url=f"http://127.0.0.1:{dashboard_port}", gcs_address=f"127.0.0.1:{gcs_port}",
                   temp_dir=temp_dir, log=log, process=process)
    try:
        def ready():
            if process.poll() is not None:
                raise ServiceDied(f"ray start exited with code {process.returncode}:\n{tail(log)}")
            from ray.util.state import list_nodes

            nodes = list_nodes(address=head.dashboard_url, raise_on_missing_output=False)
            return http_json(f"{head.dashboard_url}/api/version") and any(n.state == "ALIVE" for n in nodes)

        wait_until(ready, timeout_s=120, what="Ray head ready", logs=(log,), poll_s=1.0)
    except BaseException:
        head.stop()
        raise
    return head


# ---------------------------------------------------------------------------------------------- SLURM


@dataclass
class SlurmCluster:
    conf: Path
    """The generated slurm.conf; client commands find it through SLURM_CONF."""
    root: Path
    munged_pid_file: Path
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

    def stop(self) -> None:
        try:
            self.command("scancel", "--user", "root", check=False)
            wait_until(lambda: not self.command("squeue", "--noheader", check=False).strip(), timeout_s=30,
                       what="SLURM queue empty")
        except Exception:
            pass
        self.command("scontrol", "shutdown", check=False)
        for pid_file, grace_s in ((self.root / "slurmd.pid", 10), (self.root / "slurmctld.pid", 10),
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


def start_slurm() -> SlurmCluster:
    """munged with a generated key, slurmctld and slurmd (NodeName=localhost) with a generated slurm.conf."""
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
    socket_path = root / "munge" / "munge.socket"
    munged_pid_file = root / "munge" / "munged.pid"
    subprocess.run([find_binary("munged"), "--force", f"--key-file={key}", f"--socket={socket_path}",
                    f"--pid-file={munged_pid_file}", f"--log-file={root / 'log' / 'munged.log'}",
                    f"--seed-file={root / 'munge' / 'seed'}"], check=True, capture_output=True, timeout=30)
    cluster = SlurmCluster(conf=root / "slurm.conf", root=root, munged_pid_file=munged_pid_file)
    try:
        hardware = _hardware()
        (root / "plugstack.conf").write_text("")
        node = " ".join(f"{k}={v}" for k, v in hardware.items())
        cluster.conf.write_text(f"""\
ClusterName=vilscale-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={socket_path},cred_expire=5
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
PlugStackConfig={root / 'plugstack.conf'}
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
# A requeued job's processes get SIGKILL this long after SIGTERM (default 30 s); the test requeues mid-run.
KillWait=1
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 {node} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        env = {**os.environ, **cluster.env}
        subprocess.run([find_binary("slurmctld"), "-i", "-f", str(cluster.conf)], check=True, env=env, timeout=30)
        subprocess.run([find_binary("slurmd"), "-N", "localhost", "-f", str(cluster.conf)], check=True, env=env,
                       timeout=30)
        logs = (root / "log" / "slurmctld.log", root / "log" / "slurmd.log")
        wait_until(lambda: cluster.command("sinfo", "--noheader", "--format=%t", check=False).strip() == "idle",
                   timeout_s=60, what="SLURM node idle", logs=logs)
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
