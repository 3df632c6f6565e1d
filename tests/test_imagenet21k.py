"""ImageNet-21K as labs use it: `vilscale prepare imagenet21k --processed` drops small classes, holds out a seeded
validation split with one class list in both manifests, and refuses thresholds that cannot work before writing
anything. The source is a 21K-shaped tree of real images (scikit-learn's handwritten digits as PNGs): 200 synsets
of 0-12 images, as per-synset tars and as per-synset folders, with the paper's thresholds (500/50) scaled down to
4/2."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest

from vilscale.cli import main
from vilscale.data.manifest import DataError, load_manifest
from vilscale.data.writer import _image_key, scan_imagenet21k, split_imagenet21k

NUM_SYNSETS = 200
MIN_IMAGES, VAL_PER_CLASS = 4, 2  # the paper's 500 and 50, scaled to classes of 0-12 images


def _synset(k: int) -> str:
    return f"n{10000000 + 7 * k:08d}"


@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
    rng = np.random.default_rng(21)
    counts = rng.integers(0, 13, size=NUM_SYNSETS)
    counts[:3] = (0, MIN_IMAGES, VAL_PER_CLASS)  # an empty class, one at the threshold, one the size of the split
    return {_synset(k): int(n) for k, n in enumerate(counts)}


@pytest.fixture(scope="module")
def trees(sizes, tmp_path_factory) -> dict[str, object]:
    """{"tar": SRC of n*.tar, "folder": SRC of n*/ folders}: the same PNGs of real handwritten digits in both."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = np.clip(load_digits().images * (255 / 16), 0, 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("in21k")
    tar_root, folder_root = root / "tars", root / "folders"
    tar_root.mkdir()
    next_digit = 0
    for synset, count in sizes.items():
        folder = folder_root / synset
        folder.mkdir(parents=True)
        with tarfile.open(tar_root / f"{synset}.tar", "w") as archive:
            for i in range(count):
                buffer = io.BytesIO()
                Image.fromarray(digits[next_digit % len(digits)]).resize((16, 16)).save(buffer, format="PNG")
                next_digit += 1
                name = f"{synset}_{i}.png"
                (folder / name).write_bytes(buffer.getvalue())
                info = tarfile.TarInfo(name)
                info.size = len(buffer.getvalue())
                archive.addfile(info, io.BytesIO(buffer.getvalue()))
    return {"tar": tar_root, "folder": folder_root}


def _held_out(plan) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, label in zip(plan.names, plan.labels):
        out.setdefault(plan.classes[label], set()).add(_image_key(name))
    return out


def test_split_drops_small_classes_and_holds_out_the_same_seeded_images_from_tars_and_folders(trees, sizes):
    kept = [s for s, n in sizes.items() if n > MIN_IMAGES]
    dropped = [{"class": s, "images": n} for s, n in sizes.items() if n <= MIN_IMAGES]
    splits = {}
    for form, source in trees.items():
        train, val = split_imagenet21k(scan_imagenet21k(source), min_images_per_class=MIN_IMAGES,
                                       val_per_class=VAL_PER_CLASS, seed=0)
        assert train.classes == val.classes == kept, form
        assert train.dropped_classes == val.dropped_classes == dropped, form
        assert Counter(val.labels) == {label: VAL_PER_CLASS for label in range(len(kept))}, form
        assert Counter(train.labels) == {label: sizes[s] - VAL_PER_CLASS for label, s in enumerate(kept)}, form
        assert not set(train.names) & set(val.names)
        splits[form] = (_held_out(train), _held_out(val))
    assert splits["tar"] == splits["folder"], "the same tree as tars or folders must hold out the same images"
    again = split_imagenet21k(scan_imagenet21k(trees["tar"]), min_images_per_class=MIN_IMAGES,
                              val_per_class=VAL_PER_CLASS, seed=0)[1]
    other_seed = split_imagenet21k(scan_imagenet21k(trees["tar"]), min_images_per_class=MIN_IMAGES,
                                   val_per_class=VAL_PER_CLASS, seed=1)[1]
    assert _held_out(again) == splits["tar"][1], "the held-out images must not change from run to run"
    assert _held_out(other_seed) != splits["tar"][1], "--seed must choose the held-out images"


@pytest.fixture(scope="module")
def processed(trees, tmp_path_factory) -> dict[str, object]:
    """{"tar": OUT, "folder": OUT} of `vilscale prepare imagenet21k SRC OUT --processed` with the scaled thresholds,
    and the command's stderr."""
    import contextlib
    import io as text_io

    out = {}
    for form, source in trees.items():
        folder = tmp_path_factory.mktemp(f"processed-{form}")
        err = text_io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["prepare", "imagenet21k", str(source), str(folder), "--processed", "--min-images-per-class",
                         str(MIN_IMAGES), "--val-per-class", str(VAL_PER_CLASS), "--num-shards", "2", "--workers",
                         "2", "--max-side", "0"]) == 0, err.getvalue()
        out[form], out[f"{form}-stderr"] = folder, err.getvalue()
    return out


def test_prepare_processed_writes_train_and_val_with_one_class_list_and_the_dropped_classes(processed, sizes):
    kept = [s for s, n in sizes.items() if n > MIN_IMAGES]
    written = {}
    for form in ("tar", "folder"):
        out = processed[form]
        train, val = load_manifest(out / "train"), load_manifest(out / "val")
        assert list(train.classes) == list(val.classes) == kept
        assert [d["class"] for d in train.dropped_classes] == [s for s, n in sizes.items() if n <= MIN_IMAGES]
        assert val.dropped_classes == train.dropped_classes
        assert val.num_samples == VAL_PER_CLASS * len(kept)
        assert train.num_samples == sum(sizes[s] for s in kept) - val.num_samples
        assert train.writer["processing"] == {"min_images_per_class": MIN_IMAGES, "val_per_class": VAL_PER_CLASS,
                                              "seed": 0, "split": "train"}
        assert Counter(_shard_labels(val)) == {label: VAL_PER_CLASS for label in range(len(kept))}
        written[form] = (train.shard_sizes, val.shard_sizes)
        assert f"{len(kept)} classes kept, {NUM_SYNSETS - len(kept)} dropped" in processed[f"{form}-stderr"]
    assert written["tar"] == written["folder"]


def _shard_labels(manifest) -> list[int]:
    from ffcv.reader import Reader

    labels = []
    for shard in manifest.shards:
        labels.extend(int(v) for v in Reader(str(shard.path)).metadata["f1"])
    return labels


@pytest.mark.parametrize("options, words", [
    (("--min-images-per-class", "12"), "--min-images-per-class 12 drops all 200 classes"),
    (("--min-images-per-class", "1", "--val-per-class", "2"),
     f"--val-per-class 2 leaves no training image in class {_synset(2)} (2 images)"),
    (("--val-per-class", "1"), f"--val-per-class 1 leaves no training image in class {_synset(0)} (0 images)"),
    (("--processed",), "--min-images-per-class 500 drops all 200 classes"),
    (("--min-images-per-class", "-1"), "--min-images-per-class=-1 must be an integer >= 0"),
])
def test_thresholds_that_cannot_work_are_one_line_and_exit_2_before_anything_is_written(trees, tmp_path, capsys,
                                                                                        options, words):
    out = tmp_path / "out"
    assert main(["prepare", "imagenet21k", str(trees["tar"]), str(out), *options]) == 2
    error = capsys.readouterr().err
    assert words in error and len(error.strip().splitlines()) == 1, error
    assert not out.exists()


def test_the_split_is_a_data_error_in_the_api_too(trees):
    with pytest.raises(DataError, match="drops all"):
        split_imagenet21k(scan_imagenet21k(trees["folder"]), min_images_per_class=99, val_per_class=0)


def _tree_file(path, classes) -> None:
    """Three levels over the kept synsets: 5 roots, 30 under them, the rest under those 30."""
    lines = [f"{c} {classes[i % 5]}" for i, c in enumerate(classes) if 5 <= i < 35]
    lines += [f"{c} {classes[5 + i % 30]}" for i, c in enumerate(classes) if i >= 35]
    path.write_text("\n".join(lines) + "\n")


def _train_args(run_dir, out, tree) -> list[str]:
    """`vilscale train jobs/pretrain_21k.yaml --nproc 1 --set ...`: the job shrunk to vil_nano at 32 px, 3 steps of
    16 images on one CPU rank, on the processed tree with the semantic softmax."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    classes = load_manifest(out / "train").num_classes
    overrides = [f"run_dir={run_dir}", f"data.train_manifest={out / 'train' / 'manifest.json'}",
                 f"data.val_manifest={out / 'val' / 'manifest.json'}", "augment.loss=semantic_softmax",
                 f"data.hierarchy={tree}", "model.name=vil_nano", "model.img_size=32", "data.img_size=32",
                 "model.window=2", f"model.num_classes={classes}", "data.num_workers=1", "data.val_resize_ratio=1.0",
                 "train.global_batch=0", "train.micro_batch=16", "train.max_steps=3", "train.precision=fp32",
                 "train.device=cpu", "eval.batch_size=64", "launcher.backend=local", "launcher.nodes=1",
                 "launcher.gpus_per_node=0", "launcher.cpu_workers_per_node=1", "launcher.max_restarts=0"]
    return ["train", str(repo / "jobs" / "pretrain_21k.yaml"), "--nproc", "1"] + \
        [word for assignment in overrides for word in ("--set", assignment)]


@pytest.mark.slow
def test_the_21k_job_validates_on_the_held_out_split_with_the_semantic_softmax(processed, tmp_path,
                                                                              private_checksum_cache):
    """jobs/pretrain_21k.yaml, shrunk to vil_nano and 3 steps on one CPU rank, trains the processed tree with the
    paper's augmentation (RandAugment, mixup/cutmix, label smoothing) under the semantic softmax of a three-level tree
    and evaluates every held-out image once: top-1, top-5 and the semantic top-1 in metrics.jsonl."""
    import json
    import subprocess
    import sys

    out = processed["tar"]
    tree = tmp_path / "tree.txt"
    _tree_file(tree, list(load_manifest(out / "train").classes))
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", *_train_args(tmp_path / "run", out, tree)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_top1" in r]
    assert len(evaluations) == 1 and evaluations[0]["step"] == 3
    assert evaluations[0]["val_samples"] == load_manifest(out / "val").num_samples
    assert {"val_top5", "val_semantic_top1"} <= evaluations[0].keys()
    assert "semantic top-1" in result.stderr


def test_a_tree_naming_a_class_the_shards_lack_is_refused_before_any_rank(processed, tmp_path, capsys):
    out = processed["tar"]
    classes = list(load_manifest(out / "train").classes)
    tree = tmp_path / "tree.txt"
    tree.write_text(f"{classes[1]} {classes[0]}\n{classes[2]} n99999999\n")
    assert main(_train_args(tmp_path / "run", out, tree)) == 2
    error = capsys.readouterr().err
    assert "data.hierarchy: hierarchy file" in error and "n99999999" in error
    assert len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "run").exists()
