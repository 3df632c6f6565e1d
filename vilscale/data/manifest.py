"""`manifest.json`: what `vilscale prepare` wrote and what the loader reads.

Layout (paths of shards are relative to the manifest's folder)::

    {
      "format": "vilscale-shards/1",
      "num_samples": 1437,
      "classes": ["0", "1", ...],                      # class index -> synset / folder name
      "shards": [{"path": "shard-00000.beton", "num_samples": 360, "sha256": "...",
                  "max_height": 32, "max_width": 32}, ...],
      "skipped": [{"path": "dog/broken.jpg", "reason": "cannot decode: ...", "shard": 2},  # images lost
                  {"path": "n01.tar", "reason": "damaged tar: ..."}, {"path": "n01.tar:x.JPEG", ...}],
      "empty_classes": ["zz_empty"],                   # class folders without images (they keep an index)
      "ignored": [{"path": "dog/notes.txt", "reason": "not an image file ..."}],
      "dropped_classes": [{"class": "n01", "images": 12}],  # `prepare imagenet21k --processed`: too few images
      "writer": {"kind": "digits", "max_side": 0, "jpeg_quality": 90, "compress_probability": 0.0,
                 "page_size": 8388608, "seed": 0, ...}
    }

Sample ``i`` of the dataset (its *global index*) is sample ``i - first`` of the shard whose range of the
shards laid end to end contains it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vilscale.errors import DataError  # noqa: F401  (its home is vilscale.errors; imported from here too)
from vilscale.files import retry_transient, sha256_of

FORMAT = "vilscale-shards/1"


@dataclass(frozen=True, slots=True)
class ShardInfo:
    path: Path
    """Absolute path of the .beton file."""
    num_samples: int
    sha256: str
    max_height: int
    max_width: int


@dataclass(frozen=True, slots=True)
class Manifest:
    path: Path
    num_samples: int
    classes: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    skipped: tuple[dict, ...]
    writer: dict
    empty_classes: tuple[str, ...] = ()
    ignored: tuple[dict, ...] = ()
    dropped_classes: tuple[dict, ...] = ()
    """Classes of the source left out (``{"class", "images"}``) by `vilscale prepare imagenet21k --processed`."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shard_sizes(self) -> list[int]:
        return [s.num_samples for s in self.shards]

    @property
    def shard_offsets(self) -> list[int]:
        """Global index of each shard's first sample."""
        offsets, total = [], 0
        for shard in self.shards:
            offsets.append(total)
            total += shard.num_samples
        return offsets


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and check a manifest.json; errors say which file is wrong and how to make a good one."""
    path = Path(path)
    if not str(path):
        raise DataError("no manifest given; run `vilscale prepare ...` and point data.train_manifest / "
                        "data.val_manifest at the manifest.json it writes")
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; run `vilscale prepare ...` to write it "
                        f"(an interrupted prepare leaves no manifest.json: run it again to finish)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"manifest {path} is not valid JSON ({error}); run `vilscale prepare` again") from error
    missing = [k for k in ("num_samples", "classes", "shards", "skipped", "writer") if k not in raw]
    if missing:
        raise DataError(f"manifest {path} lacks {missing}; it was not written by `vilscale prepare`")
    shards = tuple(
        ShardInfo(path=(path.parent / s["path"]).resolve(), num_samples=int(s["num_samples"]), sha256=s["sha256"],
                  max_height=int(s.get("max_height", 0)), max_width=int(s.get("max_width", 0)))
        for s in raw["shards"])
    total = sum(s.num_samples for s in shards)
    if total != raw["num_samples"]:
        raise DataError(f"manifest {path}: num_samples={raw['num_samples']} but its shards hold {total}; "
                        f"run `vilscale prepare` again")
    return Manifest(path=path.resolve(), num_samples=int(raw["num_samples"]), classes=tuple(raw["classes"]),
                    shards=shards, skipped=tuple(raw["skipped"]), writer=dict(raw["writer"]),
                    empty_classes=tuple(raw.get("empty_classes", ())), ignored=tuple(raw.get("ignored", ())),
                    dropped_classes=tuple(raw.get("dropped_classes", ())))


def _cache_dir() -> Path:
    return Path(os.environ.get("VILSCALE_CACHE_DIR", Path.home() / ".cache" / "vilscale")) / "verified-shards"


def _cache_entry(path: Path) -> Path:
    return _cache_dir() / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def verify_shard(shard: ShardInfo, *, use_cache: bool = True) -> None:
    """Raise `DataError` naming the shard if it is missing or its sha256 differs from the manifest's.

    A shard that once matched is remembered by (path, size, mtime, inode); while those stay the same it is
    not hashed again. The cache is per user (``$VILSCALE_CACHE_DIR``) and never trusted for another file.
    """
    try:
        stat = retry_transient(shard.path.stat, what=f"reading shard {shard.path}")
    except FileNotFoundError:
        raise DataError(f"shard {shard.path} listed in the manifest does not exist; run `vilscale prepare` "
                        f"again to rewrite it") from None
    stamp = {"sha256": shard.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    entry = _cache_entry(shard.path)
    if use_cache:
        try:
            if json.loads(entry.read_text()) == stamp:
                return
        except (OSError, ValueError):
            pass
    actual = retry_transient(lambda: sha256_of(shard.path), what=f"reading shard {shard.path}")
    if actual != shard.sha256:
        raise DataError(f"shard {shard.path} is corrupt or was changed: its sha256 is {actual}, the manifest says "
                        f"{shard.sha256}; run `vilscale prepare` again (it rewrites shards whose checksum fails)")
    if use_cache:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            temporary = entry.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(stamp))
            os.replace(temporary, entry)
        except OSError:
            pass  # a read-only home only costs a re-hash next time
