"""`vilscale eval JOB.yaml --weights W`: any weights (an export, an official checkpoint, a run dir) scored on the
job's validation data without a run dir, with the class lists compared; and exit code 2 with one line for a
user's mistake in every subcommand. Everything goes through the real `vilscale` command (the mistakes through its
entry point, `vilscale.cli.main`, in this process: 17 start-ups of torch and DeepSpeed cost minutes)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # `vilscale eval` and `convert` in their own processes, tens of seconds each

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke.yaml"
NANO = dict(img_size=32, window=2, num_classes=10, drop_path_rate=0.0)  # the smoke job's model


def vilscale(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vilscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def vilscale_here(*args: str) -> subprocess.CompletedProcess:
    """`vilscale ARGS` through its entry point in this process, as the console script runs it."""
    from vilscale.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(REPO):
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's own usage errors
            code = stop.code if isinstance(stop.code, int) else 1
    return subprocess.CompletedProcess(["vilscale", *args], code, out.getvalue(), err.getvalue())


def refused_in_one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    return lines[0]


def evaluated(result: subprocess.CompletedProcess) -> tuple[dict, str]:
    """(the JSON result, the headline line) of a successful `vilscale eval`."""
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[0]), lines[-1]


def val_manifest(smoke) -> Path:
    return smoke.digits / "val" / "manifest.json"


def on_the_smoke_job(smoke, tmp_path: Path, weights: Path | str, *extra: str) -> subprocess.CompletedProcess:
    """`vilscale eval jobs/smoke.yaml --weights W` on the session's digits, with a run_dir that must stay unmade."""
    return vilscale("eval", str(SMOKE), "--weights", str(weights), "--set", f"data.val_manifest={val_manifest(smoke)}",
                    "--set", f"run_dir={tmp_path / 'never_made'}", *extra)


@pytest.fixture(scope="module")
def ema_export(smoke, baseline_run, tmp_path_factory) -> Path:
    """The baseline run's EMA weights exported: what `vilscale eval RUN_DIR` evaluates by default."""
    out = tmp_path_factory.mktemp("export") / "vil_nano_smoke.safetensors"
    smoke.export(baseline_run, out, "--ema")
    return out


@pytest.fixture(scope="module")
def run_eval(baseline_eval) -> tuple[dict, str]:
    return evaluated(baseline_eval)


def test_eval_of_an_export_on_the_job_spec_equals_eval_of_the_run(smoke, baseline_run, ema_export, run_eval,
                                                                   tmp_path):
    from safetensors import safe_open

    with safe_open(str(ema_export), "pt") as handle:  # the export names the class list it was trained on
        assert json.loads(handle.metadata()["classes"]) == json.loads(
            (smoke.digits / "train" / "manifest.json").read_text())["classes"]
    expected, headline = run_eval
    result, line = evaluated(on_the_smoke_job(smoke, tmp_path, ema_export))
    assert line == headline and line.startswith("val top-1: ")
    assert (result["val_top1"], result["val_top5"], result["val_samples"]) == \
        (expected["val_top1"], expected["val_top5"], expected["val_samples"])
    # a run dir as --weights: its newest verified checkpoint, as `vilscale eval RUN_DIR` reads it (EMA)
    result, line = evaluated(on_the_smoke_job(smoke, tmp_path, baseline_run))
    assert line == headline and (result["val_top1"], result["val_top5"]) == (expected["val_top1"], expected["val_top5"])
    assert not (tmp_path / "never_made").exists() and not (REPO / "runs" / "never_made").exists()


def test_eval_of_an_official_checkpoint(smoke, ema_export, run_eval, tmp_path):
    """The same weights in the official container, names and layouts (`{"net": ...}`, `module.` prefixes, query/kv
    split, duplicated global projections) score exactly what the export scores."""
    from safetensors.torch import load_file

    from vilscale.model import create_model, vilscale_to_official

    model = create_model("vil_nano", **NANO)
    model.load_state_dict(load_file(str(ema_export)))
    official = tmp_path / "model_best.pth"
    torch.save({"net": {f"module.{key}": value for key, value in vilscale_to_official(model).items()}}, official)
    expected, headline = run_eval
    result, line = evaluated(on_the_smoke_job(smoke, tmp_path, official))
    assert line == headline and (result["val_top1"], result["val_top5"]) == (expected["val_top1"], expected["val_top5"])


def _val_copy_with_classes(smoke, tmp_path: Path, classes: list[str]) -> Path:
    copy = tmp_path / "val"
    shutil.copytree(smoke.digits / "val", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["classes"] = classes
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy / "manifest.json"


@pytest.mark.parametrize("change", ["reordered", "two_more"])
def test_a_val_manifest_of_other_classes_is_refused_in_one_line(smoke, baseline_run, ema_export, tmp_path, change):
    classes = json.loads(val_manifest(smoke).read_text())["classes"]
    other = _val_copy_with_classes(smoke, tmp_path, classes[::-1] if change == "reordered" else classes + ["x", "y"])
    for result in (on_the_smoke_job(smoke, tmp_path, ema_export, "--set", f"data.val_manifest={other}"),
                   vilscale("eval", str(baseline_run), "--set", f"data.val_manifest={other}")):
        line = refused_in_one_line(result)
        assert str(other) in line and "classes" in line, line
        assert ("another order" in line) if change == "reordered" else ("10" in line and "12" in line), line


def test_weights_that_do_not_fit_the_model_are_one_line_naming_keys_and_the_fix(smoke, ema_export, tmp_path):
    from safetensors.torch import save_file

    from vilscale.model import create_model

    rpe = tmp_path / "rpe.safetensors"  # another variant of the family: relative position tables, no APE
    save_file(create_model("vil_nano", pos_embed="rpe", **NANO).state_dict(), str(rpe))
    line = refused_in_one_line(on_the_smoke_job(smoke, tmp_path, rpe))
    assert "pos_embed" in line and ("rel_bias" in line or "row_embed" in line), line
    # the export's 10-way head in a model asked to have 7 classes: the shapes and the key to set
    line = refused_in_one_line(on_the_smoke_job(smoke, tmp_path, ema_export, "--set", "model.num_classes=7"))
    assert "head.weight" in line and "(10, " in line and "model.num_classes=10" in line, line
    line = refused_in_one_line(on_the_smoke_job(smoke, tmp_path, tmp_path / "missing.safetensors"))
    assert "missing.safetensors" in line and "does not exist" in line, line
    line = refused_in_one_line(vilscale("eval", str(SMOKE), "--set", f"data.val_manifest={val_manifest(smoke)}"))
    assert "--weights" in line, line


def test_convert_says_what_it_does_with_a_head_of_another_class_count(tmp_path):
    from safetensors.torch import load_file

    from vilscale.model import create_model, vilscale_to_official

    source = create_model("vil_nano", num_classes=20)
    checkpoint = tmp_path / "model_best.pth"
    torch.save({"net": vilscale_to_official(source)}, checkpoint)
    result = vilscale("convert", str(checkpoint), str(tmp_path / "out.safetensors"), "--model", "vil_nano",
                      "--num-classes", "10")
    assert result.returncode == 0, result.stderr
    said = [line for line in (result.stdout + result.stderr).splitlines() if "head" in line]
    assert len(said) == 1 and "replaced (20 -> 10 classes" in said[0] and "--num-classes 20" in said[0], said
    head = load_file(str(tmp_path / "out.safetensors"))["head.weight"]
    assert not torch.equal(head, source.head.weight.detach()[:10])  # as init_weights: not the first 10 rows
    result = vilscale("convert", str(checkpoint), str(tmp_path / "first.safetensors"), "--model", "vil_nano",
                      "--num-classes", "10", "--head", "truncate")
    assert result.returncode == 0, result.stderr
    assert "truncated (20 -> first 10 classes)" in result.stdout, result.stdout
    torch.testing.assert_close(load_file(str(tmp_path / "first.safetensors"))["head.weight"],
                               source.head.weight.detach()[:10])


MISTAKES = {
    "prepare: no such source folder": ("prepare", "imagefolder", "/nonexistent/imagenet/train", "{tmp}/shards"),
    "prepare: output under a file": ("prepare", "digits", "{tmp}/a_file/digits"),
    "train: no such job spec": ("train", "/nonexistent/job.yaml"),
    "plan: no such job spec": ("plan", "/nonexistent/job.yaml"),
    "submit: no such job spec": ("submit", "/nonexistent/job.yaml", "--backend", "local"),
    "eval: no such run dir or spec": ("eval", "/nonexistent/run"),
    "eval: a job spec without --weights": ("eval", str(SMOKE)),
    "eval: unknown checkpoint tag": ("eval", "{run}", "--tag", "step_00000099"),
    "export: no such run dir": ("export", "/nonexistent/run", "{tmp}/out.safetensors"),
    "export: output under a file": ("export", "{run}", "{tmp}/a_file/out.safetensors"),
    "export: unknown checkpoint tag": ("export", "{run}", "{tmp}/out.safetensors", "--tag", "step_00000099"),
    "convert: no such checkpoint": ("convert", "/nonexistent/model_best.pth", "{tmp}/out.safetensors", "--model",
                                    "vil_nano"),
    "convert: not a checkpoint": ("convert", "{tmp}/a_file", "{tmp}/out.safetensors", "--model", "vil_nano"),
    "convert: no such class map": ("convert", "{official}", "{tmp}/out.safetensors", "--model", "vil_nano",
                                   "--class-map", "/nonexistent/map.json"),
    "report: no such run dir": ("report", "/nonexistent/run"),
    "bench: unknown model": ("bench", "flops", "--model", "vil_huge"),
    "demo: no such job spec": ("demo", "--job", "/nonexistent/job.yaml", "--data", "{digits}"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_users_mistake_exits_2_in_one_line_in_every_subcommand(smoke, baseline_run, tmp_path, mistake):
    from vilscale.model import create_model, vilscale_to_official

    (tmp_path / "a_file").write_text("not a checkpoint, not a folder\n")
    official = tmp_path / "model_best.pth"
    torch.save({"net": vilscale_to_official(create_model("vil_nano"))}, official)
    args = [arg.format(tmp=tmp_path, run=baseline_run, official=official, digits=smoke.digits)
            for arg in MISTAKES[mistake]]
    line = refused_in_one_line(vilscale_here(*args))
    assert line.startswith(f"vilscale {args[0]}"), line
