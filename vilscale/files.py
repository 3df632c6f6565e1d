"""Files that readers never see half-written, and their checksums.

Shards, manifests, checkpoints and the run dir's pointers all go through these: a reader sees the old
content or the new, never a mix, and a checksum is computed the same way everywhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from pathlib import Path

_HASH_CHUNK = 1 << 22


# Errors a shared file system gives while a server, a mount or the network recovers (an NFS server restarting,
# a stale handle after a failover, an automounter still mounting): worth waiting for, never "rewrite the data".
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.EHOSTDOWN,
                              errno.EHOSTUNREACH, errno.ENOLINK, errno.ECOMM, errno.EREMOTEIO, errno.ECONNRESET})
# Waits between attempts (seconds): about a minute in all before the error counts as a failure.
TRANSIENT_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


class TransientIOError(OSError):
    """A transient file-system error that outlasted the retries: a restart may get past it; the data is fine."""


def retry_transient(read, *, what: str, backoff_s: tuple[float, ...] | None = None):
    """``read()``, retried with growing waits while it fails with a transient file-system error (EIO, ESTALE,
    ETIMEDOUT...); `TransientIOError` when it still fails after the last wait. Other errors pass through."""
    waits = TRANSIENT_BACKOFF_S if backoff_s is None else backoff_s
    if "VILSCALE_IO_BACKOFF_S" in os.environ:  # tests: short waits
        waits = tuple(float(w) for w in os.environ["VILSCALE_IO_BACKOFF_S"].split(",") if w)
    for attempt in range(len(waits) + 1):
        try:
            return read()
        except OSError as error:
            if error.errno not in TRANSIENT_ERRNOS:
                raise
            if attempt == len(waits):
                raise TransientIOError(error.errno, f"{what}: {os.strerror(error.errno)} after {attempt + 1} "
                                       f"attempts over {sum(waits):.0f} s (a shared file system that did not "
                                       "recover; the data itself is not known to be bad)") from error
            print(f"[vilscale] {what}: {os.strerror(error.errno)}; retrying in {waits[attempt]:g} s "
                  f"({attempt + 1}/{len(waits)})", file=sys.stderr, flush=True)
            time.sleep(waits[attempt])
    raise AssertionError("unreachable")


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
