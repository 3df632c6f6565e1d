"""`vilscale jobs [list | show NAME | copy NAME [DEST] | path]`: the job specs shipped with vilscale.

Every command that takes a job (train, plan, submit, eval, predict, demo) accepts a shipped job's name as well as a
path; `copy` writes one out for editing (never over an existing file); `path` prints the folder they live in (its
``monitoring/`` holds the Prometheus configuration and the Grafana dashboard)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def add_parser(parser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=("list", "show", "copy", "path"),
                        help="list (default): name and what each job is; show NAME: print it; copy NAME [DEST]: "
                             "write it (or the monitoring folder) to DEST for editing; path: the shipped folder")
    parser.add_argument("name", nargs="?", help="a shipped job's name (show, copy), or 'monitoring' (copy)")
    parser.add_argument("dest", nargs="?", help="copy: the file or folder to write (default: ./NAME.yaml)")


def run(args) -> int:
    from vilscale.errors import EXIT_SPEC_ERROR
    from vilscale.orchestration.config import shipped

    if args.action == "path":
        print(shipped.JOBS_DIR)
        return 0
    if args.action == "list":
        width = max(len(name) for name in shipped.names())
        for name in shipped.names():
            print(f"{name:<{width}}  {shipped.summary(shipped.shipped(name))}")
        return 0
    if not args.name:
        print(f"vilscale jobs {args.action}: give a job's name ({', '.join(shipped.names())})", file=sys.stderr)
        return EXIT_SPEC_ERROR
    if args.action == "copy" and args.name == "monitoring":
        dest = Path(args.dest or "monitoring")
        if dest.exists():
            print(f"vilscale jobs copy: {dest} exists; give another destination (nothing was written)", file=sys.stderr)
            return EXIT_SPEC_ERROR
        shutil.copytree(shipped.JOBS_DIR / "monitoring", dest)
        print(dest)
        return 0
    source = shipped.shipped(args.name)
    if source is None:
        print(f"vilscale jobs {args.action}: no shipped job is called {args.name!r}; the shipped jobs are "
              f"{', '.join(shipped.names())}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    if args.action == "show":
        sys.stdout.write(source.read_text())
        return 0
    dest = Path(args.dest or f"{source.stem}.yaml")
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists():
        print(f"vilscale jobs copy: {dest} exists; give another destination or remove it (nothing was written)",
              file=sys.stderr)
        return EXIT_SPEC_ERROR
    if not dest.parent.is_dir():
        print(f"vilscale jobs copy: folder {dest.parent} does not exist (nothing was written)", file=sys.stderr)
        return EXIT_SPEC_ERROR
    shutil.copyfile(source, dest)
    print(dest)
    return 0
