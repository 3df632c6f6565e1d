"""What the Ray and SLURM launchers share: the error they raise before submitting anything, the
rewriting of a spec's relative paths, and following a job's log files while waiting for it.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from vilscale.orchestration.config import JobSpec


class LaunchError(RuntimeError):
    """The job cannot be launched as asked; nothing was submitted. The message says what to change."""


def with_absolute_paths(spec: JobSpec, base: Path) -> JobSpec:
    """The spec with its run dir, shard manifests and initial weights made absolute against ``base``.

    A job starts somewhere else than where it was submitted from (a Ray job runs inside a copy of the
    working dir, a SLURM task on another node), so relative paths must be pinned to the submitter's
    view of the (shared) file system before the spec leaves this machine.
    """

    def pin(path: str) -> str:
        if not path:
            return path
        candidate = Path(path).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())

    data = dataclasses.replace(spec.data, train_manifest=pin(spec.data.train_manifest),
                               val_manifest=pin(spec.data.val_manifest))
    model = dataclasses.replace(spec.model, init_weights=pin(spec.model.init_weights))
    return dataclasses.replace(spec, run_dir=pin(spec.run_dir), data=data, model=model)


def path_overrides(spec: JobSpec) -> list[str]:
    """``--set`` assignments that carry ``with_absolute_paths``' result to a `vilscale train` command."""
    pairs = [("run_dir", spec.run_dir), ("data.train_manifest", spec.data.train_manifest),
             ("data.val_manifest", spec.data.val_manifest), ("model.init_weights", spec.model.init_weights)]
    # `--set` parses values as YAML; a JSON string is a valid YAML double-quoted scalar for any path.
    return [f"{key}={json.dumps(value)}" for key, value in pairs if value]


def probe_tcp(address: str, *, default_port: int, timeout_s: float = 5.0) -> tuple[str, int]:
    """Open (and close) a TCP connection to ``address`` (URL or host:port); raise LaunchError if none answers."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    host, port = parts.hostname, parts.port or default_port
    if not host:
        raise LaunchError(f"cannot read a host name in the address {address!r}; use e.g. http://HEAD:8265")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise LaunchError(f"nothing answers at {host}:{port} (from {address!r}): {error}") from None
    return host, port


class LogFollower:
    """Prints what is appended to a set of log files (e.g. rank 0's stdout and stderr) since the last call."""

    def __init__(self, paths: list[Path], *, out=None):
        self.offsets = {Path(p): 0 for p in paths}
        self.out = out or sys.stdout

    def add(self, path: Path) -> None:
        self.offsets.setdefault(Path(path), 0)

    def poll(self) -> None:
        for path, offset in self.offsets.items():
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except FileNotFoundError:
                continue
            if not chunk:
                continue
            # Print whole lines only; a partly written line waits for the next poll.
            end = chunk.rfind(b"\n") + 1
            if end:
                self.out.write(chunk[:end].decode(errors="replace"))
                self.out.flush()
                self.offsets[path] = offset + end
