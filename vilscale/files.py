"""Files that readers never see half-written, and their checksums.

Shards, manifests, checkpoints and the run dir's pointers all go through these: a reader sees the old
content or the new, never a mix, and a checksum is computed the same way everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_HASH_CHUNK = 1 << 22


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not only the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    ``durable`` also fsyncs the file and its directory, so the new content survives a crash of the
    machine (checkpoint pointers need this; a file that is cheap to rewrite does not).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, content, *, durable: bool = True) -> None:
    """``atomic_write_text`` of ``content`` as indented JSON."""
    atomic_write_text(path, json.dumps(content, indent=1), durable=durable)
