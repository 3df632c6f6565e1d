"""Where a benchmark figure comes from: the commit it was measured at and the machine it ran on.
Shared by the scripts in this folder (run as ``python benchmarks/NAME.py``, which puts this folder on
``sys.path``)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The short commit id, with ``+uncommitted changes`` when the code that is measured differs from it;
    ``VILSCALE_COMMIT`` when set (a copy of the tree without its git history, as on a lent GPU machine)."""
    if os.environ.get("VILSCALE_COMMIT"):
        return os.environ["VILSCALE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "vilscale", "benchmarks",
                                "setup.py"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
