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


# ------------------------------------------------------------------- what the user gave is what is stored


def _stored_images(out) -> list[np.ndarray]:
    """The images of raw-stored shards (compress_probability=0): exactly the stored pixels."""
    from ffcv.reader import Reader

    manifest = load_manifest(out / "manifest.json")
    images = []
    for shard in manifest.shards:
        reader = Reader(str(shard.path))
        data = np.memmap(shard.path, dtype=np.uint8, mode="r")
        for entry in reader.metadata["f0"]:
            h, w, ptr = int(entry["height"]), int(entry["width"]), int(entry["data_ptr"])
            assert entry["mode"] == 1
            images.append(np.array(data[ptr:ptr + h * w * 3]).reshape(h, w, 3))
    return images


RAW = WriterSettings(max_side=0, compress_probability=0.0, page_size=2 << 20)


def _prepare_one(tmp_path, name: str, save) -> tuple[list, object]:
    """An ImageFolder with the one image that ``save(path)`` writes; returns (stored images, manifest)."""
    folder = tmp_path / "src" / "only"
    folder.mkdir(parents=True)
    save(folder / name)
    manifest = prepare(scan_imagefolder(tmp_path / "src"), tmp_path / "out", num_shards=1, settings=RAW, workers=1,
                       progress=False)
    return _stored_images(tmp_path / "out"), manifest


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))  # (8, 256) from black to white
    stored, manifest = _prepare_one(tmp_path, "deep.png", lambda p: Image.fromarray(ramp).save(p))
    assert Image.open(tmp_path / "src" / "only" / "deep.png").mode.startswith("I")
    assert not manifest.skipped and len(stored) == 1
    expected = np.round(ramp / 257).astype(np.uint8)
    assert np.abs(stored[0][..., 0].astype(int) - expected).max() <= 1
    assert (stored[0][..., 0] == stored[0][..., 1]).all() and (stored[0][..., 1] == stored[0][..., 2]).all()


def test_exif_orientation_is_applied(tmp_path, photos):
    from PIL import Image

    source = Image.open(photos / "class_0" / "img_000.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise

    def save(path):
        source.save(path, quality=95, exif=exif)

    stored, _ = _prepare_one(tmp_path, "turned.jpg", save)
    decoded = np.asarray(Image.open(tmp_path / "src" / "only" / "turned.jpg").convert("RGB"))
    assert stored[0].shape == (decoded.shape[1], decoded.shape[0], 3)
    assert np.array_equal(stored[0], np.rot90(decoded, k=-1))


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK", "L", "1"])
def test_palette_alpha_grey_and_cmyk_images_are_stored_as_their_rgb(tmp_path, photos, mode):
    from PIL import Image

    photo = Image.open(photos / "class_1" / "img_001.jpg").convert("RGB")
    if mode == "P":
        image = photo.convert("P", palette=Image.ADAPTIVE, colors=256)
        image.info["transparency"] = 0
    else:
        image = photo.convert(mode)
    if mode == "RGBA":
        image.putalpha(128)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    stored, manifest = _prepare_one(tmp_path, f"image{suffix}", lambda p: image.save(p))
    assert not manifest.skipped
    expected = np.asarray(Image.open(tmp_path / "src" / "only" / f"image{suffix}").convert("RGB"))
    assert np.array_equal(stored[0], expected), "stored pixels are Pillow's RGB conversion (alpha dropped)"
    if mode in ("P", "RGBA", "CMYK"):  # colour survives (not grey, not inverted)
        assert np.abs(stored[0].astype(int) - np.asarray(photo)).mean() < 12


def test_floating_point_images_are_skipped_with_a_reason(tmp_path):
    from PIL import Image

    stored, manifest = _prepare_one(tmp_path, "float.tif",
                                    lambda p: Image.fromarray(np.ones((8, 8), np.float32)).save(p))
    assert not stored and len(manifest.skipped) == 1
    assert "floating-point" in manifest.skipped[0]["reason"]


def test_empty_class_folders_and_non_image_files_are_reported(photos, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(photos, source)
    (source / "class_1" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["prepare", "imagefolder", str(source), str(out), "--num-shards", "1", "--workers", "1"]) == 0
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["empty_classes"] == ["zz_empty"]
    assert raw["ignored"] == [{"path": os.path.join("class_1", "notes.txt"),
                               "reason": raw["ignored"][0]["reason"]}]
    assert "not an image file" in raw["ignored"][0]["reason"]
    err = capsys.readouterr().err
    assert "1 class folder(s) hold no image" in err and "zz_empty" in err
    assert "ignored 1 file(s) that are not images" in err and "notes.txt" in err


# ------------------------------------------------------------------------------------- damaged tars


def _tar_of(path, files) -> list[tuple[int, int]]:
    """Write a plain tar of ``files`` and return (header offset, data end) per member."""
    spans = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for file in files:
            info = archive.gettarinfo(str(file), arcname=file.name)
            with open(file, "rb") as handle:
                archive.addfile(info, handle)
    with tarfile.open(path) as archive:
        for member in archive:
            spans.append((member.offset, member.offset_data + member.size))
    return spans


def test_damaged_tars_are_salvaged_and_every_one_is_named(photos, tmp_path):
    source = tmp_path / "in21k"
    source.mkdir()
    images = sorted((photos / "class_0").glob("img_*.jpg"))[:4]
    good = _tar_of(source / "n00000001.tar", images)
    assert len(good) == 4
    spans = _tar_of(source / "n00000002.tar", images)  # cut inside its third member
    cut = source / "n00000002.tar"
    cut.write_bytes(cut.read_bytes()[: (spans[2][0] + spans[2][1]) // 2])
    spans = _tar_of(source / "n00000003.tar", images)  # cut exactly after its second member: no end marker
    boundary = source / "n00000003.tar"
    boundary.write_bytes(boundary.read_bytes()[: spans[2][0]])
    spans = _tar_of(source / "n00000004.tar", images)  # the second member's header is garbage
    damaged = source / "n00000004.tar"
    content = bytearray(damaged.read_bytes())
    content[spans[1][0]: spans[1][0] + 512] = b"\x07" * 512
    damaged.write_bytes(bytes(content))
    (source / "n00000005.tar").write_bytes(b"this is not a tar file at all" * 40)

    plan = scan_imagenet21k(source)
    by_tar = {}
    for name in plan.names:
        by_tar.setdefault(name.split(":")[0], []).append(name)
    assert {k: len(v) for k, v in by_tar.items()} == {"n00000001.tar": 4, "n00000002.tar": 2, "n00000003.tar": 2,
                                                      "n00000004.tar": 3}
    lost = {item["path"]: item["reason"] for item in plan.lost}
    assert "lost: the tar is truncated inside this member" in lost[f"n00000002.tar:{images[2].name}"]
    assert "truncated tar" in lost["n00000003.tar"] and "end-of-archive marker" in lost["n00000003.tar"]
    assert "damaged tar: a header that does not parse" in lost["n00000004.tar"]
    assert "not a readable tar file" in lost["n00000005.tar"]
    assert "n00000001.tar" not in lost
    assert plan.empty_classes == ["n00000005"]

    manifest = prepare(plan, tmp_path / "out", num_shards=2, settings=SETTINGS, workers=2, progress=False)
    assert manifest.num_samples == 11
    skipped = {item["path"] for item in manifest.skipped}
    assert {"n00000003.tar", "n00000004.tar", "n00000005.tar", f"n00000002.tar:{images[2].name}"} <= skipped
    assert manifest.empty_classes == ("n00000005",)
