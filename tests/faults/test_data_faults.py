"""Faults in the data path: shards that rot, go missing or cannot be written.

Each test states the fault and the outcome it proves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.faults


def prepare_digits(out, *extra):
    return subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "digits", str(out), "--workers", "1",
                           *extra], capture_output=True, text=True, timeout=600)


@pytest.fixture
def digits_copy(digits, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(digits, copy)
    return copy


def test_missing_shard_stops_training_before_the_first_step_naming_the_file(smoke, digits_copy, tmp_path):
    """Fault: a shard listed in the manifest was deleted. Outcome: the run stops before training with exit
    code != 0, a message naming the missing shard, no restart loop and no traceback."""
    missing = digits_copy / "train" / "shard-00002.beton"
    missing.unlink()
    result = smoke.using(digits_copy).train(tmp_path / "run", check=False)
    assert result.returncode != 0
    assert f"shard {missing} listed in the manifest does not exist" in result.stderr
    assert "not restarting" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_shard_is_detected_by_checksum_naming_the_shard(smoke, digits_copy, tmp_path):
    """Fault: a shard was truncated after it was written. Outcome: the sha256 check names it; nothing trains."""
    shard = digits_copy / "train" / "shard-00001.beton"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = smoke.using(digits_copy).train(tmp_path / "run", check=False)
    assert result.returncode != 0
    assert f"shard {shard} is corrupt or was changed" in result.stderr
    assert "Traceback" not in result.stderr


def test_disk_full_while_writing_shards_is_a_clear_error_and_the_rerun_completes(small_disk):
    """Fault: the output filesystem fills up while shards are written. Outcome: exit code 2 and a message
    naming the shard and the cause; no partial shard under a final name; after space is freed, the same
    command finishes and the manifest's shards all verify."""
    disk = small_disk("2M")
    out = disk / "digits"
    result = prepare_digits(out)
    assert result.returncode == 2, result.stderr
    assert "writing shard" in result.stderr and "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "train" / "manifest.json").exists()
    subprocess.run(["mount", "-o", "remount,size=64M", str(disk)], check=True)
    result = prepare_digits(out)
    assert result.returncode == 0, result.stderr

    from vilscale.data.manifest import load_manifest, verify_shard

    for split in ("train", "val"):
        manifest = load_manifest(out / split / "manifest.json")
        for shard in manifest.shards:
            verify_shard(shard, use_cache=False)
        assert sum(s.num_samples for s in manifest.shards) == json.loads(
            (out / split / "manifest.json").read_text())["num_samples"]
