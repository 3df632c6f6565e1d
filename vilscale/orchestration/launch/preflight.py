"""Everything that can be checked before a rank starts, checked in the launching process.

A mistake found here costs a second, not a DeepSpeed start-up per rank and a restart loop: the model
name and shape, the shard manifests (present, readable, the class list of training and validation
the same, ``model.num_classes`` equal to it, the semantic softmax's class tree over it), enough samples for
every rank's batches, the initial weights (present and fitting the model), the run dir (usable, not owned
by a live run, its spec not changed in what it trains) and, for local runs, the device. Every failure is a
`SpecError` (exit code 2, one line naming the key, the value and the fix), and nothing has been written anywhere.

The Ray and SLURM launchers run the same checks on the submitting machine, which therefore must see
the shards and the run dir at the same paths as the nodes (shared storage).
"""

from __future__ import annotations

from pathlib import Path

from vilscale.orchestration.config import JobSpec, SpecError


def preflight(spec: JobSpec, *, world_size: int, local: bool, allow_spec_change: bool = False,
              log=None) -> list[tuple[str, object, object]]:
    """Raise SpecError for the first thing that would make this launch fail; returns the spec changes
    accepted with ``allow_spec_change`` (for the launcher to report)."""
    spec.check_world(world_size)
    _check_run_dir(spec)
    changes = _check_resume(spec, allow_spec_change)
    _check_model(spec)
    if spec.task == "classification":
        _check_data(spec, world_size)
    else:
        _check_task(spec, world_size)
    if spec.model.init_weights and not (Path(spec.run_dir) / "checkpoints" / "latest").is_file():
        _check_initial_weights(spec, log=log)  # a resumed run starts from its checkpoint, never from these
    if spec.optim.ema_decay and spec.train.zero_stage == 3:
        raise SpecError("optim.ema_decay needs full parameters on every rank; use train.zero_stage <= 2 with EMA")
    if local:
        _check_local_device(spec)
    return changes


def _check_run_dir(spec: JobSpec) -> None:
    from vilscale.orchestration.checkpoint.rundir import RunDirError, check_usable, lock_holder

    run_dir = Path(spec.run_dir)
    check_usable(run_dir)
    holder = lock_holder(run_dir) if run_dir.is_dir() else None
    if holder:
        raise RunDirError(f"run dir {run_dir} is in use by another run ({holder}); wait for it to end (or stop it), "
                          "or give this launch another run_dir")


def _check_resume(spec: JobSpec, allow_spec_change: bool):
    from vilscale.orchestration.checkpoint.rundir import check_resume_compatible

    return check_resume_compatible(spec, allow_change=allow_spec_change)


def _check_model(spec: JobSpec) -> None:
    from vilscale.model import build_config, list_models

    cfg = spec.model
    if cfg.name not in list_models():
        raise SpecError(f"model.name={cfg.name!r} is not a vilscale model; valid names: {', '.join(list_models())}")
    try:
        build_config(cfg.name, pos_embed=cfg.pos_embed, window_mode=cfg.window_mode, window=cfg.window,
                     img_size=cfg.img_size, num_classes=cfg.num_classes, attn_backend=cfg.attn_backend,
                     drop_path_rate=cfg.drop_path_rate)
    except ValueError as error:
        raise SpecError(f"model ({cfg.name} at img_size={cfg.img_size}, window={cfg.window}): {error}") from None


def _check_data(spec: JobSpec, world_size: int) -> None:
    from vilscale.data.manifest import DataError, load_manifest
    from vilscale.data.sharding import steps_per_epoch

    data = spec.data
    if not data.train_manifest:
        raise SpecError("data.train_manifest is empty; point it at the manifest.json that `vilscale prepare` wrote")

    def read(key: str, path: str):
        try:
            return load_manifest(path)
        except FileNotFoundError:
            raise SpecError(f"data.{key}={path!r} does not exist (as seen from this machine: the shards must be on "
                            "storage every node sees); write it with `vilscale prepare`") from None
        except DataError as error:
            raise SpecError(f"data.{key}={path!r}: {error}") from None

    train = read("train_manifest", data.train_manifest)
    if train.num_classes != spec.model.num_classes:
        raise SpecError(f"model.num_classes={spec.model.num_classes} but {data.train_manifest} has {train.num_classes} "
                        f"classes; set model.num_classes={train.num_classes}")
    if spec.augment.loss == "semantic_softmax":
        from vilscale.tasks.hierarchy import ClassHierarchy, HierarchyError

        try:
            ClassHierarchy.read(data.hierarchy, train.classes)
        except HierarchyError as error:
            raise SpecError(f"data.hierarchy: {error}") from None
    per_step = spec.train.micro_batch * spec.grad_accum(world_size)
    try:
        batches = steps_per_epoch(train.num_samples, world_size, spec.train.micro_batch, train=True,
                                  drop_last=data.drop_last)
    except ValueError as error:
        raise SpecError(f"train.micro_batch={spec.train.micro_batch} on {world_size} rank(s): {error}") from None
    if batches // spec.grad_accum(world_size) < 1:
        raise SpecError(f"{train.num_samples} training samples cannot fill one step of {per_step} samples (micro_batch "
                        f"{spec.train.micro_batch} x grad_accum {spec.grad_accum(world_size)}) on each of {world_size} "
                        "rank(s); lower train.micro_batch or train.grad_accum, or use fewer ranks")
    if data.val_manifest:
        val = read("val_manifest", data.val_manifest)
        if val.classes != train.classes:
            raise SpecError(_class_mismatch(data.train_manifest, train.classes, data.val_manifest, val.classes))


def _check_task(spec: JobSpec, world_size: int) -> None:
    """The task's own checks (annotation files, categories, enough data for a step)."""
    from vilscale.tasks import make_task

    try:
        make_task(spec).check(world_size)
    except ValueError as error:
        raise SpecError(str(error)) from None


def _class_mismatch(train_path, train_classes, val_path, val_classes) -> str:
    if set(train_classes) == set(val_classes):
        first = next(i for i, (a, b) in enumerate(zip(train_classes, val_classes)) if a != b)
        what = (f"the same {len(train_classes)} classes in another order (index {first}: {train_classes[first]!r} "
                f"in training, {val_classes[first]!r} in validation)")
    else:
        only_val = sorted(set(val_classes) - set(train_classes))[:3]
        only_train = sorted(set(train_classes) - set(val_classes))[:3]
        what = (f"different classes ({len(train_classes)} vs {len(val_classes)}; only in validation: {only_val}, only "
                f"in training: {only_train})")
    return (f"data.val_manifest={str(val_path)!r} and data.train_manifest={str(train_path)!r} have {what}, so labels "
            "would not match and accuracy would be wrong; write the validation shards with the training class list: "
            f"`vilscale prepare imagefolder VAL_DIR OUT --classes {train_path}`")


def _check_initial_weights(spec: JobSpec, *, log=None) -> None:
    """Build the model on the CPU and load the weights into it: exactly what every rank will do."""
    from vilscale.orchestration.training.engine import build_model

    build_model(spec, log=log)


def _check_local_device(spec: JobSpec) -> None:
    from vilscale.devices import resolve_device

    try:
        device = resolve_device(spec.train.device)
    except ValueError as error:
        raise SpecError(f"train.device={spec.train.device!r}: {error}") from None
    if device.type == "cpu" and spec.train.precision == "fp16":
        raise SpecError("train.precision='fp16' needs a GPU and this machine has none; use 'bf16' or 'fp32'")
