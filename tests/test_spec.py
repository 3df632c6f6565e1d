"""Job specs: strict loading, overrides, and errors that name the key, the value and what is valid."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vilscale.orchestration.config import JobSpec, SpecError, load_spec, spec_from_dict

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def minimal() -> dict:
    return {"run_dir": "runs/x", "data": {"train_manifest": "m.json"}}


@pytest.mark.parametrize("job", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_spec_loads(job):
    spec = load_spec(job)
    assert isinstance(spec, JobSpec)
    header = job.read_text().splitlines()[:6]
    assert any("vilscale" in line for line in header if line.startswith("#")), \
        f"{job.name}'s header must state the command that runs it"


def test_defaults_are_the_papers_recipe():
    spec = spec_from_dict(minimal())
    assert spec.optim.lr == 1e-3 and spec.optim.lr_batch_ref == 1024 and spec.optim.weight_decay == 0.1
    assert spec.schedule.warmup_epochs == 5 and spec.schedule.min_lr == 1e-6
    assert spec.train.epochs == 300 and spec.augment.label_smoothing == 0.1
    assert spec.metrics.host == "127.0.0.1"


def test_unknown_key_names_the_path_and_the_valid_keys(tmp_path):
    raw = minimal()
    raw["train"] = {"max_step": 10}
    with pytest.raises(SpecError, match=r"unknown key train\.max_step.*max_steps"):
        load_spec(write(tmp_path, raw))


def test_unknown_section_is_an_error():
    raw = minimal()
    raw["trian"] = {}
    with pytest.raises(SpecError, match=r"unknown key trian.*'train'"):
        spec_from_dict(raw)


@pytest.mark.parametrize("key,value,pattern", [
    ("train.zero_stage", 4, r"train\.zero_stage=4.*0, 1, 2 or 3"),
    ("train.precision", "fp8", r"train\.precision='fp8'.*fp32"),
    ("train.micro_batch", "big", r"train\.micro_batch='big' must be an integer"),
    ("train.micro_batch", 0, r"train\.micro_batch=0 must be a positive"),
    ("optim.lr", True, r"optim\.lr=True must be a number"),
    ("model.window_mode", "shifted", r"model\.window_mode='shifted'.*chunk"),
    ("optim.betas", [0.9], r"optim\.betas.*2 values"),
    ("data.img_size", 3, r"data\.img_size=3"),
])
def test_wrong_values_name_the_key_and_what_is_valid(key, value, pattern):
    raw = minimal()
    section, name = key.split(".")
    raw.setdefault(section, {})[name] = value
    with pytest.raises(SpecError, match=pattern):
        spec_from_dict(raw)


def test_set_overrides_any_key_with_yaml_values(tmp_path):
    path = write(tmp_path, minimal())
    spec = load_spec(path, ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "model.name=vil_tiny",
                            "launcher.env.FOO=bar"])
    assert spec.train.max_steps == 7 and spec.optim.betas == (0.8, 0.9) and spec.model.name == "vil_tiny"
    assert spec.launcher.env == {"FOO": "bar"}


def test_global_batch_not_divisible_by_world_size_fails_before_start():
    raw = minimal()
    raw["train"] = {"global_batch": 1000, "micro_batch": 64}
    spec = spec_from_dict(raw)
    with pytest.raises(SpecError, match=r"global_batch=1000 is not divisible.*micro_batch=64 x world size 2"):
        spec.check_world(2)
    raw["train"] = {"global_batch": 1024, "micro_batch": 64}
    assert spec_from_dict(raw).grad_accum(4) == 4


def test_digest_ignores_where_and_how_often_but_not_what():
    base = spec_from_dict(minimal())
    raw = minimal()
    raw["train"] = {"ckpt_every": 5}
    raw["launcher"] = {"nodes": 4}
    assert spec_from_dict(raw).digest() == base.digest()
    raw["optim"] = {"lr": 5e-4}
    assert spec_from_dict(raw).digest() != base.digest()


def test_cli_exits_2_with_the_key_before_anything_starts(tmp_path):
    raw = minimal()
    raw["train"] = {"zero_stage": 7}
    path = write(tmp_path, raw)
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "train", str(path)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "train.zero_stage=7" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written for an invalid spec"


def test_missing_spec_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 2e-3 as a string; a learning rate written that way must still be a number."""
    spec = load_spec(write(tmp_path, minimal()), ["optim.lr=2e-3", "schedule.min_lr=1E-6"])
    assert spec.optim.lr == 2e-3 and spec.schedule.min_lr == 1e-6
    with pytest.raises(SpecError, match=r"optim\.lr='2e-3x' must be a number"):
        load_spec(write(tmp_path, minimal()), ["optim.lr=2e-3x"])


def test_resumes_tell_execution_adjustable_and_fixed_keys_apart():
    from vilscale.orchestration.config.spec import key_kind, spec_changes

    assert key_kind("launcher.nodes") == key_kind("train.ckpt_every") == "execution"
    assert key_kind("train.max_steps") == key_kind("schedule.warmup_epochs") == "adjustable"
    assert key_kind("model.pos_embed") == key_kind("train.zero_stage") == key_kind("train.seed") == "fixed"
    old = spec_from_dict(minimal()).to_dict()
    new = spec_from_dict({**minimal(), "train": {"max_steps": 9, "ckpt_every": 5}, "launcher": {"nodes": 2}}).to_dict()
    assert spec_changes(old, new) == [("train.max_steps", 0, 9)]


def test_shift_modes_need_chunk_windows_and_the_switch_is_a_fraction():
    spec = spec_from_dict({**minimal(), "model": {"shift_mode": "random"}, "schedule": {"full_attention_from": 0.75}})
    assert spec.model.shift_mode == "random" and spec.schedule.full_attention_from == 0.75
    with pytest.raises(SpecError, match=r"model\.shift_mode='random' needs model\.window_mode='chunk'"):
        spec_from_dict({**minimal(), "model": {"shift_mode": "random", "window_mode": "exact"}})
    with pytest.raises(SpecError, match=r"schedule\.full_attention_from=1\.5 must be in \[0, 1\]"):
        spec_from_dict({**minimal(), "schedule": {"full_attention_from": 1.5}})
    with pytest.raises(SpecError, match=r"optim\.weight_decay_rule='keras'"):
        spec_from_dict({**minimal(), "optim": {"weight_decay_rule": "keras"}})


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_numbers_must_be_finite(tmp_path, value):
    """NaN passed every range check written as `x < 0` (weight decay, warmup lr): refuse it outright."""
    with pytest.raises(SpecError, match=r"optim\.weight_decay=.* must be a finite number"):
        load_spec(write(tmp_path, minimal()), [f"optim.weight_decay={value}"])


def test_slurm_site_options_load_from_yaml_and_set(tmp_path):
    raw = {**minimal(), "launcher": {"slurm": {"constraint": "a100&ib", "exclusive": True,
                                               "additional": {"mail-type": "END"}}}}
    spec = load_spec(write(tmp_path, raw), ["launcher.slurm.qos=high", "launcher.slurm.additional.comment=campaign-7",
                                            "launcher.slurm.exclude=node[01-03]"])
    site = spec.launcher.slurm
    assert (site.qos, site.constraint, site.exclusive, site.reservation, site.exclude) == \
        ("high", "a100&ib", True, "", "node[01-03]")
    assert site.additional == {"mail-type": "END", "comment": "campaign-7"}


@pytest.mark.parametrize("launcher,pattern", [
    ({"slurm": {"qso": "high"}}, r"unknown key launcher\.slurm\.qso; valid keys of launcher\.slurm: .*'qos'"),
    ({"slurm": {"exclusive": "yes"}}, r"launcher\.slurm\.exclusive='yes' must be true or false"),
    ({"slurm": {"qos": 3}}, r"launcher\.slurm\.qos=3 must be a string"),
    ({"slurm": "high"}, r"launcher\.slurm must be a mapping"),
    ({"slurm": {"additional": ["mail-type=END"]}},
     r"launcher\.slurm\.additional=\['mail-type=END'\] must be a mapping"),
    ({"slurm": {"additional": {"--mail-type": "END"}}},
     r"launcher\.slurm\.additional: '--mail-type' .* without the leading dashes, e\.g\. 'mail-type'"),
    ({"slurm": {"additional": {"qos": "high"}}}, r"launcher\.slurm\.additional: 'qos' .* launcher\.slurm\.qos"),
    ({"slurm": {"additional": {"time": "10"}}}, r"launcher\.slurm\.additional: 'time' .* launcher\.time_min"),
    ({"slurm": {"additional": {"output": "x.log"}}}, r"launcher\.slurm\.additional: 'output' is set by vilscale"),
])
def test_slurm_site_options_are_checked_with_the_key_path(launcher, pattern):
    with pytest.raises(SpecError, match=pattern):
        spec_from_dict({**minimal(), "launcher": launcher})


def test_slurm_site_options_are_execution_keys_and_additional_stays_whole():
    from vilscale.orchestration.config.spec import flatten, key_kind, spec_changes

    old = spec_from_dict(minimal())
    new = spec_from_dict({**minimal(), "launcher": {"slurm": {"qos": "low", "additional": {"mail-type": "END"}}}})
    flat = flatten(new.to_dict())
    assert flat["launcher.slurm.additional"] == {"mail-type": "END"} and flat["launcher.slurm.qos"] == "low"
    assert key_kind("launcher.slurm.qos") == key_kind("launcher.slurm.additional") == "execution"
    assert spec_changes(old.to_dict(), new.to_dict()) == [] and old.digest() == new.digest()


def test_a_run_dir_written_before_a_key_existed_resumes_while_the_key_keeps_its_default(tmp_path):
    """A run dir's spec.yaml written by an older vilscale lacks the keys added since (a job queued or requeued
    across an upgrade): a missing key compares as its default, so the run resumes; a value other than the default
    is a change like any other, reported against the default."""
    from vilscale.orchestration.checkpoint.rundir import RunDirError, check_resume_compatible
    from vilscale.orchestration.config.spec import flatten, spec_changes

    spec = spec_from_dict({**minimal(), "run_dir": str(tmp_path / "run")})
    older = spec.to_dict()
    for section in ("model", "data", "augment", "optim", "schedule", "train", "eval", "metrics", "launcher"):
        older[section].pop(sorted(older[section])[-1])  # one key per section that the older version did not have
    del older["task"]
    assert len(flatten(spec.to_dict())) - len(flatten(older)) >= 10
    assert spec_changes(older, spec.to_dict()) == []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "spec.yaml").write_text(yaml.safe_dump(older))
    assert check_resume_compatible(spec) == []

    missing = sorted(older["model"].keys() ^ spec.to_dict()["model"].keys())[0]
    assert missing == "window_mode"
    changed = spec_from_dict({**minimal(), "run_dir": str(tmp_path / "run"), "model": {"window_mode": "exact"}})
    assert spec_changes(older, changed.to_dict()) == [("model.window_mode", "chunk", "exact")]
    with pytest.raises(RunDirError, match="model.window_mode: 'chunk' -> 'exact'"):
        check_resume_compatible(changed)


def test_one_key_for_decode_workers_and_the_old_detection_key_is_read_under_it(capsys):
    dense = {"run_dir": "runs/x", "task": "detection", "data": {"loader_workers": 3}}
    assert spec_from_dict(dense).data.num_workers == 3
    assert "data.loader_workers is deprecated: the key is data.num_workers now" in capsys.readouterr().err
    # an older classification spec.yaml holds the unread loader_workers default beside its num_workers
    old = {**minimal(), "data": {"train_manifest": "m.json", "num_workers": 5, "loader_workers": 2}}
    assert spec_from_dict(old).data.num_workers == 5
    assert "loader_workers" not in spec_from_dict(old).to_dict()["data"]
    with pytest.raises(SpecError, match="data.num_workers=0: classification decodes in FFCV's threads"):
        spec_from_dict({**minimal(), "data": {"train_manifest": "m.json", "num_workers": 0}})
    assert spec_from_dict({**dense, "data": {"num_workers": 0}}).data.num_workers == 0


def test_decode_workers_sized_for_a_cluster_node_are_clamped_to_this_machine_with_one_line():
    from vilscale.devices import clamp_workers, usable_cores

    cores, lines = usable_cores(), []
    assert clamp_workers(cores + 6, key="data.num_workers", log=lines.append) == cores
    assert lines == [f"data.num_workers={cores + 6} is more than the {cores} CPU core(s) this process may use: "
                     f"using {cores}"]
    assert clamp_workers(cores, key="data.num_workers", log=lines.append) == cores and len(lines) == 1


@pytest.mark.parametrize(("key", "value"), [
    ("launcher.slurm.additional.mail-user", "me@lab\necho INJECTED #"),
    ("launcher.slurm.qos", "high\n#SBATCH --time=1"),
    ("launcher.slurm.constraint", "a100\rrm -rf ~"),
    ("launcher.slurm.exclude", "node01 node02"),
    ("launcher.slurm.reservation", "maint'; touch x; '"),
    ("launcher.partition", "gpu\x00"),
    ("launcher.account", "lab\tteam"),
])
def test_a_slurm_value_that_sbatch_would_not_read_as_one_directive_value_is_refused(tmp_path, key, value):
    """A newline in a site option ends the #SBATCH directives of the batch script there (sbatch stops reading them:
    --requeue, --signal, --time and --nodes after it are dropped) and puts the rest in the script as a command."""
    raw = minimal()
    node = raw
    path = key.split(".")
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    with pytest.raises(SpecError, match=rf"{re.escape(key)}=.*one sbatch directive value"):
        spec_from_dict(raw)


def test_a_run_dir_name_becomes_a_job_name_sbatch_reads_as_one_value(tmp_path):
    from vilscale.orchestration.launch.slurm import job_name

    assert job_name(spec_from_dict({**minimal(), "run_dir": "runs/a b\n#SBATCH --x"})) == "vilscale-a_b__SBATCH_--x"
    assert job_name(spec_from_dict({**minimal(), "run_dir": "runs/pretrain_21k"})) == "vilscale-pretrain_21k"
