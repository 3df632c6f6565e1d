"""The job specs that ship inside the package (``vilscale/jobs/``, as detectron2 ships its configs): a command that
takes a job accepts a shipped job's name (``smoke``, ``pretrain_21k``) as well as a path, wherever vilscale is
installed and whatever the current directory. Relative paths inside a job (``data/...``, ``runs/...``) are relative
to the directory the command runs in, as for any job file."""

from __future__ import annotations

from pathlib import Path

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"
"""The shipped job specs, and their monitoring configuration (``monitoring/``)."""


def names() -> list[str]:
    """The shipped jobs' names (file names without ``.yaml``), sorted."""
    return sorted(path.stem for path in JOBS_DIR.glob("*.yaml"))


def shipped(name: str) -> Path | None:
    """The shipped job called ``name`` (with or without ``.yaml``), None when there is none. A name with a path
    separator is a path, never a shipped name."""
    if "/" in name or "\\" in name:
        return None
    path = JOBS_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    return path if path.is_file() else None


def resolve(job: str | Path) -> Path:
    """The job file ``job`` names: the path when it exists, else the shipped job of that name, else the path (whose
    absence the caller reports, listing ``names()``)."""
    path = Path(job)
    if path.is_file():
        return path
    return shipped(str(job)) or path


def summary(path: Path, width: int = 90) -> str:
    """What a shipped job is: its header's first sentence (at most ``width`` characters), without comment signs."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("#   "):
            break
        header.append(line.lstrip("# ").strip())
    text = " ".join(header)
    sentence = text.split(": ")[0] if len(text.split(". ")[0]) > width else text.split(". ")[0]
    return sentence if len(sentence) <= width else sentence[:width - 3].rsplit(" ", 1)[0] + "..."


__all__ = ["JOBS_DIR", "names", "resolve", "shipped", "summary"]
