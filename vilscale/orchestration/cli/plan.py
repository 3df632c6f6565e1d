"""`vilscale plan JOB.yaml [--set ...] [--nproc N | --backend B] [--img-per-s N | --throughput FILE | --measure]`:
the resolved spec with every default, then what the run will do (ranks, batches, learning rate, steps, warmup,
attention switch, evaluations, checkpoints, shards per rank, parameters, FLOPs) and, given a throughput, its
wall time and device-hours. Nothing is written and no rank starts; the pre-flight's verdict is printed too."""

from __future__ import annotations

import json
import sys


def add_parser(parser) -> None:
    parser.add_argument("job", help="job spec: a YAML file, or a shipped job's name (`vilscale jobs`), e.g. "
                                     "pretrain_21k")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any key of the spec, as `vilscale train` does (repeatable)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--nproc", type=int, default=None, help="local ranks, as `vilscale train --nproc N`")
    where.add_argument("--backend", choices=("local", "ray", "slurm"), default=None,
                       help="plan a `vilscale submit --backend B`: launcher.nodes x gpus_per_node (or "
                            "cpu_workers_per_node) ranks")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="training samples, when the data cannot be read here (ImageNet-21K: 14197122)")
    parser.add_argument("--val-samples", type=int, default=None, help="validation samples, likewise")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--img-per-s", type=float, default=None, help="measured training images/s per rank")
    speed.add_argument("--throughput", default=None, metavar="FILE",
                       help="a benchmarks/train.py result (e.g. benchmarks/results/gpu_check-h200-06abbf4.json)")
    speed.add_argument("--measure", action="store_true",
                       help="time a few training steps of the job's model on this machine")
    parser.add_argument("--measure-steps", type=int, default=5, help="timed steps of --measure (default 5)")
    parser.add_argument("--gpu", default="", help="device name for the implied MFU (H100, H200, A100, ...)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object instead")


def run(args) -> int:
    from vilscale.errors import EXIT_SPEC_ERROR
    from vilscale.orchestration import plan as planning
    from vilscale.orchestration.config import SpecError, load_spec

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        for name in ("nproc", "train_samples", "measure_steps"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise SpecError(f"--{name.replace('_', '-')} {value} must be >= 1")
        if args.val_samples is not None and args.val_samples < 0:
            raise SpecError(f"--val-samples {args.val_samples} must be >= 0")
        if args.img_per_s is not None and not args.img_per_s > 0:
            raise SpecError(f"--img-per-s {args.img_per_s} must be > 0")
        spec = load_spec(args.job, args.overrides)
        world_size = args.nproc or spec.launcher.world_size
        throughput = None
        if args.img_per_s:
            throughput = planning.Throughput(img_per_s=args.img_per_s, source="given with --img-per-s",
                                             device=args.gpu)
        elif args.throughput:
            throughput = planning.throughput_from_file(args.throughput, spec)
        elif args.measure:
            throughput = planning.measure_throughput(spec, steps=args.measure_steps, log=say)
        device = args.gpu or (throughput.device if throughput else "")
        peak = planning.peak_flops_of(device, spec.train.precision, spec.metrics.peak_flops)
        plan = planning.plan_job(spec, world_size, train_samples=args.train_samples, val_samples=args.val_samples,
                        throughput=throughput, peak_flops=peak)
    except SpecError as error:
        print(f"vilscale plan: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    plan["preflight"] = _preflight_verdict(spec, world_size, local=args.backend in (None, "local"))
    if args.json:
        print(json.dumps({"spec": spec.to_dict(), "plan": plan}))
        return 0
    import yaml

    print("# the resolved spec, every default included")
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False).rstrip())
    print("# the plan")
    for line in planning.plan_lines(plan):
        print(line)
    print(f"pre-flight here:     {plan['preflight']}")
    return 0


def _preflight_verdict(spec, world_size: int, *, local: bool) -> str:
    """The launch's own checks, run as `vilscale train`/`submit` would (they write nothing)."""
    from vilscale.orchestration.config import SpecError
    from vilscale.orchestration.launch.preflight import preflight

    try:
        preflight(spec, world_size=world_size, local=local)
    except SpecError as error:
        return f"would refuse: {error}"
    return "passed"
