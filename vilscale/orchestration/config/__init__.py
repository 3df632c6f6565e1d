"""The job spec: a tree of frozen dataclasses (`spec`), loaded strictly from YAML with `--set`
overrides (`loading`), and the pre-flight checks a launcher runs before any rank starts (`preflight`).

A `SpecError` is a user's mistake: the command that meets it exits 2 with one line and nothing is
started or restarted.
"""

from vilscale.orchestration.config.loading import apply_override, load_spec, spec_from_dict
from vilscale.orchestration.config.spec import (
    EvalConfig,
    JobSpec,
    LauncherConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    SpecError,
    TrainConfig,
)

__all__ = ["EvalConfig", "JobSpec", "LauncherConfig", "MetricsConfig", "ModelConfig", "OptimConfig",
           "ScheduleConfig", "SpecError", "TrainConfig", "apply_override", "load_spec", "spec_from_dict"]
