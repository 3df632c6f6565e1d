"""Build DeepSpeed's JIT communication op once, during setup, instead of inside the first test, and check that
torchvision's C++ ops (nms, roi_align: what the detectors run) work beside the installed torch.

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


def check_torchvision_ops() -> None:
    """nms and roi_align on the CPU; a torchvision built for another torch fails here, not in a detection run."""
    import torch
    import torchvision
    from torchvision.ops import nms, roi_align

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
    kept = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
    pooled = roi_align(torch.arange(64.0).reshape(1, 1, 8, 8), [torch.tensor([[0.0, 0.0, 3.0, 3.0]])], 2,
                       aligned=True)
    if kept != [0, 2] or pooled.shape != (1, 1, 2, 2):
        raise SystemExit(f"torchvision {torchvision.__version__} ops give wrong results beside torch "
                         f"{torch.__version__} (nms kept {kept}); install the torchvision built for this torch")
    print(f"torchvision {torchvision.__version__}: nms and roi_align run on the CPU beside torch {torch.__version__}")


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    check_torchvision_ops()
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
