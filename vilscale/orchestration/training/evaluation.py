"""When and on which weights the task's evaluation runs during training (the metrics are the task's own)."""

from __future__ import annotations

import contextlib
from pathlib import Path


class Evaluator:
    """Evaluation at the end of every ``eval.every_epochs`` epochs and at the end of the run, on the EMA
    weights when the run keeps an EMA and ``eval.use_ema`` (the live weights are restored bit for bit).

    Args:
        spec: the job spec.
        ctx: this rank's context.
        engine: the DeepSpeed engine (its module is evaluated in the training precision).
        ema: the run's EMA or None.
        metrics: this rank's metric families.
        task: the task (``vilscale.tasks``): its validation loader, evaluation and headline.
        log: rank 0's logger.
    """

    def __init__(self, spec, ctx, engine, ema, metrics, task, *, log):
        self.spec, self.ctx, self.engine, self.ema, self.metrics, self.log = spec, ctx, engine, ema, metrics, log
        self.task = task
        # Built once: each loader's decode pipeline compiles once per process, not per evaluation.
        self.loader = task.val_loader(ctx)

    def at_epoch_end(self, state, *, last_step: int) -> None:
        if state.epoch % self.spec.eval.every_epochs == 0 or state.step >= last_step:
            self.evaluate(state)

    def at_run_end(self, state) -> None:
        if state.last_eval.get("step") != state.step:
            self.evaluate(state)

    def evaluate(self, state) -> dict:
        if self.loader is None:
            return {}
        module = self.engine.module
        weights = self.ema.applied(module) if self.ema is not None and self.spec.eval.use_ema else \
            contextlib.nullcontext(module)
        out_dir = Path(self.spec.run_dir) / "eval"
        with weights:
            result = self.task.evaluate(module, self.loader, self.ctx, out_dir=out_dir)
        headline = self.task.headline
        if headline == "val_top1":
            self.metrics.val_top1.set(result["val_top1"])
        self.metrics.val_headline.labels(**self.metrics.labels, metric=headline).set(result[headline])
        result["step"] = state.step
        result["weights"] = "ema" if self.ema is not None and self.spec.eval.use_ema else "live"
        result["shift_mode"] = module.shift_mode
        self.metrics.log({"epoch": state.epoch, **result}, group="eval")
        self.log(f"epoch {state.epoch}: {self.task.log_line(result)} ({result['weights']} weights)")
        state.last_eval = result
        return result
