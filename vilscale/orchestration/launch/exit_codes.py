"""Which exit code an exception that ended a rank means (the codes and their meaning: ``vilscale.errors``)."""

from __future__ import annotations

from vilscale.errors import (  # noqa: F401  (re-exported: the launchers' one import)
    EXIT_DATA_ERROR,
    EXIT_FAILED,
    EXIT_NO_CHECKPOINT,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_OUT_OF_MEMORY,
    EXIT_RUN_DIR_LOST,
    EXIT_SPEC_ERROR,
    NOT_RESTARTABLE,
    is_restartable,
)

# What gloo/nccl collectives raise on the survivors when a peer process dies, or stops answering until
# `train.collective_timeout_s` runs out (a host lost mid-collective).
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
                      "Broken pipe", "Socket Timeout", "connection refused", "Timed out waiting",
                      "Timeout waiting", "timed out after", "Watchdog caught collective operation timeout",
                      "NCCL error", "ncclRemoteError", "ncclSystemError")
# What NCCL says when a device runs out of memory inside a collective (a DistBackendError, not torch's OOM error).
NCCL_OUT_OF_MEMORY_SIGNS = ("CUDA error: out of memory", "ncclSystemError: System call (e.g. socket, malloc)",
                            "Failed to CUDA calloc", "cudaErrorMemoryAllocation")


def classify(error: BaseException) -> tuple[int, str]:
    """(exit code, the one line to print) for an exception that ended a rank."""
    import torch

    from vilscale.data.manifest import DataError
    from vilscale.files import TransientIOError
    from vilscale.orchestration.checkpoint import CheckpointError, NoUsableCheckpoint
    from vilscale.orchestration.checkpoint.rundir import RunDirLost
    from vilscale.orchestration.config import SpecError
    from vilscale.orchestration.training.distributed import RendezvousError
    from vilscale.orchestration.training.step import NonFiniteLossError, OutOfMemory

    if isinstance(error, RunDirLost):
        return EXIT_RUN_DIR_LOST, f"run dir lost: {error}"
    if isinstance(error, NoUsableCheckpoint):
        return EXIT_NO_CHECKPOINT, str(error)
    if isinstance(error, SpecError | RendezvousError):
        return EXIT_SPEC_ERROR, f"invalid job spec: {error}"
    if isinstance(error, DataError):
        return EXIT_DATA_ERROR, f"data error: {error}"
    if isinstance(error, NonFiniteLossError):
        return EXIT_NONFINITE, str(error)
    if isinstance(error, OutOfMemory | torch.OutOfMemoryError):
        return EXIT_OUT_OF_MEMORY, f"out of memory: {str(error).splitlines()[0][:600]}"
    if isinstance(error, RuntimeError) and any(sign in str(error) for sign in NCCL_OUT_OF_MEMORY_SIGNS):
        return EXIT_OUT_OF_MEMORY, (f"out of memory inside a collective (NCCL): {str(error).splitlines()[0][:400]}. "
                                    "Lower train.micro_batch or raise train.zero_stage; NCCL_BUFFSIZE also takes "
                                    "device memory")
    if isinstance(error, TransientIOError):
        return EXIT_FAILED, f"rank failed: {error}"
    if isinstance(error, CheckpointError):
        return EXIT_FAILED, f"rank failed: {error}"
    if isinstance(error, RuntimeError) and any(sign.lower() in str(error).lower() for sign in PEER_FAILURE_SIGNS):
        # Another rank died (its own message says why); a traceback per survivor would only bury it.
        return EXIT_FAILED, f"stopped because another rank failed ({str(error).splitlines()[0][:160]})"
    return EXIT_FAILED, ""
