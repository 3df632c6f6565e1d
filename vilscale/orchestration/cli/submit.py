"""`vilscale submit JOB.yaml [--backend local|ray|slurm] [--address URL] [--wait] [--set key=value ...]`.

- ray: a Ray job (Job Submission API) that runs `vilscale train JOB --launcher ray` on the cluster.
- slurm: a submitit job, one task per GPU (or per CPU worker), requeued on timeout or preemption; its
  ranks are launched again within the allocation after a restartable failure (launcher.max_restarts).
- local: the SLURM path on this machine, through submitit's local executor.

Everything that can be checked before submitting is: the spec, that the cluster answers, that it has
the GPUs and CPUs the spec asks for. Exit codes: 0 submitted (or, with --wait, succeeded); 1 the job
failed; 2 nothing was submitted (invalid spec, unreachable cluster, too few resources).
"""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_JOB_FAILED = 1
EXIT_NOT_SUBMITTED = 2


def add_parser(parser) -> None:
    parser.add_argument("job", help="job spec: a YAML file, or a shipped job's name (`vilscale jobs`), e.g. smoke")
    parser.add_argument("--backend", choices=("local", "ray", "slurm"), default=None,
                        help="where to run (default: the spec's launcher.backend)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster: dashboard URL http://HEAD:8265, ray://HEAD:10001 or HEAD:6379 "
                             "(default: launcher.ray_address; 'auto' finds RAY_ADDRESS or a local cluster)")
    parser.add_argument("--wait", action="store_true",
                        help="block until the job ends, streaming its log; exit 1 if it failed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any key of the spec, e.g. --set launcher.nodes=4 (repeatable)")
    parser.add_argument("--python", default=None,
                        help="Ray: the interpreter the job runs on the cluster (default: this one, "
                             f"{sys.executable}); the entrypoint runs under /bin/sh with the head's PATH")
    parser.add_argument("--start-over", action="store_true",
                        help="train this run dir from step 0: its checkpoints (and TensorBoard events) are moved aside "
                             "into RUN_DIR/discarded-TIME/, nothing is deleted (what to do when none of them verifies)")
    parser.add_argument("--allow-spec-change", action="store_true",
                        help="resume a run dir whose spec differs in adjustable keys (max_steps, epochs, lr, ...)")
    parser.add_argument("--skip-resource-check", action="store_true",
                        help="submit even if the cluster has fewer GPUs/CPUs now (e.g. an autoscaling cluster)")


def run(args) -> int:
    from vilscale.orchestration.checkpoint.rundir import RunDirError
    from vilscale.orchestration.config import SpecError, load_spec
    from vilscale.orchestration.launch.common import LaunchError, with_absolute_paths
    from vilscale.orchestration.launch.preflight import preflight

    try:
        spec = load_spec(args.job, args.overrides)
        backend = args.backend or spec.launcher.backend
        # The checks the job's ranks would otherwise fail on, with the paths pinned as the job will see them.
        preflight(with_absolute_paths(spec, Path.cwd()), world_size=spec.launcher.world_size, local=backend == "local",
                  allow_spec_change=args.allow_spec_change)
    except SpecError as error:
        prefix = "" if isinstance(error, RunDirError) else "invalid job spec: "
        print(f"vilscale submit: nothing submitted: {prefix}{error}", file=sys.stderr)
        return EXIT_NOT_SUBMITTED
    if args.start_over:
        from vilscale.orchestration.launch.session import start_from_scratch

        start_from_scratch(Path(with_absolute_paths(spec, Path.cwd()).run_dir))
    try:
        if backend == "ray":
            from vilscale.orchestration.launch.ray import submit_ray

            code = submit_ray(spec, spec_path=Path(args.job), overrides=args.overrides, address=args.address,
                              wait=args.wait, python=args.python, check_resources=not args.skip_resource_check,
                              allow_spec_change=args.allow_spec_change)
        else:
            if args.address:
                print(f"vilscale submit: --address is for --backend ray (ignored for {backend})", file=sys.stderr)
            from vilscale.orchestration.launch.slurm import submit_submitit

            code = submit_submitit(spec, backend=backend, wait=args.wait,
                                   check_resources=not args.skip_resource_check)
    except LaunchError as error:
        print(f"vilscale submit: nothing submitted: {error}", file=sys.stderr)
        return EXIT_NOT_SUBMITTED
    return EXIT_JOB_FAILED if code else 0
