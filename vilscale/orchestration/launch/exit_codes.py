"""How a rank ends, as an exit code every launcher understands.

An error is classified where it arises: a user's mistake or bad data (no restart can fix it: exit 2
or 4, and the run stops with one line) versus a transient fault (a crashed peer, a full disk being
freed, a lost node, a collective that timed out, a shared file system that stayed unreadable through
its retries: exit 1, restarted from the latest checkpoint). Running out of memory is deterministic (the
same batch on the same machine runs out again): exit 5, with the figures and the fix. Launchers never
restart the first kind: the local launcher and SLURM look at the exit code, Ray at the exception type.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
"""A fault that a restart from the latest checkpoint may get past."""
EXIT_SPEC_ERROR = 2
"""The job spec, the run dir or the launch itself is wrong: fix it and relaunch."""
EXIT_NONFINITE = 3
"""Repeated non-finite losses: change the recipe (lr, clipping) or the data."""
EXIT_DATA_ERROR = 4
"""The data is missing or corrupt: rewrite the shards."""
EXIT_OUT_OF_MEMORY = 5
"""A rank ran out of device or host memory: the same batch on the same machine would again."""

NOT_RESTARTABLE = {EXIT_SPEC_ERROR: "invalid job spec", EXIT_NONFINITE: "repeated non-finite losses",
                   EXIT_DATA_ERROR: "bad data", EXIT_OUT_OF_MEMORY: "out of memory"}

# What gloo/nccl collectives raise on the survivors when a peer process dies, or stops answering until
# `train.collective_timeout_s` runs out (a host lost mid-collective).
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
                      "Broken pipe", "Socket Timeout", "connection refused", "Timed out waiting",
                      "Timeout waiting", "timed out after")


def classify(error: BaseException) -> tuple[int, str]:
    """(exit code, the one line to print) for an exception that ended a rank."""
    import torch

    from vilscale.data.manifest import DataError
    from vilscale.files import TransientIOError
    from vilscale.orchestration.checkpoint import CheckpointError
    from vilscale.orchestration.config import SpecError
    from vilscale.orchestration.training.distributed import RendezvousError
    from vilscale.orchestration.training.step import NonFiniteLossError, OutOfMemory

    if isinstance(error, SpecError | RendezvousError):
        return EXIT_SPEC_ERROR, f"invalid job spec: {error}"
    if isinstance(error, DataError):
        return EXIT_DATA_ERROR, f"data error: {error}"
    if isinstance(error, NonFiniteLossError):
        return EXIT_NONFINITE, str(error)
    if isinstance(error, OutOfMemory | torch.OutOfMemoryError):
        return EXIT_OUT_OF_MEMORY, f"out of memory: {str(error).splitlines()[0][:600]}"
    if isinstance(error, TransientIOError):
        return EXIT_FAILED, f"rank failed: {error}"
    if isinstance(error, CheckpointError):
        return EXIT_FAILED, f"rank failed: {error}"
    if isinstance(error, RuntimeError) and any(sign.lower() in str(error).lower() for sign in PEER_FAILURE_SIGNS):
        # Another rank died (its own message says why); a traceback per survivor would only bury it.
        return EXIT_FAILED, f"stopped because another rank failed ({str(error).splitlines()[0][:160]})"
    return EXIT_FAILED, ""


def is_restartable(code: int) -> bool:
    return code not in NOT_RESTARTABLE
