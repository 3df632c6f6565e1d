"""What differs between tasks, one module each behind one small protocol.

The training loop, the DeepSpeed engine, ZeRO, precision, checkpoints and exact resume, the EMA, the
run-dir rules, restart policy, Prometheus metrics and the launchers are shared and know nothing about
images, labels or boxes. A task supplies, for a job spec:

- ``create_model()``: the bare ``nn.Module`` (its training forward, through ``losses``, gives named losses),
  ``init_target(model)``: the ViL module that ``model.init_weights`` loads into, and ``init_note``: what the
  initial weights' report says of the head ("" to keep the adapter's own words);
- ``train_loader(ctx)`` / ``val_loader(ctx)``: iterables with ``set_epoch``, ``state_dict`` and
  ``load_state_dict`` (exact resume), disjoint across ranks, and a ``decode_errors`` count;
- ``engine_precision``: what DeepSpeed's own precision is (classification: ``train.precision``, DeepSpeed casts
  the model; detection and segmentation: "fp32", their autocast islands compute in ``train.precision``, see
  ``vilscale.tasks.precision``), and ``place(model, device, precision)``: the model ready to evaluate in a precision;
- ``setup(ctx)``, then ``losses(engine, batch, micro_step=...)``: ``({name: fp32 loss}, indices)``
  for one micro-batch; the loop backpropagates their sum and logs each;
- ``evaluate(model, loader, ctx, out_dir=...)``: a dict of metrics, the same on every rank, holding
  the task's ``headline`` (``val_top1``, ``box_ap``, ``mask_ap``, ``miou``), and ``report(result)``: the lines the
  trainer and `vilscale eval` print;
- ``check(world_size)``: its pre-flight checks (raises ValueError with one line), run before any rank.
- ``data_sizes()`` and ``micro_batches_per_epoch(train_samples, world_size)``: the sizes `vilscale plan`
  computes steps, samples per rank and time from.
"""

from __future__ import annotations

TASKS = ("classification", "detection", "segmentation")
DETECTORS = ("retinanet", "mask_rcnn")


def make_task(spec):
    """The task object of ``spec.task``."""
    if spec.task == "classification":
        from vilscale.tasks.classification import ClassificationTask

        return ClassificationTask(spec)
    if spec.task == "detection":
        from vilscale.tasks.detection import DetectionTask

        return DetectionTask(spec)
    if spec.task == "segmentation":
        from vilscale.tasks.segmentation import SegmentationTask

        return SegmentationTask(spec)
    raise ValueError(f"task={spec.task!r} is not valid; use one of {list(TASKS)}")


def decode_workers(task, ctx) -> int:
    """``data.num_workers`` of ``task``'s spec, clamped to the CPU cores this rank may use (worked out once per task
    object; rank 0 says so in one line when it clamps)."""
    if getattr(task, "_decode_workers", None) is None:
        import sys

        from vilscale.devices import clamp_workers

        log = (lambda line: print(f"[vilscale] {line}", file=sys.stderr, flush=True)) if ctx.rank == 0 else None
        task._decode_workers = clamp_workers(task.spec.data.num_workers, key="data.num_workers", log=log)
    return task._decode_workers


__all__ = ["DETECTORS", "TASKS", "decode_workers", "make_task"]
