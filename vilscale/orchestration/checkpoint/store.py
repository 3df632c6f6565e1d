"""Checkpoints that never replace a good one with a half-written one.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/           DeepSpeed's files (model, per-rank optimizer shards) written by the engine
        client_rank0.pt      per-rank client state: RNG states, loader state (weights_only loadable)
        ema.safetensors      the fp32 EMA of the weights (written by rank 0; identical on every rank)
        manifest.json        written last, by rank 0, once every rank finished: step, world size, spec
                             digest and the sha256 and size of every file above
    latest                   the tag of the newest complete checkpoint, replaced atomically (os.replace)

Every rank writes into ``.partial-step_N-<token>/`` first and makes its files durable there (fsync of each file
and of the directory); rank 0 writes the manifest into it, then renames it to ``step_N/`` and moves ``latest``.
So a checkpoint appears under its name whole, after every byte reached the disk, and a crash at any point
leaves ``latest`` on a complete checkpoint. Each renaming, pruning and ``latest`` move is fenced on the run dir's
lease (``rundir.fence``): a process that lost the run dir to another launch stops before touching what a resume
reads.

A checkpoint counts only when its manifest exists and every checksum matches; resuming walks from
``latest`` back to older complete checkpoints and names any file that fails verification. A run dir holding
checkpoints of which none verifies stops the run (``NoUsableCheckpoint``, exit 7) instead of training from step
0 again; starting over is the user's choice (``discard_checkpoints``, `vilscale train --start-over`). The
newest ``keep`` complete checkpoints up to ``latest`` are kept, never ``latest`` itself.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from vilscale.files import atomic_write_text, fsync_dir, sha256_of
from vilscale.orchestration.checkpoint.rundir import RunDirLost, fence
from vilscale.orchestration.faults import maybe_die, maybe_slow_conversion
from vilscale.orchestration.ranks import barrier as _barrier
from vilscale.orchestration.ranks import broadcast_object as _broadcast
from vilscale.orchestration.ranks import gather_objects
from vilscale.orchestration.ranks import rank as _rank
from vilscale.orchestration.ranks import world_size as _world

CONVERSION_BOUND_S = 6 * 3600.0
"""How long the ranks wait for rank 0 to convert a checkpoint to the universal format (a resize)."""
MANIFEST = "manifest.json"
LATEST = "latest"
TAG_PREFIX = "step_"
PARTIAL_PREFIX = ".partial-"
EMA_FILE = "ema.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint failed to save or to load; the message says which file and why (restartable)."""


class NoUsableCheckpoint(RuntimeError):
    """The run dir holds checkpoints and none of them verifies; the message names each one's problem. Resuming is
    impossible and training from step 0 would silently throw the run away: the run stops (exit 7, not restarted)."""


def discard_checkpoints(run_dir: Path) -> Path | None:
    """Move the run dir's checkpoints (and its TensorBoard events, which a new step 0 would purge) aside into
    ``RUN_DIR/discarded-<time>/``, so that the next launch trains from step 0; nothing is deleted. The folder, or
    None when there was nothing to move. Fenced: the caller holds the run dir."""
    run_dir = Path(run_dir)
    moving = [run_dir / name for name in ("checkpoints", "tensorboard") if (run_dir / name).exists()]
    if not moving:
        return None
    fence(run_dir, "moving its checkpoints aside")
    aside = run_dir / time.strftime("discarded-%Y%m%d-%H%M%S")
    aside.mkdir()
    for path in moving:
        os.replace(path, aside / path.name)
    fsync_dir(run_dir)
    return aside

def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _step_of(tag: str) -> int:
    """The step of a checkpoint tag (step_00000100 -> 100); -1 for a name that is not one."""
    digits = tag.removeprefix(TAG_PREFIX)
    return int(digits) if digits.isdigit() else -1


def _make_durable(directory: Path) -> None:
    """fsync every file under ``directory`` this process can see, then the directories: what a rank wrote is on the
    disk (not only in its page cache or its NFS client's) before rank 0 writes the manifest that declares it."""
    folders = {directory}
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            folders.add(path.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)


class Checkpointer:
    """Saves and finds checkpoints of one run; every method is called on every rank."""

    def __init__(self, run_dir: Path, *, keep: int, spec_digest: str):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.spec_digest = spec_digest

    # ---- saving -------------------------------------------------------------------------------
    def save(self, engine, *, step: int, client_state: dict, ema: dict | None = None) -> Path:
        """Write a complete checkpoint for ``step`` and move ``latest`` to it.

        ``client_state`` is this rank's state (RNG, loader, counters); ``ema`` the EMA weights, the same
        on every rank, written once by rank 0. Any failure (disk full, a rank dying, the run dir lost to another
        launch) leaves ``latest`` and every complete checkpoint as they were.
        """
        tag = tag_for(step)
        final = self.root / tag
        partial_name = None
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            partial_name = f"{PARTIAL_PREFIX}{tag}-{os.urandom(4).hex()}"
        partial_name = _broadcast(partial_name)
        directory = self.root / partial_name
        _barrier()
        self._check_free_space(engine, step)
        try:
            engine.save_checkpoint(str(self.root), tag=partial_name, client_state={"step": step}, save_latest=False)
            torch.save(client_state, directory / f"client_rank{_rank()}.pt")
            if ema is not None and _rank() == 0:
                from safetensors.torch import save_file

                save_file({name: tensor.detach().cpu().contiguous() for name, tensor in ema.items()},
                          str(directory / EMA_FILE))
            _make_durable(directory)  # every file this rank sees, then the directory: on disk before it is declared
        except Exception as error:
            # Raise at once, without another collective: a rank that failed inside DeepSpeed's save leaves
            # the others waiting in its barrier, and only this process exiting lets the launcher stop them.
            free = shutil.disk_usage(self.root).free
            raise CheckpointError(
                f"saving checkpoint {final} failed on rank {_rank()}: {type(error).__name__}: {error} "
                f"({free / 2**20:.1f} MiB free on that filesystem); 'latest' still points to the previous "
                f"complete checkpoint") from error
        maybe_die("checkpoint-files-written", step=step, rank=_rank(), run_dir=self.root.parent)
        files = self._hash_files(directory)
        failure = None
        if _rank() == 0:
            manifest = {"step": step, "world_size": _world(), "spec_digest": self.spec_digest,
                        "created": time.time(), "files": files}
            try:
                atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
                self._declare(directory, final, tag)
            except RunDirLost as error:
                failure = ("lost", str(error))
            except OSError as error:
                failure = ("failed", f"writing the manifest of {final} failed: {error}")
        failure = _broadcast(failure if _rank() == 0 else None)
        if failure:
            if failure[0] == "lost":
                raise RunDirLost(failure[1])
            raise CheckpointError(failure[1] + "; 'latest' still points to the previous complete checkpoint")
        if _rank() == 0:
            self._prune()
        _barrier()
        return final

    def _declare(self, directory: Path, final: Path, tag: str) -> None:
        """Rank 0, after every rank's files and the manifest are durable in ``directory``: rename it to ``final``
        (an earlier attempt at the same step, complete or not, moved aside first and removed after), then move
        ``latest``. Each step is fenced on the run dir's lease."""
        fence(self.root.parent, f"declaring checkpoint {tag}")
        replaced = None
        if final.exists():  # an earlier attempt at this step: an interrupted save, or a step trained again
            replaced = self.root / f"{PARTIAL_PREFIX}replaced-{tag}-{os.urandom(4).hex()}"
            os.replace(final, replaced)
        os.replace(directory, final)
        fsync_dir(self.root)
        fence(self.root.parent, f"moving 'latest' to {tag}")
        atomic_write_text(self.root / LATEST, tag + "\n")
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)

    def _check_free_space(self, engine, step: int) -> None:
        """Refuse to start a checkpoint that cannot fit: about the size of the previous one (or, for the
        first, fp32 weights plus two Adam moments, the upper end of what one rank writes)."""
        complete = self.complete_tags()
        if complete:
            manifest = json.loads((self.root / complete[-1] / MANIFEST).read_text())
            needed = sum(entry["bytes"] for entry in manifest["files"].values())
        else:
            needed = sum(p.numel() for p in engine.module.parameters()) * 4 * 3 // _world()
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise CheckpointError(
                f"not enough free space for checkpoint step {step} in {self.root}: about {needed / 2**20:.1f} MiB "
                f"needed, {free / 2**20:.1f} MiB free (No space left on device); free space or move run_dir. "
                f"'latest' still points to the previous complete checkpoint")

    def _hash_files(self, directory: Path) -> dict:
        """sha256 and size of every file of the checkpoint, hashed in parallel across ranks.

        Each rank lists the directory after writing its own files, and the manifest covers the union of
        the listings: on shared storage with attribute caching (NFS) a rank may not yet see another node's
        files, but it always sees its own, so no file escapes the manifest. Each file is hashed by one of
        the ranks that listed it.
        """
        listed = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
                        and p.name != MANIFEST)
        listings = gather_objects(listed)
        owners: dict[str, list[int]] = {}
        for rank, names in enumerate(listings):
            for name in names:
                owners.setdefault(name, []).append(rank)
        mine = {}
        for index, (name, ranks) in enumerate(sorted(owners.items())):
            if ranks[index % len(ranks)] == _rank():
                mine[name] = {"sha256": sha256_of(directory / name), "bytes": (directory / name).stat().st_size}
        return {name: entry for part in gather_objects(mine) for name, entry in part.items()}

    def _prune(self) -> None:
        """Rank 0: keep the newest ``keep`` complete checkpoints up to ``latest`` (never ``latest`` itself; those
        newer than ``latest`` were never declared and are left alone), and remove interrupted saves (partial
        directories, step directories without a manifest older than ``latest``). Fenced."""
        latest = self.latest_tag()
        if latest is None:
            return
        fence(self.root.parent, "pruning old checkpoints")
        declared = [tag for tag in self.complete_tags() if _step_of(tag) <= _step_of(latest)]
        for tag in declared[:-self.keep]:
            if tag != latest:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        for path in self.root.iterdir():
            interrupted = path.name.startswith(PARTIAL_PREFIX)
            interrupted |= (path.name.startswith(TAG_PREFIX) and not (path / MANIFEST).exists()
                            and _step_of(path.name) < _step_of(latest))
            if interrupted and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def latest_tag(self) -> str | None:
        """The tag ``latest`` names, None without one."""
        try:
            return (self.root / LATEST).read_text().strip() or None
        except FileNotFoundError:
            return None

    # ---- finding ------------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        """Tags with a manifest, oldest first (by step)."""
        if not self.root.is_dir():
            return []
        return sorted((p.parent.name for p in self.root.glob(f"{TAG_PREFIX}*/{MANIFEST}")), key=_step_of)

    def verify(self, tag: str) -> str | None:
        """``None`` if every file of ``tag`` matches its manifest, else what is wrong (naming the file)."""
        directory = self.root / tag
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as error:
            return f"{directory / MANIFEST} is unreadable: {error}"
        for name, entry in manifest["files"].items():
            path = directory / name
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != entry["bytes"]:
                return f"{path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)"
            if sha256_of(path) != entry["sha256"]:
                return f"{path} does not match its sha256 in the manifest (corrupted)"
        return None

    def find_resumable(self, log=print) -> dict | None:
        """The newest verified checkpoint's manifest (with its ``tag``), chosen by rank 0 for all ranks; None for a
        run that has no checkpoint yet. NoUsableCheckpoint (on every rank) when the run dir holds checkpoints and
        none verifies, naming each one's problem: training from step 0 then would throw the run away."""
        chosen, problems = None, []
        if _rank() == 0:
            candidates = self.complete_tags()
            pointed = self.latest_tag()
            if pointed is not None:  # anything newer than 'latest' was never declared complete
                candidates = [t for t in candidates if _step_of(t) <= _step_of(pointed)]
                if not candidates:
                    problems.append(f"'latest' names {pointed}, but no checkpoint directory up to it has a manifest")
            for tag in reversed(candidates):
                problem = self.verify(tag)
                if problem is None:
                    chosen = json.loads((self.root / tag / MANIFEST).read_text())
                    chosen["tag"] = tag
                    break
                problems.append(f"{tag}: {problem}")
                log(f"checkpoint {tag} is not usable: {problem}; trying the previous one")
        chosen, problems = _broadcast((chosen, problems) if _rank() == 0 else None)
        if chosen is None and problems:
            raise NoUsableCheckpoint(
                f"no checkpoint of {self.root} can be resumed ({'; '.join(problems)}), so this run stops instead of "
                "training from step 0 again. Restore the files if you can; to train from scratch in this run dir, "
                "relaunch with --start-over (the checkpoints are moved aside into RUN_DIR/discarded-*, not deleted)")
        return chosen

    def convert_to_universal(self, manifest: dict, *, bound_s: float = CONVERSION_BOUND_S) -> str:
        """Turn ``manifest``'s checkpoint into DeepSpeed's universal format (world-size independent), once,
        on rank 0; returns the tag to load with ``checkpoint.load_universal`` set in the engine config.

        The other ranks wait for it in a group of their own whose collectives wait ``bound_s``, not
        ``train.collective_timeout_s``: a large checkpoint takes longer to convert than a step may take, and a
        peer timing out there would turn the resize into a restart loop."""
        import torch.distributed as dist

        tag = f"{manifest['tag']}_universal"
        failure = None
        waiting = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            from datetime import timedelta

            waiting = dist.new_group(backend="gloo", timeout=timedelta(seconds=bound_s))
        if _rank() == 0 and not (self.root / tag / "zero").is_dir():
            import argparse

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            temporary = self.root / f".{tag}.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            try:
                maybe_slow_conversion()
                ds_to_universal(argparse.Namespace(
                    input_folder=str(self.root / manifest["tag"]), output_folder=str(temporary),
                    num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                    inject_missing_state=True))
                shutil.rmtree(self.root / tag, ignore_errors=True)
                os.replace(temporary, self.root / tag)
            except Exception as error:  # noqa: BLE001 - every rank must hear about it
                failure = f"converting {manifest['tag']} to a universal checkpoint failed: {error}"
        if waiting is not None:
            box = [failure]
            dist.broadcast_object_list(box, src=0, group=waiting)
            failure = box[0]
            dist.destroy_process_group(waiting)
        if failure:
            raise CheckpointError(failure)
        return tag

    def load(self, engine, manifest: dict, *, tag: str | None = None) -> dict:
        """Load ``manifest``'s checkpoint (or its universal form ``tag``) into ``engine`` and return this
        rank's client state (rank 0's when this rank did not exist in the saved run)."""
        tag = tag or manifest["tag"]
        load_path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        client_file = self.root / manifest["tag"] / f"client_rank{_rank()}.pt"
        if not client_file.is_file():
            client_file = self.root / manifest["tag"] / "client_rank0.pt"
        return torch.load(client_file, map_location="cpu", weights_only=True)

    def load_ema(self, manifest: dict, device: torch.device) -> dict[str, torch.Tensor] | None:
        """The checkpoint's fp32 EMA weights on ``device`` (every rank reads the same file), or None."""
        path = self.root / manifest["tag"] / EMA_FILE
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return {name: tensor.to(device=device, dtype=torch.float32) for name, tensor in load_file(str(path)).items()}
