"""Fault: random and mutated job specs. Expected: a spec whose every number is finite, or a `SpecError` that
names a key that was changed (exit code 2 from the CLI) — never another exception, never a traceback."""

from __future__ import annotations

import dataclasses
import math
import re
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
    """(a mutated copy of the smoke spec, the dotted key paths the mutations touched)."""
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    touched = []
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        node = raw
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        else:
            action = draw(st.sampled_from(["replace", "delete", "rename"]))
            dotted = ".".join(path)
            if action == "replace":
                node[path[-1]] = draw(yaml_values)
            elif action == "delete":
                node.pop(path[-1], None)
            else:
                suffix = draw(st.sampled_from(["_", "s", "X"]))
                node[path[-1] + suffix] = node.pop(path[-1], None)
                touched.append(dotted + suffix)
            touched.append(dotted)
    return raw, touched


def finite_numbers(value) -> bool:
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(finite_numbers(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def check(raw, touched: list[str] | None = None) -> None:
    """Loads to a sane spec, or raises SpecError naming one of the ``touched`` keys (any other exception fails)."""
    try:
        spec = spec_from_dict(raw)
    except SpecError as error:
        message = str(error)
        if touched is not None:
            # a deleted key can surface as its section's default disagreeing with another key: name either
            assert any(path in message for path in touched), (message, touched)
        return
    assert isinstance(spec, JobSpec)
    assert finite_numbers(spec.to_dict()), spec.to_dict()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_mutated_specs_load_or_fail_with_a_spec_error_naming_a_changed_key(mutated):
    raw, touched = mutated
    check(raw, touched)


@settings(max_examples=100, deadline=None)
@given(yaml_values)
def test_random_yaml_documents_load_or_fail_with_a_spec_error(raw):
    check(raw)  # no key is "changed" here: any SpecError will do, any other exception fails


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_files_fail_cleanly(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("spec") / "job.yaml"
    path.write_text(text)
    try:
        load_spec(path)
    except SpecError as error:
        message = str(error)
        # one line that names the file (not YAML, not a mapping, not text) or a key of the spec (missing, unknown,
        # wrong), never an empty or generic one
        assert message and "\n" not in message.strip(), message
        sections = {field.name for field in dataclasses.fields(JobSpec)}
        assert message.startswith(str(path)) or re.match(rf"(unknown key |missing key )?({'|'.join(sections)})\b",
                                                         message), message


@pytest.mark.parametrize("mutation,named", [
    ({"train": {"zero_stage": "two"}}, "train.zero_stage"),
    ({"model": {"windw": 7}}, "model.windw"),
    ({"data": {"mean": [0.5, 0.5]}}, "data.mean"),
    ({"launcher": {"env": ["A=1"]}}, "launcher.env"),
])
def test_the_cli_exits_2_naming_the_key_never_a_traceback(tmp_path, mutation, named, refused):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for section, values in mutation.items():
        raw[section].update(values) if section in raw else raw.__setitem__(section, values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert named in refused("train", str(path))
