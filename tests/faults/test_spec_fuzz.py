"""Fault: random and mutated job specs. Expected: a valid spec, or exit code 2 with a message naming the
key path — never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vilscale.orchestration.config import JobSpec, SpecError, load_spec, spec_from_dict

pytestmark = pytest.mark.faults

JOBS = Path(__file__).resolve().parents[2] / "jobs"
BASE = yaml.safe_load((JOBS / "smoke.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3))
yaml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)


def key_paths(raw: dict, prefix=()):
    for key, value in raw.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from key_paths(value, (*prefix, key))


PATHS = list(key_paths(BASE))


@st.composite
def mutated_specs(draw):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        node = raw
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        else:
            action = draw(st.sampled_from(["replace", "delete", "rename"]))
            if action == "replace":
                node[path[-1]] = draw(yaml_values)
            elif action == "delete":
                node.pop(path[-1], None)
            else:
                node[path[-1] + draw(st.sampled_from(["_", "s", "X"]))] = node.pop(path[-1], None)
    return raw


def check(raw) -> None:
    try:
        spec = spec_from_dict(raw)
    except SpecError as error:
        message = str(error)
        assert message and "Traceback" not in message
        return
    assert isinstance(spec, JobSpec)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_mutated_specs_load_or_fail_with_a_spec_error(raw):
    check(raw)


@settings(max_examples=100, deadline=None)
@given(yaml_values)
def test_random_yaml_documents_load_or_fail_with_a_spec_error(raw):
    check(raw)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_files_fail_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("spec") / "job.yaml"
    path.write_text(text)
    try:
        load_spec(path)
    except SpecError as error:
        assert str(error)


@pytest.mark.parametrize("mutation,named", [
    ({"train": {"zero_stage": "two"}}, "train.zero_stage"),
    ({"model": {"windw": 7}}, "model.windw"),
    ({"data": {"mean": [0.5, 0.5]}}, "data.mean"),
    ({"launcher": {"env": ["A=1"]}}, "launcher.env"),
])
def test_the_cli_exits_2_naming_the_key_never_a_traceback(tmp_path, mutation, named):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for section, values in mutation.items():
        raw[section].update(values) if section in raw else raw.__setitem__(section, values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "vilscale.cli", "train", str(path)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
