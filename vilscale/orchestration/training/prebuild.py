"""Build DeepSpeed's JIT communication op once, during setup, instead of inside the first test.

On CPU, the first ``deepspeed.initialize`` compiles its shared-memory communication op (about a
minute and several GB of memory on a 2-core machine). A build killed midway leaves a ``lock`` file
that makes every later build wait forever; this step removes such a lock only when no compiler is
running on that extension folder, then builds the op with the ninja found on PATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torch_extensions_root() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent


def clear_stale_locks(root: Path) -> list[Path]:
    """Remove ``lock`` files under ``root`` that no running build holds."""
    removed = []
    for lock in root.glob("*/lock"):
        result = subprocess.run(["pgrep", "-f", str(lock.parent)], capture_output=True, text=True)
        if result.stdout.strip():
            continue  # a build is running on that folder right now
        lock.unlink(missing_ok=True)
        removed.append(lock)
    return removed


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from vilscale.orchestration.training.engine import use_environment_ninja

    use_environment_ninja()
    root = torch_extensions_root()
    for lock in clear_stale_locks(root):
        print(f"removed a stale build lock left by an interrupted build: {lock}")
    from deepspeed.comm.torch import build_shm_op

    if build_shm_op() is None:
        print("DeepSpeed's shared-memory op is not used on this machine; nothing to build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
