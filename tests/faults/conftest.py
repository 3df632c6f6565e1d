"""Fixtures of the fault suite."""

from __future__ import annotations

import subprocess
import time

import pytest


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)`` -> a fresh tmpfs of that size (e.g. "7M"), unmounted after the test (needs root)."""
    mounted = []

    def mount(size: str):
        path = tmp_path / f"small-{len(mounted)}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.decode().strip()}")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def memory_cgroup(tmp_path):
    """``make(limit_bytes)`` -> a fresh memory cgroup (v1 or v2) whose ``cgroup.procs`` a command can join, so
    that the kernel's out-of-memory killer acts inside it at that limit; removed after the test (needs root)."""
    from pathlib import Path

    made = []

    def make(limit_bytes: int) -> Path:
        for root, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
                                 (Path("/sys/fs/cgroup"), "memory.max")):
            if not (root / "cgroup.procs").exists() or (limit_file == "memory.max" and
                                                        not (root / "cgroup.controllers").exists()):
                continue
            group = root / f"vilscale-test-{tmp_path.name[-20:]}-{len(made)}"
            try:
                group.mkdir()
                (group / limit_file).write_text(str(limit_bytes))
            except OSError as error:
                pytest.skip(f"cannot make a memory cgroup under {root} (needs root): {error}")
            made.append(group)
            return group
        pytest.skip("no writable memory cgroup hierarchy on this machine")

    try:
        yield make
    finally:
        for group in made:
            for _ in range(50):  # its processes have exited; the kernel frees the group a moment later
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.2)
