"""`vilscale train JOB.yaml [--set key=value ...] [--nproc N] [--launcher local|ray] [--allow-spec-change]
[--start-over]`."""

from __future__ import annotations

import json
import sys


def add_parser(parser) -> None:
    parser.add_argument("job", help="job spec: a YAML file, or a shipped job's name (`vilscale jobs`), e.g. smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any key of the spec, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="local ranks to start (default: launcher.cpu_workers_per_node x nodes, or GPUs)")
    parser.add_argument("--launcher", choices=("local", "ray"), default="local",
                        help="local: processes on this machine (torchrun); ray: a Ray Train TorchTrainer (inside a "
                             "Ray job)")
    parser.add_argument("--start-over", action="store_true",
                        help="train this run dir from step 0: its checkpoints (and TensorBoard events) are moved aside "
                             "into RUN_DIR/discarded-TIME/, nothing is deleted (what to do when none of them verifies)")
    parser.add_argument("--allow-spec-change", action="store_true",
                        help="resume a run dir whose spec differs in adjustable keys (max_steps, epochs, lr, "
                             "schedule, augmentation, data paths, ...)")


def run(args) -> int:
    from vilscale.errors import EXIT_FAILED, EXIT_SPEC_ERROR
    from vilscale.orchestration.launch.session import LaunchRefused, prepare_local_launch

    if args.launcher == "ray" and args.nproc is not None:
        print("vilscale train: --nproc does not apply to --launcher ray; the worker count is launcher.nodes x "
              "launcher.gpus_per_node (or cpu_workers_per_node)", file=sys.stderr)
        return EXIT_SPEC_ERROR
    try:
        session = prepare_local_launch(args.job, args.overrides, nproc=args.nproc, ray=args.launcher == "ray",
                                       allow_spec_change=args.allow_spec_change, start_over=args.start_over)
    except LaunchRefused as refused:
        print(f"vilscale train: {refused}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    with session:
        summary = session.run()
    if summary is None:
        return session.failure_code or EXIT_FAILED
    print(json.dumps(summary))
    return 0
