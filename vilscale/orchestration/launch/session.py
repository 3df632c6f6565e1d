"""A launch on this machine, from the job file to running ranks, in the order that keeps run dirs safe:

1. load the spec and run every pre-flight check (`preflight`): nothing is written yet;
2. take the run dir's lock (refused, with the owner named, if a live run holds it);
3. check the spec against the run dir again under the lock, then write ``spec.yaml``;
4. run the ranks (torchrun's agent locally, or a Ray Train `TorchTrainer` from inside a Ray job),
   holding the lock until they end.

A launch refused in steps 1-3 leaves an existing run dir exactly as it was.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vilscale.orchestration.config import JobSpec, SpecError, load_spec


class LaunchRefused(Exception):
    """The launch was refused before anything started; the message is the one line to print."""


class LocalLaunch:
    """A checked, locked launch; use as a context manager (the lock is released on exit)."""

    def __init__(self, spec: JobSpec, *, nproc: int, ray: bool, lock):
        self.spec, self.nproc, self.ray, self.lock = spec, nproc, ray, lock
        self.failure_code: int | None = None
        """The exit code to report when the run failed with an error no restart can fix."""

    def __enter__(self) -> LocalLaunch:
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def run(self) -> dict | None:
        """Train; the run's summary, or None when it failed (the reason is printed)."""
        from vilscale.orchestration.checkpoint.rundir import SPEC_FILE

        if self.ray:
            from vilscale.orchestration.launch.ray import RayTrainFailed, train_on_ray

            try:
                return train_on_ray(self.spec, lease_token=self.lock.token)
            except RayTrainFailed as failure:
                print(f"vilscale train: {failure}", file=sys.stderr, flush=True)
                self.failure_code = failure.exit_code
                return None
        from vilscale.orchestration.launch.local import train_local

        result = train_local(self.spec, Path(self.spec.run_dir) / SPEC_FILE, self.nproc, lease_token=self.lock.token)
        self.failure_code = result.code if result.summary is None else None
        return result.summary


def prepare_local_launch(job: str, overrides: list[str], *, nproc: int | None, ray: bool,
                         allow_spec_change: bool = False, start_over: bool = False) -> LocalLaunch:
    """Steps 1-3 above; raises LaunchRefused with the reason."""
    from vilscale.orchestration.checkpoint.rundir import RunDirError, RunLock, check_resume_compatible, write_spec
    from vilscale.orchestration.launch.preflight import preflight

    try:
        spec = load_spec(job, overrides)
        if ray:
            from vilscale.orchestration.launch.common import with_absolute_paths

            spec = with_absolute_paths(spec, Path.cwd())
        world_size = spec.launcher.world_size if nproc is None else nproc
        if nproc is None and not ray and spec.launcher.nodes > 1:
            raise SpecError(f"launcher.nodes={spec.launcher.nodes} asks for {world_size} ranks of "
                            f"{spec.launcher.nodes} nodes, and `vilscale train` starts ranks on this machine only; "
                            "give --nproc N (e.g. the GPUs here), or run it on the cluster with `vilscale submit`")
        if world_size < 1:
            raise SpecError(f"--nproc {world_size} must be >= 1")
        changes = preflight(spec, world_size=world_size, local=not ray, allow_spec_change=allow_spec_change)
    except SpecError as error:
        raise LaunchRefused(f"{'' if isinstance(error, RunDirError) else 'invalid job spec: '}{error}") from None
    try:
        lock = RunLock(Path(spec.run_dir), mode=spec.launcher.run_dir_mode).acquire(
            what=f"vilscale train ({'Ray driver' if ray else 'local'})")
    except RunDirError as error:
        raise LaunchRefused(str(error)) from None
    try:
        check_resume_compatible(spec, allow_change=allow_spec_change)  # again, now that nobody else can write
        write_spec(spec)
    except SpecError as error:
        lock.release()
        raise LaunchRefused(str(error)) from None
    if start_over:
        start_from_scratch(Path(spec.run_dir))
    for key, before, after in changes:
        _log(f"resuming with {key} changed: {before!r} -> {after!r} (--allow-spec-change)")
    return LocalLaunch(spec, nproc=world_size, ray=ray, lock=lock)


def start_from_scratch(run_dir: Path) -> None:
    """`--start-over`: move the run dir's checkpoints aside (nothing deleted), saying where."""
    from vilscale.orchestration.checkpoint import discard_checkpoints

    aside = discard_checkpoints(run_dir)
    _log(f"--start-over: moved the checkpoints aside into {aside}; training starts from step 0" if aside else
         "--start-over: the run dir has no checkpoints; training starts from step 0")


def _log(message: str) -> None:
    print(f"[vilscale] {message}", file=sys.stderr, flush=True)
