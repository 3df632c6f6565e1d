"""Strict loading of job specs: YAML -> `JobSpec`, with `--set key.path=value` overrides.

Every key is checked against the dataclass it lands in: unknown keys, wrong types and impossible
values raise `SpecError` naming the key path, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from vilscale.orchestration.config.spec import JobSpec, SpecError

_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _describe_type(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, value, tp):
    """Check ``value`` against the annotation ``tp`` (ints are accepted where floats are expected)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{path} must be a mapping of {_describe_type(tp)} keys, got {value!r}")
        return _build(path, tp, value)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(path, value, option)
            except SpecError:
                continue
        raise SpecError(f"{path}={value!r} has the wrong type; expected {_describe_type(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise SpecError(f"{path}={value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise SpecError(f"{path}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise SpecError(f"{path}={value!r} must be a mapping")
        return {str(k): _coerce(f"{path}.{k}", v if value_type is not str or v is None else str(v), value_type)
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            # YAML 1.1 reads 1e-3 (no dot) as a string; it is what people write for learning rates.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{path}={value!r} must be a number")
        if not math.isfinite(value):
            raise SpecError(f"{path}={value!r} must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{path}={value!r} must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{path}={value!r} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{path}={value!r} must be a string")
        return value
    raise SpecError(f"{path}: unsupported field type {_describe_type(tp)}")


def _build(prefix: str, cls, raw: dict):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise SpecError(f"unknown key {where}{unknown[0]}; valid keys{' of ' + prefix if prefix else ''}: "
                        f"{sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(path, value, hints[name])
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SpecError(f"missing key {prefix + '.' if prefix else ''}{missing[0]} (required)")
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (ValueError, TypeError) as error:
        raise SpecError(f"{prefix or 'spec'}: {error}") from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b=value`` to the raw mapping (the value is parsed as YAML)."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment!r} must look like key.path=value")
    path, text = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise SpecError(f"--set {assignment!r} has an empty key path")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise SpecError(f"--set {path}: value {text!r} is not valid YAML: {yaml_problem(error)}") from None
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {path}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans lines and quotes the text)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(error, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def spec_from_dict(raw: Any) -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"a job spec must be a YAML mapping of sections, got {type(raw).__name__}")
    return _build("", JobSpec, _renamed_keys(raw))


def _renamed_keys(raw: dict) -> dict:
    """Keys that have a new name, read under it. ``data.loader_workers`` (the detection and segmentation loaders'
    processes until 0.1) is ``data.num_workers`` now, one key for every task: its value is used, with one line that
    says so; a classification job never read it, so there it is dropped (spec.yaml files of older runs hold both)."""
    data = raw.get("data")
    if not isinstance(data, dict) or "loader_workers" not in data:
        return raw
    data = dict(data)
    value = data.pop("loader_workers")
    if raw.get("task", "classification") != "classification":
        data["num_workers"] = value
        print(f"[vilscale] data.loader_workers is deprecated: the key is data.num_workers now, for every task "
              f"(using data.num_workers={value!r}); rename it in the job spec", file=sys.stderr, flush=True)
    return {**raw, "data": data}


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override and validate a job spec: a YAML file, or the name of a job shipped with vilscale
    (``vilscale.orchestration.config.shipped``). Raises SpecError (exit code 2 in the CLI)."""
    from vilscale.orchestration.config import shipped

    path = shipped.resolve(path)
    if not path.is_file():
        raise SpecError(f"job spec {path} does not exist; give the path of a YAML file, or the name of a shipped job "
                        f"({', '.join(shipped.names())}; `vilscale jobs` lists them)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {yaml_problem(error)}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a text file") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job spec must be a mapping of sections, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    return spec_from_dict(raw)
