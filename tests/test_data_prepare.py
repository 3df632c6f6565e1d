"""`vilscale prepare`: real JPEG/PNG files in, FFCV shards and manifest.json out; corrupt images skipped,
interrupted runs finished without rewriting good shards, bad input refused with a clear message."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from vilscale.cli import main
from vilscale.data.manifest import DataError, load_manifest, sha256_of
from vilscale.data.samples import photo_imagefolder
from vilscale.data.writer import STATE_NAME, WriterSettings, prepare, scan_imagefolder, scan_imagenet21k

SETTINGS = WriterSettings(max_side=160, jpeg_quality=90, compress_probability=0.5, page_size=2 << 20, seed=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_imagefolder(tmp_path_factory.mktemp("photos"), num_classes=2, per_class=6, corrupt=True,
                             empty_class=True, png_every=4)


@pytest.fixture(scope="module")
def prepared(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    prepare(scan_imagefolder(photos), out, num_shards=3, settings=SETTINGS, workers=2, progress=False)
    return out


def test_manifest_lists_shards_classes_and_the_corrupt_file(prepared):
    raw = json.loads((prepared / "manifest.json").read_text())
    assert {"num_samples", "classes", "shards", "skipped", "writer"} <= set(raw)
    assert raw["classes"] == ["class_0", "class_1", "zz_empty"], "the empty class folder must keep its index"
    assert raw["num_samples"] == 12
    assert sum(s["num_samples"] for s in raw["shards"]) == 12 and all(s["num_samples"] > 0 for s in raw["shards"])
    assert [k["path"] for k in raw["skipped"]] == [os.path.join("class_0", "broken.jpg")]
    assert raw["skipped"][0]["reason"]
    for shard in raw["shards"]:
        assert sha256_of(prepared / shard["path"]) == shard["sha256"]
        assert max(shard["max_height"], shard["max_width"]) <= SETTINGS.max_side
    for key in ("max_side", "jpeg_quality", "compress_probability", "page_size", "seed", "num_shards"):
        assert key in raw["writer"]
    assert not list(prepared.glob("*.tmp-*")) and not (prepared / STATE_NAME).exists()


def test_rerun_keeps_good_shards_and_rewrites_damaged_ones_identically(prepared, photos, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    before = json.loads((out / "manifest.json").read_text())
    names = [s["path"] for s in before["shards"]]
    kept_mtime = (out / names[0]).stat().st_mtime_ns
    damaged = bytearray((out / names[1]).read_bytes())
    damaged[-100] ^= 0xFF
    (out / names[1]).write_bytes(bytes(damaged))
    (out / names[2]).unlink()
    prepare(scan_imagefolder(photos), out, num_shards=3, settings=SETTINGS, workers=2, progress=False)
    after = json.loads((out / "manifest.json").read_text())
    assert after == before, "rewritten shards must be byte-identical to the first run's"
    assert (out / names[0]).stat().st_mtime_ns == kept_mtime, "a good shard was rewritten"


def test_interrupted_run_is_finished_from_its_state_file(prepared, photos, tmp_path):
    out = tmp_path / "interrupted"
    shutil.copytree(prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    # What a run killed after its first shard leaves: the state file, one shard, a half-written temporary.
    (out / "manifest.json").unlink()
    for shard in manifest["shards"][1:]:
        (out / shard["path"]).unlink()
    (out / "shard-00001.beton.tmp-4242").write_bytes(b"half")
    first_skipped = [{"path": k["path"], "reason": k["reason"]} for k in manifest["skipped"] if k["shard"] == 0]
    state = {"plan_digest": manifest["writer"]["plan_digest"],
             "done": {"0": {"index": 0, "entry": manifest["shards"][0], "skipped": first_skipped}}}
    (out / STATE_NAME).write_text(json.dumps(state))
    prepare(scan_imagefolder(photos), out, num_shards=3, settings=SETTINGS, workers=2, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(out.glob("*.tmp-*")) and not (out / STATE_NAME).exists()


def test_other_settings_in_the_same_folder_are_refused_unless_overwrite(prepared, photos, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(prepared, out)
    other = WriterSettings(max_side=96, page_size=2 << 20)
    with pytest.raises(DataError, match="--overwrite"):
        prepare(scan_imagefolder(photos), out, num_shards=2, settings=other, workers=1, progress=False)
    manifest = prepare(scan_imagefolder(photos), out, num_shards=2, settings=other, workers=1, progress=False,
                       overwrite=True)
    assert len(manifest.shards) == 2 and len(list(out.glob("shard-*.beton"))) == 2
    assert max(s.max_height for s in manifest.shards) <= 96


def test_missing_and_empty_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_imagefolder(tmp_path / "nowhere")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        scan_imagefolder(tmp_path / "empty")
    (tmp_path / "blank").mkdir()
    with pytest.raises(DataError, match="neither per-synset .tar files nor per-synset folders"):
        scan_imagenet21k(tmp_path / "blank")


def test_class_list_fixes_indices_and_a_label_outside_it_names_the_file(photos, tmp_path):
    listing = tmp_path / "classes.txt"
    listing.write_text("# in this order\nclass_1\nclass_0\nzz_empty\n")
    plan = scan_imagefolder(photos, str(listing))
    assert plan.classes == ["class_1", "class_0", "zz_empty"]
    assert {plan.labels[i] for i, n in enumerate(plan.names) if n.startswith("class_1")} == {0}
    listing.write_text("class_0\n")
    with pytest.raises(DataError, match=r"class_1.*img_000\.jpg: its class 'class_1' is not in the class list"):
        scan_imagefolder(photos, str(listing))


def test_imagenet21k_tars_and_folders(photos, tmp_path):
    source = tmp_path / "in21k"
    source.mkdir()
    for synset, klass in (("n00000002", "class_0"), ("n00000001", "class_1")):
        with tarfile.open(source / f"{synset}.tar", "w") as archive:
            for path in sorted((photos / klass).iterdir()):
                archive.add(path, arcname=f"{synset}_{path.name}")
            junk = b"not an image at all"
            info = tarfile.TarInfo(f"{synset}_junk.JPEG")
            info.size = len(junk)
            archive.addfile(info, io.BytesIO(junk))
    shutil.copytree(photos / "class_0", source / "n00000003")
    plan = scan_imagenet21k(source)
    assert plan.classes == ["n00000001", "n00000002", "n00000003"]
    manifest = prepare(plan, tmp_path / "out", num_shards=2, settings=SETTINGS, workers=2, progress=False)
    skipped = sorted(k["path"] for k in manifest.skipped)
    assert "n00000001.tar:n00000001_junk.JPEG" in skipped and "n00000002.tar:n00000002_junk.JPEG" in skipped
    assert manifest.num_samples == 3 * 6  # 6 good images per tar and in the folder
    assert len(skipped) == 4  # the two junk members, and broken.jpg in the class_0 tar and in n00000003/
    assert os.path.join("n00000003", "broken.jpg") in skipped


def test_prepare_digits_cli_writes_train_and_val(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["prepare", "digits", str(out), "--num-shards", "3", "--workers", "2"]) == 0
    train, val = load_manifest(out / "train" / "manifest.json"), load_manifest(out / "val" / "manifest.json")
    assert (train.num_samples, val.num_samples) == (1437, 360)
    assert train.classes == val.classes == tuple(str(d) for d in range(10))
    assert len(train.shards) == len(val.shards) == 3
    assert {(s.max_height, s.max_width) for s in train.shards} == {(32, 32)}
    assert "img/s" not in capsys.readouterr().err, "the progress bar must stay quiet when stderr is not a terminal"


def test_prepare_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert main(["prepare", "imagefolder", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_digits_split_is_fixed_and_disjoint():
    from vilscale.data.writer import scan_digits

    train, val = scan_digits(16)
    again, _ = scan_digits(16)
    assert train.names == again.names
    assert not set(train.names) & set(val.names)
    assert len(train.names) + len(val.names) == 1797
    image = train.refs[0][1]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and image.max() > 200
