"""How a command or a rank ends: the exit codes every launcher understands, and the user-facing error types behind
them. At the bottom of the package, beside ``files.py`` and ``devices.py``: the data and model commands end with
these codes as the launchers do, without reaching up into the orchestration layer.

An error is classified where it arises: a user's mistake or bad data (no restart can fix it: exit 2 or 4, and the
run stops with one line) versus a transient fault (a crashed peer, a full disk being freed, a lost node, a collective
that timed out, a shared file system that stayed unreadable through its retries: exit 1, restarted from the latest
checkpoint). Running out of memory is deterministic (the same batch on the same machine runs out again): exit 5,
with the figures and the fix. Launchers never restart the first kind: the local launcher and SLURM look at the exit
code, Ray at the exception type (``vilscale.orchestration.launch.exit_codes.classify``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
"""A fault that a restart from the latest checkpoint may get past."""
EXIT_SPEC_ERROR = 2
"""The job spec, the run dir or the launch itself is wrong: fix it and relaunch."""
EXIT_NONFINITE = 3
"""Repeated non-finite losses: change the recipe (lr, clipping) or the data."""
EXIT_DATA_ERROR = 4
"""The data is missing or corrupt: rewrite the shards."""
EXIT_OUT_OF_MEMORY = 5
"""A rank ran out of device or host memory: the same batch on the same machine would again."""
EXIT_RUN_DIR_LOST = 6
"""Another launch took the run dir over while this one was paused or cut off: the run goes on there."""
EXIT_NO_CHECKPOINT = 7
"""The run dir holds checkpoints and none of them verifies: resuming is impossible and starting over is the user's
decision (`--start-over`), never a restart's."""

NOT_RESTARTABLE = {EXIT_SPEC_ERROR: "invalid job spec", EXIT_NONFINITE: "repeated non-finite losses",
                   EXIT_DATA_ERROR: "bad data", EXIT_OUT_OF_MEMORY: "out of memory",
                   EXIT_RUN_DIR_LOST: "the run dir was taken over by another launch",
                   EXIT_NO_CHECKPOINT: "no usable checkpoint in the run dir"}


def is_restartable(code: int) -> bool:
    return code not in NOT_RESTARTABLE


class SpecError(ValueError):
    """A job spec (or a command's arguments) is invalid; the message names the key path, the value and what is
    valid. Exit code 2."""


class DataError(ValueError):
    """Bad input data: the message names the file and says how to fix it. Exit code 4 in a rank."""


__all__ = ["EXIT_DATA_ERROR", "EXIT_FAILED", "EXIT_NONFINITE", "EXIT_NO_CHECKPOINT", "EXIT_OK", "EXIT_OUT_OF_MEMORY",
           "EXIT_RUN_DIR_LOST", "EXIT_SPEC_ERROR", "NOT_RESTARTABLE", "DataError", "SpecError", "is_restartable"]
