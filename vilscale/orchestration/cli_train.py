"""`vilscale train JOB.yaml [--set key=value ...] [--nproc N] [--launcher local|ray]`.

With ``--nproc N`` it starts N local ranks (gloo on CPU, nccl on GPU) and watches them: when one
dies, the others are stopped and the group restarts from the latest checkpoint, up to
``launcher.max_restarts`` times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vilscale.orchestration.spec import JobSpec, SpecError, load_spec, write_resolved

# Exit codes of a rank (vilscale.orchestration.worker); these three a restart cannot fix.
EXIT_SPEC_ERROR = 2
EXIT_NONFINITE = 3
EXIT_DATA_ERROR = 4
NOT_RESTARTABLE = {EXIT_SPEC_ERROR: "invalid job spec", EXIT_NONFINITE: "repeated non-finite losses",
                   EXIT_DATA_ERROR: "bad data"}


def add_parser(parser) -> None:
    parser.add_argument("job", help="job spec (YAML), e.g. jobs/smoke.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any key of the spec, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="local ranks to start (default: launcher.cpu_workers_per_node x nodes, or GPUs)")
    parser.add_argument("--launcher", choices=("local", "ray"), default="local",
                        help="local: processes on this machine; ray: a Ray Train TorchTrainer (inside a Ray job)")


def run(args) -> int:
    try:
        spec = load_spec(args.job, args.overrides)
        nproc = args.nproc if args.nproc is not None else spec.launcher.world_size
        if nproc < 1:
            raise SpecError(f"--nproc {nproc} must be >= 1")
        spec.check_world(nproc)
    except SpecError as error:
        print(f"vilscale train: invalid job spec: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    if args.launcher == "ray":
        if args.nproc is not None:
            print("vilscale train: --nproc does not apply to --launcher ray; the worker count is "
                  "launcher.nodes x launcher.gpus_per_node (or cpu_workers_per_node)", file=sys.stderr)
            return EXIT_SPEC_ERROR
        from ray.train import TrainingFailedError  # Ray Train v2's; v1 raises a RuntimeError subclass

        from vilscale.orchestration.launch_ray import train_on_ray

        try:
            summary = train_on_ray(spec)
        except (TrainingFailedError, RuntimeError) as error:
            print(f"vilscale train: the Ray Train run failed after {spec.launcher.max_restarts} restarts: "
                  f"{str(error).splitlines()[0][:300]}", file=sys.stderr)
            return 1
        print(json.dumps(summary))
        return 0
    summary = train_local(spec, nproc)
    return 0 if summary is not None else 1


def train_local(spec: JobSpec, nproc: int, *, max_restarts: int | None = None) -> dict | None:
    """Run the job on ``nproc`` local processes, restarting the group after a failure."""
    run_dir = Path(spec.run_dir)
    spec_path = write_resolved(spec, run_dir)
    restarts = spec.launcher.max_restarts if max_restarts is None else max_restarts
    for attempt in range(restarts + 1):
        code = _run_group(spec_path, nproc, spec)
        if code == 0:
            summary_path = run_dir / "summary.json"
            return json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        if code in NOT_RESTARTABLE:  # a restart cannot fix these; the rank printed why
            print(f"[vilscale] a rank stopped with exit code {code} ({NOT_RESTARTABLE[code]}); not restarting",
                  file=sys.stderr, flush=True)
            return None
        if attempt < restarts:
            print(f"[vilscale] a rank failed (exit code {code}); restarting from the latest checkpoint "
                  f"({attempt + 1}/{restarts})", file=sys.stderr, flush=True)
    print(f"[vilscale] giving up after {restarts} restarts", file=sys.stderr)
    return None


def _run_group(spec_path: Path, nproc: int, spec: JobSpec) -> int:
    from vilscale.orchestration.engine import free_port

    port = free_port()
    processes = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   **spec.launcher.env)
        if nproc > 1:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        processes.append(subprocess.Popen([sys.executable, "-m", "vilscale.orchestration.worker", str(spec_path)],
                                          env=env))
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                time.sleep(1.0)  # let the rank that caused it finish saying why
                _stop(processes)
                codes = [p.returncode for p in processes]
                # The root cause outranks the survivors that only lost their peer.
                return next((c for c in codes if c in NOT_RESTARTABLE), failed[0])
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(processes)
        raise


def _stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
