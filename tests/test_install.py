"""Installing vilscale without root: a wheel built and installed by an unprivileged user into a fresh
environment, with the test services' programs absent, runs the demo (cut short) from a directory outside any
checkout, its job found by name among the specs the wheel ships; and `make setup`'s system check
goes on without the services when not root, but stops with the commands to run when the build's headers are
missing.

The fresh environment is a venv of the system's Python of the same version, without pip, whose only path
beyond its own is this checkout's .venv site-packages (the dependencies: torch and the rest are not
downloaded again here); vilscale itself comes only from the built wheel. The services' programs are hidden
by binding /dev/null over them in a private mount namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
SERVICE_PROGRAMS = ("sbatch", "srun", "scontrol", "squeue", "slurmctld", "slurmd", "munged", "prometheus")
NOBODY = ("--reuid=65534", "--regid=65534", "--clear-groups")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"),
                                reason="switching to an unprivileged user needs root, setpriv and unshare")


@pytest.fixture
def public_dir():
    """A folder the unprivileged user can write (pytest's own tmp dirs are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="vilscale-install-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_nobody(script: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) as the user nobody, in a mount namespace where the services' programs are /dev/null."""
    hide = "; ".join(f"p=$(command -v {name}) && mount --bind /dev/null \"$p\"" for name in SERVICE_PROGRAMS)
    clean_env = " ".join(f"{key}={value}" for key, value in env.items())
    inner = f"setpriv {' '.join(NOBODY)} env -i {clean_env} sh -ec '{script}'"
    return subprocess.run(["unshare", "--mount", "sh", "-c", f"{hide}; {inner}"], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.extended
@pytest.mark.slow
@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason=f"no system {SYSTEM_PYTHON} to make a fresh venv from")
def test_an_unprivileged_user_builds_installs_and_trains_without_the_services(public_dir):
    source = public_dir / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    # DeepSpeed's CPU communication op, as `make setup` built it (rebuilding it would take minutes)
    shutil.copytree(REPO / ".venv" / "torch_extensions", public_dir / "ops")
    subprocess.run(["chown", "-R", "nobody:nogroup", str(public_dir)], check=True)
    site = next((REPO / ".venv" / "lib").glob("python3.*/site-packages"))
    script = f"""
{SYSTEM_PYTHON} -m venv --without-pip env
echo {site} > env/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/dependencies.pth
env/bin/python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir wheels ./src
env/bin/python -m pip install --quiet --no-deps --no-index wheels/vilscale-*.whl
for name in {' '.join(SERVICE_PROGRAMS)}; do if command -v $name; then echo "$name is visible"; exit 1; fi; done
mkdir work && cd work
python -c "import vilscale; print(vilscale.__file__)" > where.txt
vilscale jobs > jobs.txt
vilscale demo --max-steps 12 > demo.out
"""
    result = as_nobody(script, public_dir, {"HOME": str(public_dir), "PATH": f"{public_dir}/env/bin:/usr/bin:/bin",
                                            "TORCH_EXTENSIONS_DIR": str(public_dir / "ops")})
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    work = public_dir / "work"
    assert (work / "where.txt").read_text().strip() == f"{public_dir}/env/lib/python{sys.version_info.major}." \
        f"{sys.version_info.minor}/site-packages/vilscale/__init__.py"  # the wheel's, not this checkout's
    wheel = next((public_dir / "wheels").glob("vilscale-*.whl"))
    assert "linux" in wheel.name, f"{wheel.name}: the crop decoder's C extension is missing from the wheel"
    shipped = [line.split()[0] for line in (work / "jobs.txt").read_text().splitlines()]
    assert shipped == sorted(path.stem for path in (REPO / "vilscale" / "jobs").glob("*.yaml"))
    printed = (work / "demo.out").read_text().splitlines()
    summary = json.loads((work / "runs" / "demo_digits" / "summary.json").read_text())
    assert summary["step"] == 12 and summary["val_samples"] == 360, summary
    assert printed[-1] == f"val top-1: {100 * summary['val_top1']:.1f}%", printed[-3:]  # eval of the demo's run
    assert (work / "runs" / "demo_digits" / "report").is_dir()
    owners = {path.stat().st_uid for path in (work / "runs" / "demo_digits").rglob("*")}
    assert owners == {65534}, owners


def make_system_packages(public_dir: Path, **variables: str) -> subprocess.CompletedProcess:
    assignments = " ".join(f"{key}={value}" for key, value in variables.items())
    return as_nobody(f"make --no-print-directory -C {REPO} system-packages {assignments}", public_dir,
                     {"HOME": str(public_dir), "PATH": "/usr/bin:/bin"}, timeout=60)


def test_setup_without_root_goes_on_without_the_services_but_not_without_the_build_headers(public_dir):
    result = make_system_packages(public_dir, SERVICE_SYSTEM_PACKAGES="vilscale-absent-service")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "only the tests use" in result.stdout and "setup goes on without them" in result.stdout, result.stdout
    result = make_system_packages(public_dir, FFCV_SYSTEM_PACKAGES="vilscale-absent-headers",
                                  BUILD_PKGCONFIG="vilscale-absent-headers")
    assert result.returncode == 2, result.returncode  # make's code for a recipe that failed ("Error 1" below)
    assert "Error 1" in result.stderr, result.stderr
    for words in ("needs headers pkg-config does not find (vilscale-absent-headers)",
                  "sudo apt-get install -y vilscale-absent-headers", "sudo dnf install",
                  "conda install -c conda-forge pkg-config opencv libjpeg-turbo"):
        assert words in result.stdout, result.stdout
