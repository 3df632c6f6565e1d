"""Checkpoints that never replace a good one with a half-written one.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/           DeepSpeed's files (model, per-rank optimizer shards) written by the engine
        client_rank0.pt      per-rank client state: RNG states, loader state (weights_only loadable)
        ema.safetensors      the fp32 EMA of the weights (written by rank 0; identical on every rank)
        manifest.json        written last, by rank 0, once every rank finished: step, world size, spec
                             digest and the sha256 and size of every file above
    latest                   the tag of the newest complete checkpoint, replaced atomically (os.replace)

A checkpoint counts only when its manifest exists and every checksum matches; resuming walks from
``latest`` back to older complete checkpoints and names any file that fails verification. The last
``keep`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from vilscale.files import atomic_write_text, sha256_of
from vilscale.orchestration.faults import maybe_die
from vilscale.orchestration.ranks import barrier as _barrier
from vilscale.orchestration.ranks import broadcast_object as _broadcast
from vilscale.orchestration.ranks import gather_objects
from vilscale.orchestration.ranks import rank as _rank
from vilscale.orchestration.ranks import world_size as _world

MANIFEST = "manifest.json"
LATEST = "latest"
TAG_PREFIX = "step_"
EMA_FILE = "ema.safetensors"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or a checkpoint failed to save; the message says which file and why."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


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
        on every rank, written once by rank 0. Any failure (disk full, a rank dying) leaves ``latest`` on
        the previous complete checkpoint.
        """
        tag = tag_for(step)
        directory = self.root / tag
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if directory.exists():  # an earlier, interrupted attempt at the same step
                shutil.rmtree(directory)
        _barrier()
        self._check_free_space(engine, step)
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
            torch.save(client_state, directory / f"client_rank{_rank()}.pt")
            if ema is not None and _rank() == 0:
                from safetensors.torch import save_file

                save_file({name: tensor.detach().cpu().contiguous() for name, tensor in ema.items()},
                          str(directory / EMA_FILE))
        except Exception as error:
            # Raise at once, without another collective: a rank that failed inside DeepSpeed's save leaves
            # the others waiting in its barrier, and only this process exiting lets the launcher stop them.
            free = shutil.disk_usage(self.root).free
            raise CheckpointError(
                f"saving checkpoint {directory} failed on rank {_rank()}: {type(error).__name__}: {error} "
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
                atomic_write_text(self.root / LATEST, tag + "\n")
            except OSError as error:
                failure = f"writing the manifest of {directory} failed: {error}"
        failure = _broadcast(failure if _rank() == 0 else None)
        if failure:
            raise CheckpointError(failure + "; 'latest' still points to the previous complete checkpoint")
        if _rank() == 0:
            self._prune()
        _barrier()
        return directory

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
        complete = self.complete_tags()
        for tag in complete[:-self.keep]:
            shutil.rmtree(self.root / tag, ignore_errors=True)
        # Directories without a manifest are interrupted saves older than the newest complete one.
        newest = complete[-1] if complete else None
        for path in self.root.glob(f"{TAG_PREFIX}*"):
            if path.is_dir() and not (path / MANIFEST).exists() and newest and path.name < newest:
                shutil.rmtree(path, ignore_errors=True)

    # ---- finding ------------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        """Tags with a manifest, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"{TAG_PREFIX}*/{MANIFEST}"))

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
        """The newest verified checkpoint's manifest (with its ``tag``), chosen by rank 0 for all ranks."""
        chosen = None
        if _rank() == 0:
            candidates = self.complete_tags()
            latest_file = self.root / LATEST
            if latest_file.is_file():
                pointed = latest_file.read_text().strip()
                # Anything newer than 'latest' was never declared complete.
                candidates = [t for t in candidates if t <= pointed]
            for tag in reversed(candidates):
                problem = self.verify(tag)
                if problem is None:
                    chosen = json.loads((self.root / tag / MANIFEST).read_text())
                    chosen["tag"] = tag
                    break
                log(f"checkpoint {tag} is not usable: {problem}; trying the previous one")
        return _broadcast(chosen)

    def convert_to_universal(self, manifest: dict) -> str:
        """Turn ``manifest``'s checkpoint into DeepSpeed's universal format (world-size independent), once,
        on rank 0; returns the tag to load with ``checkpoint.load_universal`` set in the engine config."""
        tag = f"{manifest['tag']}_universal"
        failure = None
        if _rank() == 0 and not (self.root / tag / "zero").is_dir():
            import argparse

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            temporary = self.root / f".{tag}.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            try:
                ds_to_universal(argparse.Namespace(
                    input_folder=str(self.root / manifest["tag"]), output_folder=str(temporary),
                    num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                    inject_missing_state=True))
                shutil.rmtree(self.root / tag, ignore_errors=True)
                os.replace(temporary, self.root / tag)
            except Exception as error:  # noqa: BLE001 - every rank must hear about it
                failure = f"converting {manifest['tag']} to a universal checkpoint failed: {error}"
        failure = _broadcast(failure)
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
