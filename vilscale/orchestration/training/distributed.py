"""Joining the process group and choosing this rank's device.

Every launcher describes the group in the torch convention (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): torchrun locally, submitit's
``TorchDistributedEnvironment`` on SLURM; Ray Train creates the group itself before the train function
runs. What a launcher leaves out is an error here, never a silent default: a rank that guessed
``MASTER_ADDR=127.0.0.1`` on a multi-node job would wait forever for peers that never come.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from vilscale.devices import resolve_device
from vilscale.orchestration.config import SpecError

RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")
NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


def nccl_environment(run_dir: str, env=os.environ) -> dict[str, str]:
    """What NCCL must be told before the process group exists, set in ``env`` where the site did not set it
    (returned): errors are handled asynchronously (``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``: a lost peer aborts the
    communicator and raises, or the watchdog aborts the process, instead of a hang), and a collective timeout dumps
    the flight recorder's trace into ``RUN_DIR/nccl_traces/`` (``TORCH_NCCL_DUMP_ON_TIMEOUT``). A site setting of
    0 (no error handling: a lost peer hangs every survivor forever) is refused with the reason."""
    if env.get(NCCL_ERROR_HANDLING, "").strip() == "0":
        raise SpecError(f"{NCCL_ERROR_HANDLING}=0 (set in this environment or launcher.env) turns NCCL's error "
                        "handling off: a lost peer would then hang every other rank forever instead of ending the "
                        "collective so the run can restart. Unset it (vilscale sets 1), or set 1 or 3")
    wanted = {NCCL_ERROR_HANDLING: "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
              "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": os.path.join(run_dir, "nccl_traces", "rank_")}
    added = {key: value for key, value in wanted.items() if not env.get(key)}
    env.update(added)
    return added


class RendezvousError(RuntimeError):
    """The launcher described the process group incompletely or inconsistently; the message says what to set."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RankContext:
    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of ranks."""
    local_rank: int
    """Rank on this node, as the launcher defines it (selects the GPU)."""
    local_world_size: int
    """Ranks on this node."""
    device: torch.device
    """Where the model and batches live."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise RendezvousError(f"{name}={value!r} is not an integer") from None


def init_distributed(requested_device: str, *, collective_timeout_s: float = 900) -> RankContext:
    """Join the process group (Ray Train's if it exists, else the one the environment describes; a
    one-rank group when the environment describes none) and pick this rank's device. A collective that
    waits longer than ``collective_timeout_s`` for a peer raises on the survivors (a restartable error)."""
    try:
        device_type = resolve_device(requested_device).type
    except ValueError as error:
        raise SpecError(f"train.device={requested_device!r}: {error}") from None
    timeout = timedelta(seconds=collective_timeout_s)
    if not dist.is_initialized():
        _init_from_environment(device_type, timeout)
    _bound_every_group(timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank, local_world_size = _local_layout(rank, world_size)
    device = _device_for(device_type, local_rank, local_world_size)
    if device.type == "cuda" and world_size > 1:
        _check_gpus_not_shared(device, rank)
    return RankContext(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
                       device=device)


def _bound_every_group(timeout: timedelta) -> None:
    """Make every collective wait at most ``timeout``: the default group's, whoever made it (Ray Train makes it with
    its own timeout), and those of the groups created later (DeepSpeed reduces gradients and gathers ZeRO partitions
    in a clone of the world group of its own). torch creates a group without an explicit timeout with its backend's
    default, 30 minutes on gloo and 10 on nccl, whatever the default group was given; those defaults are module
    attributes of torch.distributed.distributed_c10d, read when a group is created."""
    from torch.distributed import distributed_c10d

    # older torch has only the private name
    set_timeout = getattr(dist, "set_timeout", None) or distributed_c10d._set_pg_timeout
    set_timeout(timeout)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(distributed_c10d, name, None), timedelta):
            setattr(distributed_c10d, name, timeout)


def _init_from_environment(device_type: str, timeout: timedelta) -> None:
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if rank is None and world_size is None:
        # Nobody launched a group: one rank on this machine, with an in-memory store (no port to race for, and
        # no RANK/MASTER_* left in the environment for child processes to mistake for a group of their own).
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", *RENDEZVOUS_VARS) if not os.environ.get(name)]
    if missing:
        raise RendezvousError(
            f"the launcher set {'RANK' if rank is not None else 'WORLD_SIZE'} but not {', '.join(missing)}: a rank "
            "cannot find its peers without them. Launch through `vilscale train --nproc N`, `vilscale submit` "
            "or torchrun, or set every one of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    if not 0 <= rank < world_size:
        raise RendezvousError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    if world_size > 1 and _env_int("LOCAL_RANK") is None:
        raise RendezvousError("LOCAL_RANK is not set in a multi-rank run; it chooses this rank's device on its "
                              "node. Set it (torchrun and submitit do), or launch through vilscale")
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)


def _local_layout(rank: int, world_size: int) -> tuple[int, int]:
    """(local rank, ranks on this node): from Ray Train's context under Ray, else the environment."""
    if "ray.train" in sys.modules:  # a Ray Train worker has imported it; importing it here would cost seconds
        try:
            import ray.train

            context = ray.train.get_context()
            return context.get_local_rank(), context.get_local_world_size()
        except Exception:  # not inside a Ray Train worker after all
            pass
    local_rank = _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE")
    if local_rank is None:
        local_rank = 0 if world_size == 1 else rank
    local_world = local_world if local_world is not None else (1 if world_size == 1 else world_size)
    return local_rank, local_world


def _device_for(device_type: str, local_rank: int, local_world_size: int) -> torch.device:
    if device_type != "cuda":
        return torch.device("cpu")
    index = device_index(torch.cuda.device_count(), local_rank, local_world_size)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def device_index(visible: int, local_rank: int, local_world_size: int) -> int:
    """The GPU index of this rank among the ``visible`` ones: its own when the launcher bound one GPU to each
    task (Ray, or SLURM's ``--gpus-per-task=1``/``--gpu-bind``: one visible device whatever the local rank),
    else its local rank among the node's GPUs."""
    if visible == 1:
        return 0  # whether the tasks of a node really see different GPUs is checked once the group exists
    if visible >= 1 and local_rank < visible and local_world_size <= visible:
        return local_rank
    raise RendezvousError(
        f"local rank {local_rank} of {local_world_size} ranks on this node, but {visible} GPU(s) are visible: "
        "two ranks would share a GPU or a rank would have none. Start one rank per GPU (launcher.gpus_per_node "
        "= the node's GPUs), or make CUDA_VISIBLE_DEVICES show one GPU per rank")


def _check_gpus_not_shared(device: torch.device, rank: int) -> None:
    """RendezvousError on every rank when two ranks of one host drive the same physical GPU."""
    from vilscale.orchestration.ranks import gather_objects

    uuid = str(torch.cuda.get_device_properties(device).uuid)
    shared = shared_gpus(gather_objects((socket.gethostname(), uuid)))
    if shared:
        host, ranks = shared[0]
        raise RendezvousError(
            f"ranks {ranks} on {host} drive the same GPU: the tasks of a node see one GPU each, but the same one. "
            "Give every task its own GPU (SLURM: --gpus-per-task=1 with --gpu-bind=single:1, or one task per GPU "
            "with all GPUs visible; CUDA_VISIBLE_DEVICES different per task)")


def shared_gpus(records: list[tuple[str, str]]) -> list[tuple[str, list[int]]]:
    """[(host, ranks)] for every GPU that several ranks use, from each rank's (host, GPU UUID)."""
    users: dict[tuple[str, str], list[int]] = {}
    for rank, record in enumerate(records):
        users.setdefault(tuple(record), []).append(rank)
    return [(host, ranks) for (host, _), ranks in users.items() if len(ranks) > 1]
