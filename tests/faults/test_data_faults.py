"""Faults in the data path: shards that rot, go missing or cannot be written.

Each test states the fault and the outcome it proves.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch

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
    code 4 (bad data), a message naming the missing shard, no restart loop and no traceback."""
    missing = digits_copy / "train" / "shard-00002.beton"
    missing.unlink()
    result = smoke.using(digits_copy).train(tmp_path / "run", check=False)
    assert result.returncode == 4, result.stderr[-3000:]
    assert f"shard {missing} listed in the manifest does not exist" in result.stderr
    assert "not restarting" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_shard_is_detected_by_checksum_naming_the_shard(smoke, digits_copy, tmp_path):
    """Fault: a shard was truncated after it was written. Outcome: the sha256 check names it, exit code 4 (bad
    data); nothing trains."""
    shard = digits_copy / "train" / "shard-00001.beton"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = smoke.using(digits_copy).train(tmp_path / "run", check=False)
    assert result.returncode == 4, result.stderr[-3000:]
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


@pytest.fixture(scope="module")
def jpeg_photos(tmp_path_factory):
    """96 photographs (2 classes) as JPEG shards (2 shards: with 2 ranks, rank 0 reads only shard 0)."""
    from vilscale.data.samples import photo_imagefolder

    source = photo_imagefolder(tmp_path_factory.mktemp("photos"), num_classes=2, per_class=48, seed=1)
    out = tmp_path_factory.mktemp("jpeg_shards")
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "prepare", "imagefolder", str(source), str(out),
                             "--num-shards", "2", "--max-side", "64", "--workers", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def _damage_jpegs_keeping_mtime(manifest_dir, shard: int, samples) -> str:
    """Zero the first bytes of these samples' JPEGs in place and restore the shard's mtime, so the cached
    checksum verification still trusts it (bit rot after verification). Returns the shard's path."""
    import os

    from ffcv.reader import Reader

    from vilscale.data.manifest import load_manifest

    path = load_manifest(manifest_dir / "manifest.json").shards[shard].path
    stat = path.stat()
    pointers = Reader(str(path)).metadata["f0"]["data_ptr"]
    with open(path, "r+b") as handle:
        for sample in samples:
            handle.seek(int(pointers[sample]))
            handle.write(b"\0" * 16)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return str(path)


def _verify_and_cache(manifest_dir, run_dir, monkeypatch) -> None:
    """What a first run does before reading: verify every shard's sha256 and remember it in the cache the
    run below uses (so the run trusts the shards by their unchanged size and mtime)."""
    from vilscale.data.manifest import load_manifest, verify_shard

    with monkeypatch.context() as patch:
        patch.setenv("VILSCALE_CACHE_DIR", str(run_dir.parent / "cache"))
        for shard in load_manifest(manifest_dir / "manifest.json").shards:
            verify_shard(shard)


def _train_on(smoke, shards, run_dir, *extra):
    return smoke.using(shards).train(
        run_dir, "--set", f"data.train_manifest={shards / 'manifest.json'}",
        "--set", f"data.val_manifest={shards / 'manifest.json'}", "--set", "model.num_classes=2", *extra,
        check=False, env={"VILSCALE_CACHE_DIR": str(run_dir.parent / "cache")})


@pytest.mark.extended
def test_a_jpeg_that_rots_after_verification_is_replaced_and_training_goes_on(smoke, jpeg_photos, tmp_path,
                                                                             monkeypatch):
    """Fault: bytes of one JPEG inside a verified shard are damaged, its mtime kept. Outcome: the run finishes;
    the sample is replaced by the next one of its shard, logged once with the shard and index."""
    copy = tmp_path / "shards"
    shutil.copytree(jpeg_photos, copy)
    _verify_and_cache(copy, tmp_path / "run", monkeypatch)
    path = _damage_jpegs_keeping_mtime(copy, 0, [3])
    result = _train_on(smoke, copy, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    replaced = [line for line in result.stderr.splitlines() if "failed to decode" in line and "replaced" in line]
    assert len(replaced) == 1 and f"shard {path} sample 3 " in replaced[0], result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 8 and summary["val_samples"] == 95, summary  # validation leaves the damaged one out
    # counted for the dashboards (vilscale_data_decode_errors_total and metrics.jsonl), every failed read: rank 0
    # reads shard 0 once per epoch (3 steps) and its part of every evaluation, so at step 6, the end of epoch 1 and
    # before its evaluation, twice in training and once in epoch 0's evaluation
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = {r["step"]: r["data_decode_errors_total"] for r in records if "loss" in r}
    assert counts[6] == 3 and list(counts.values()) == sorted(counts.values()), counts
    assert [r["val_samples"] for r in records if "val_top1" in r] == [95, 95, 95], records


def test_a_shard_with_too_many_rotten_jpegs_stops_the_run_naming_it(smoke, jpeg_photos, tmp_path, monkeypatch):
    """Fault: several JPEGs of one verified shard are damaged (mtime kept). Outcome: exit code 4 (bad data) with
    one message naming the shard and the limit; no restart loop and no traceback."""
    copy = tmp_path / "shards"
    shutil.copytree(jpeg_photos, copy)
    _verify_and_cache(copy, tmp_path / "run", monkeypatch)
    path = _damage_jpegs_keeping_mtime(copy, 0, [1, 2, 3])
    result = _train_on(smoke, copy, tmp_path / "run", "--set", "data.decode_error_limit=2")
    assert result.returncode == 4, result.stderr[-3000:]
    assert f"shard {path}: 3 samples failed to decode" in result.stderr, result.stderr[-3000:]
    assert "not restarting" in result.stderr and "Traceback" not in result.stderr


def test_a_resumed_loader_treats_rotten_jpegs_as_the_uninterrupted_one_does(jpeg_photos, tmp_path, monkeypatch,
                                                                           caplog):
    """Fault: two JPEGs of a verified shard rot; the run is checkpointed at the end of epoch 0 (where both were
    found) and resumed. Outcome: epoch 1 after the resume reads the same samples with the same replacements and
    counts the same failed reads as the uninterrupted loader, and logs nothing again (each sample is logged once
    per run): the loader's state carries the samples it found bad."""
    from vilscale.data.config import AugmentConfig, DataConfig
    from vilscale.data.loader import ShardedLoader

    copy = tmp_path / "shards"
    shutil.copytree(jpeg_photos, copy)
    _verify_and_cache(copy, tmp_path / "run", monkeypatch)
    _damage_jpegs_keeping_mtime(copy, 0, [3, 4, 5])
    monkeypatch.setenv("VILSCALE_CACHE_DIR", str(tmp_path / "cache"))

    def loader():
        return ShardedLoader(copy / "manifest.json", rank=0, world_size=1, batch_size=16, seed=3, train=True,
                             config=DataConfig(img_size=32, num_workers=1), augment=AugmentConfig(),
                             return_indices=True)

    def epoch(reader, number):
        reader.set_epoch(number)
        before = reader.decode_errors
        indices = torch.cat([batch[2] for batch in reader])
        return indices, reader.decode_errors - before

    whole = loader()
    epoch(whole, 0)
    want, want_errors = epoch(whole, 1)
    first = loader()
    epoch(first, 0)
    state = first.state_dict()
    assert sorted(state["bad_samples"][0]) == [3, 4, 5], state["bad_samples"]
    resumed = loader()
    resumed.load_state_dict(state)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got, got_errors = epoch(resumed, 1)
    assert torch.equal(got, want) and got_errors == want_errors >= 3, (got_errors, want_errors)
    assert not [r for r in caplog.records if "failed to decode" in r.getMessage()], caplog.text
