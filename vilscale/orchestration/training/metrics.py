"""Training metrics: a Prometheus endpoint per rank, a file_sd target file, and metrics.jsonl.

Every rank serves its own registry on ``metrics.host`` (loopback by default, so nothing is reachable
from other interfaces unless the spec says so). Rank 0 writes ``prometheus_targets.json`` listing
every rank's endpoint, in Prometheus' file_sd format, and appends the same figures to
``metrics.jsonl`` every log interval (with ``metrics.tensorboard``, also to ``RUN_DIR/tensorboard``).
Labels are ``run_id`` and ``rank`` only.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from vilscale.files import atomic_write_text

# Dense peak FLOP/s per device for MFU, by a substring of torch.cuda.get_device_name(), per precision.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
}

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def device_peak_flops(device: torch.device, precision: str, configured: float) -> float:
    """Peak FLOP/s of one device: the spec's value, else the table; 0 when unknown (MFU not exported)."""
    if configured:
        return configured
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[precision]
    return 0.0


WILDCARDS = ("0.0.0.0", "::", "")


def advertised_address(bind_host: str) -> str:
    """The address a scraper on another machine reaches a rank at: the bound address, or for a wildcard bind
    the node's own address on the cluster network (a bind address of 0.0.0.0 reaches nothing)."""
    if bind_host not in WILDCARDS:
        return bind_host
    if "ray" in sys.modules:  # inside a Ray worker: the node's address as Ray knows it
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    peer = os.environ.get("MASTER_ADDR")
    if peer:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((peer, 9))  # no packet is sent: this only picks the interface towards the peer
                return probe.getsockname()[0]
            except OSError:
                pass
    return socket.gethostbyname(socket.gethostname())


class TrainingMetrics:
    """The metric families of one rank, its HTTP endpoint, and (rank 0) the jsonl log."""

    def __init__(self, run_dir: Path, *, run_id: str, rank: int, host: str, port: int, serve: bool,
                 advertise_host: str = ""):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.labels = {"run_id": run_id, "rank": str(rank)}
        self.registry = CollectorRegistry()
        names = ("run_id", "rank")

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=self.registry).labels(**self.labels)

        self.samples = Counter("vilscale_train_samples", "Training images consumed", names,
                               registry=self.registry).labels(**self.labels)
        self.steps = Counter("vilscale_train_steps", "Optimizer steps taken", names,
                             registry=self.registry).labels(**self.labels)
        self.nonfinite = Counter("vilscale_nonfinite_steps", "Steps skipped for a non-finite loss", names,
                                 registry=self.registry).labels(**self.labels)
        self.decode_errors = Counter("vilscale_data_decode_errors", "Samples that failed to decode (replaced by the "
                                     "next good sample of their shard)", names,
                                     registry=self.registry).labels(**self.labels)
        self.step_duration = Histogram("vilscale_step_duration_seconds", "Wall time of one optimizer step",
                                       names, buckets=STEP_BUCKETS, registry=self.registry).labels(**self.labels)
        self.data_wait = Histogram("vilscale_data_wait_seconds", "Time spent waiting for the next batch",
                                   names, buckets=WAIT_BUCKETS, registry=self.registry).labels(**self.labels)
        self.checkpoint_duration = Histogram(
            "vilscale_checkpoint_save_duration_seconds", "Wall time of a checkpoint save", names,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600), registry=self.registry).labels(**self.labels)
        self.loss_family = Gauge("vilscale_train_loss", "Training loss of the last step: component=\"total\" drives "
                                 "the step, the others are the task's named losses (e.g. RetinaNet's classification "
                                 "and bbox_regression)", names + ("component",), registry=self.registry)
        self.loss = self.loss_family.labels(**self.labels, component="total")
        self.learning_rate = gauge("vilscale_learning_rate", "Learning rate of the last step")
        self.grad_norm = gauge("vilscale_grad_norm", "Global gradient norm of the last step")
        self.images_per_second = gauge("vilscale_images_per_second", "Training throughput of this rank")
        self.mfu = gauge("vilscale_mfu_ratio", "Model FLOPs utilisation: model FLOPs x throughput / peak")
        self.device_memory = gauge("vilscale_device_memory_bytes", "Peak device memory allocated")
        self.last_checkpoint = gauge("vilscale_last_checkpoint_timestamp_seconds",
                                     "Unix time of the last complete checkpoint")
        self.val_top1 = gauge("vilscale_val_top1_ratio", "Validation top-1 accuracy of the last evaluation")
        self.val_headline = Gauge("vilscale_val_headline_ratio", "The task's headline metric of the last evaluation "
                                  "(val_top1, box_ap, mask_ap)", names + ("metric",), registry=self.registry)
        self.attention_backend = Info("vilscale_attention_backend", "The ViL attention backend in use (requested: "
                                      "the spec's; auto falls back to chunked when the triton kernels fail their "
                                      "check on the device)", names, registry=self.registry).labels(**self.labels)
        self.endpoint = None
        self._server = None
        self._tensorboard = None
        if serve:
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
            self.endpoint = f"{advertise_host or advertised_address(host)}:{self._server.server_port}"

    def publish_targets(self, run_id: str) -> None:
        """Gather every rank's endpoint; rank 0 writes prometheus_targets.json (file_sd)."""
        endpoints = [self.endpoint]
        if dist.is_initialized():
            endpoints = [None] * dist.get_world_size()
            dist.all_gather_object(endpoints, self.endpoint)
        if self.rank != 0 or not any(endpoints):
            return
        groups = [{"targets": [endpoint], "labels": {"job": "vilscale", "vilscale_run": run_id}}
                  for endpoint in endpoints if endpoint]
        atomic_write_text(self.run_dir / "prometheus_targets.json", json.dumps(groups, indent=1))

    def open_tensorboard(self, resumed_step: int) -> None:
        """From now on, rank 0 writes the scalars of every record to RUN_DIR/tensorboard too.

        A run that resumes from the checkpoint of ``resumed_step`` (0: a fresh start) trains the steps after it
        again: their events from an earlier launch are purged (SummaryWriter's ``purge_step``), so TensorBoard
        shows one run, each step as the last launch trained it, as metrics.jsonl's last record of the step says.
        """
        if self.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resumed_step + 1)

    def log(self, record: dict, *, group: str = "train") -> None:
        """Append one record (it has a ``step``) to metrics.jsonl (rank 0 only); with TensorBoard open, write its
        numbers as scalars named ``GROUP/KEY`` ("train/loss", "eval/val_top1", "train/loss_components/NAME")."""
        if self.rank != 0:
            return
        record = {"time": time.time(), **record}
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for tag, value in _scalars(record, group):
                self._tensorboard.add_scalar(tag, value, global_step=record["step"], walltime=record["time"])
            self._tensorboard.flush()  # a record is written every log interval: a killed rank loses none

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _scalars(record: dict, prefix: str):
    """(tag, value) of every finite number in a metrics.jsonl record, nested mappings included; the step and the
    time are the event's own, and NaN (MFU without a known peak, a grad norm DeepSpeed did not compute) plots
    nothing."""
    for key, value in record.items():
        if key in ("step", "time"):
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}/{key}")
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}/{key}", value


class MetricsWindow:
    """Per-step Prometheus updates, and every ``log_every`` steps (and at the last step) an averaged record
    in metrics.jsonl and on the progress bar.

    Args:
        metrics: this rank's metric families.
        world_size: ranks (throughput in the record is for the whole run).
        log_every: steps between records.
        total_steps: the run's last step (always recorded).
        flops_per_image: training FLOPs of one image (forward + backward), for MFU.
        peak_flops: the device's peak FLOP/s (0: MFU not reported).
        device: the training device (CUDA memory is reported).
        progress: rank 0's progress bar or None.
        log: where rank 0 writes one plain line per record when it has no progress bar (a scheduler's log file,
            what `vilscale submit --wait` streams), else None.
    """

    def __init__(self, metrics: TrainingMetrics, *, world_size: int, log_every: int, total_steps: int,
                 flops_per_image: float, peak_flops: float, device: torch.device, progress=None, log=None):
        self.metrics, self.world_size, self.log_every, self.total_steps = metrics, world_size, log_every, total_steps
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.device, self.progress, self.log = device, progress, log
        self.start, self.images, self.loss, self.lr, self.data_wait = time.perf_counter(), 0, float("nan"), 0.0, 0.0
        self.steps, self.waited = 0, 0.0
        self.decode_errors = 0
        self.components: dict[str, float] = {}

    def observe(self, result, *, state, lr: float, images: int, seconds: float, engine, decode_errors: int = 0) -> None:
        """One step; ``decode_errors`` is the data loaders' running total of samples that failed to decode."""
        m = self.metrics
        if decode_errors > self.decode_errors:
            m.decode_errors.inc(decode_errors - self.decode_errors)
            self.decode_errors = decode_errors
        self.images += images
        self.steps += 1
        self.waited += result.data_wait
        self.lr, self.data_wait = lr, result.data_wait
        m.samples.inc(images)
        m.steps.inc()
        m.step_duration.observe(seconds)
        m.data_wait.observe(result.data_wait)
        m.learning_rate.set(lr)
        if result.losses:
            self.loss = torch.stack(result.losses).mean().item()
            m.loss.set(self.loss)
        if len(result.components) > 1:  # a single component is the total itself
            for name, values in result.components.items():
                self.components[name] = torch.stack(values).mean().item()
                m.loss_family.labels(**m.labels, component=name).set(self.components[name])
        if self.progress is not None:
            self.progress.update(1)
        if state.step % self.log_every == 0 or state.step == self.total_steps:
            self.flush(state, engine)

    def flush(self, state, engine) -> dict:
        elapsed = time.perf_counter() - self.start
        throughput = self.images / elapsed if elapsed > 0 else 0.0  # this rank's images/s
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        mfu = self.flops_per_image * throughput / self.peak_flops if self.peak_flops else float("nan")
        memory = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        m = self.metrics
        m.grad_norm.set(grad_norm)
        m.images_per_second.set(throughput)
        if self.peak_flops:
            m.mfu.set(mfu)
        if memory:
            m.device_memory.set(memory)
        record = {"step": state.step, "epoch": state.epoch, "loss": self.loss, "lr": self.lr, "grad_norm": grad_norm,
                  "images_per_second": throughput * self.world_size, "mfu": mfu, "data_wait_s": self.data_wait,
                  "device_memory_bytes": memory, "nonfinite_total": state.nonfinite_total,
                  "data_decode_errors_total": self.decode_errors}
        if self.components:
            record["loss_components"] = dict(self.components)
        m.log(record)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{self.loss:.3f}", img_s=f"{record['images_per_second']:.0f}")
        elif self.log is not None:
            self.log(self._line(state, record, elapsed))
        self.start, self.images, self.steps, self.waited = time.perf_counter(), 0, 0, 0.0
        return record

    def _line(self, state, record: dict, elapsed: float) -> str:
        """``step 40/1000 (4%): loss 2.3026, lr 1.2e-03, 512 img/s, data wait 3%, ETA 1h05m``."""
        left = self.total_steps - state.step
        eta = left * elapsed / self.steps if self.steps and elapsed > 0 else float("nan")
        eta_text = "-" if eta != eta else f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m" if eta >= 3600 \
            else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        wait = self.waited / elapsed if elapsed > 0 else 0.0
        return (f"step {state.step}/{self.total_steps} ({state.step / self.total_steps:.0%}): loss {self.loss:.4f}, "
                f"lr {self.lr:.2e}, {record['images_per_second']:.0f} img/s, data wait {wait:.0%}, ETA {eta_text}")
