"""Job specs: YAML loaded strictly into a tree of frozen dataclasses.

Every section is a frozen, keyword-only dataclass; each field's meaning is in the string beneath it.
Unknown keys, wrong types and impossible combinations raise ``SpecError`` naming the key path, the
value and what is valid; the CLI turns that into exit code 2 before anything starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from vilscale.data.config import AugmentConfig, DataConfig
from vilscale.devices import DEVICE_CHOICES
from vilscale.errors import SpecError  # noqa: F401  (its home is vilscale.errors; imported from here too)
from vilscale.kernels import BACKEND_NAMES, WINDOW_MODES
from vilscale.model.config import POS_EMBEDS, SHIFT_MODES
from vilscale.tasks import DETECTORS, TASKS


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    name: str = "vil_small"
    """Variant from `vilscale.model.list_models()`."""
    pos_embed: str = "ape"
    """"ape" (absolute 2D position embedding) or "rpe" (relative position bias)."""
    window_mode: str = "chunk"
    """"chunk" (official checkpoints) or "exact" (the paper's definition)."""
    window: int = 7
    """Attention window w (a local query sees a (2w+1)^2 or 3w x 3w neighbourhood)."""
    img_size: int = 224
    """Training resolution (square); `data.img_size` follows it unless set (and must then agree)."""
    num_classes: int = 1000
    """Classifier width; must match the data's class count."""
    attn_backend: str = "auto"
    """"auto", "reference", "chunked" or "triton"."""
    shift_mode: str = "full"
    """Which chunks a ViL attention query sees in training (window_mode "chunk" only): "full" (its own and
    the 8 neighbouring chunks), "random" (its own and one neighbouring chunk drawn per layer and forward
    call, full attention in evaluation: the official recipe, until `schedule.full_attention_from`) or
    "own" (its own chunk only, in training and evaluation)."""
    drop_path_rate: float = 0.1
    """Stochastic depth at the last block (linear schedule over the blocks)."""
    init_weights: str = ""
    """Weights to start from (fine-tuning): a vilscale export (.safetensors), an official ViL checkpoint
    (.pth), or a run directory (its newest verified checkpoint). Position tables are interpolated to this
    model's img_size and window, and the head is replaced when the class count differs (task=detection:
    they initialise the backbone; the classification head and final norm are dropped)."""
    detector: str = "retinanet"
    """task=detection: "retinanet" (box AP) or "mask_rcnn" (box and mask AP), torchvision's, on the ViL
    backbone with torchvision's FPN. `num_classes` is then the number of object categories (no background)."""
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    """task=detection: anchor base size (pixels) of each of the five FPN levels (RetinaNet adds two scales
    per octave, x 2^(1/3) and x 2^(2/3))."""
    fpn_channels: int = 256
    """task=detection: channels of every FPN level."""
    proposals_per_image: int = 1000
    """task=detection, mask_rcnn: RPN proposals kept per image after NMS (twice as many before it in
    training)."""
    detections_per_image: int = 100
    """task=detection: detections kept per image (COCO's AP counts up to 100)."""
    score_threshold: float = 0.05
    """task=detection: evaluation drops detections scoring below this before NMS (torchvision's and detectron2's
    0.05); 0 keeps every candidate (up to RetinaNet's 1000 per level and `detections_per_image`)."""
    rois_per_image: int = 512
    """task=detection, mask_rcnn: proposals sampled per image to train the box and mask heads (a quarter positive
    at most; detectron2's and torchvision's 512)."""
    head_channels: int = 128
    """task=segmentation: channels of the Semantic FPN's per-level heads (3x3 conv, GroupNorm, ReLU, x2 upsampling
    down to 1/4), whose sum the 1x1 classifier reads; `fpn_channels` is the FPN's width (256 in the recipe)."""

    def __post_init__(self):
        _one_of("model.pos_embed", self.pos_embed, POS_EMBEDS)
        _one_of("model.window_mode", self.window_mode, WINDOW_MODES)
        _one_of("model.attn_backend", self.attn_backend, ("auto", *BACKEND_NAMES))
        _one_of("model.shift_mode", self.shift_mode, SHIFT_MODES)
        if self.shift_mode != "full" and self.window_mode != "chunk":
            raise SpecError(f"model.shift_mode={self.shift_mode!r} needs model.window_mode='chunk' (shifts choose "
                            f"among chunks; window_mode={self.window_mode!r} has none); use shift_mode='full'")
        _positive("model.window", self.window)
        _positive("model.img_size", self.img_size)
        _positive("model.num_classes", self.num_classes)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise SpecError(f"model.drop_path_rate={self.drop_path_rate!r} must be in [0, 1)")
        _one_of("model.detector", self.detector, DETECTORS)
        if len(self.anchor_sizes) != 5 or not all(isinstance(v, int) and v > 0 for v in self.anchor_sizes):
            raise SpecError(f"model.anchor_sizes={list(self.anchor_sizes)!r} must be five positive integers, one "
                            "per FPN level (e.g. [32, 64, 128, 256, 512])")
        if not 0.0 <= self.score_threshold < 1.0:
            raise SpecError(f"model.score_threshold={self.score_threshold!r} must be in [0, 1) (0.05: the recipes')")
        for name in ("fpn_channels", "proposals_per_image", "detections_per_image", "rois_per_image", "head_channels"):
            _positive(f"model.{name}", getattr(self, name))


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    name: str = "adamw"
    """"adamw" (pretraining) or "qhm" (the official 384 fine-tune: quasi-hyperbolic momentum with nu=1,
    i.e. SGD whose buffer is an exponential average of the gradients)."""
    momentum: float = 0.9
    """Momentum of "qhm"."""
    lr: float = 1e-3
    """Peak learning rate at `lr_batch_ref` images per step (scaled linearly to the global batch)."""
    lr_batch_ref: int = 1024
    """Global batch at which `lr` is given; 0 disables linear scaling."""
    weight_decay: float = 0.1
    """Weight decay (decoupled in AdamW), applied to the parameters `weight_decay_rule` decays."""
    weight_decay_rule: str = "official"
    """Which parameters are not decayed: "official" (the official ViL recipe: LayerNorms, position
    embeddings, global tokens, relative-position tables and the head's bias; other biases are decayed) or
    "timm" (additionally every bias and every 1-D parameter)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (e.g. 0.9998); 0 disables it."""

    def __post_init__(self):
        _one_of("optim.name", self.name, ("adamw", "qhm"))
        _one_of("optim.weight_decay_rule", self.weight_decay_rule, ("official", "timm"))
        if not 0 <= self.momentum < 1:
            raise SpecError(f"optim.momentum={self.momentum!r} must be in [0, 1)")
        if not self.lr > 0:
            raise SpecError(f"optim.lr={self.lr!r} must be > 0")
        if self.lr_batch_ref < 0:
            raise SpecError(f"optim.lr_batch_ref={self.lr_batch_ref!r} must be >= 0")
        if self.weight_decay < 0:
            raise SpecError(f"optim.weight_decay={self.weight_decay!r} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SpecError(f"optim.betas={list(self.betas)!r} must be two numbers in [0, 1)")
        if self.clip_grad < 0:
            raise SpecError(f"optim.clip_grad={self.clip_grad!r} must be >= 0 (0 disables clipping)")
        if not 0 <= self.ema_decay < 1:
            raise SpecError(f"optim.ema_decay={self.ema_decay!r} must be in [0, 1) (0 disables EMA)")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    warmup_epochs: float = 5.0
    """Linear warmup from `warmup_lr` to the peak, in epochs (applied per step)."""
    warmup_lr: float = 1e-6
    """Learning rate at step 0."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    decay: str = "cosine"
    """After warmup: "cosine" (to `min_lr` at the last step), "step" (the peak, multiplied by `step_factor` at
    each of `step_at`: detectron2's multi-step schedule of the detection recipes) or "poly" (min_lr + (peak -
    min_lr) x (1 - progress)^`power`: mmsegmentation's schedule of the segmentation recipes)."""
    power: float = 0.9
    """decay="poly": the exponent (the Semantic FPN recipe's 0.9)."""
    step_at: tuple[float, ...] = ()
    """decay="step": fractions of the run's steps where the learning rate drops (1x schedule: 60k and 80k of
    90k iterations = [0.6667, 0.8889])."""
    step_factor: float = 0.1
    """decay="step": factor applied at each of `step_at`."""
    full_attention_from: float = 1.0
    """Fraction of the run's steps after which ViL attention switches from `model.shift_mode` to "full"
    for the rest of training (the official recipe trains with random shifts and switches at 0.75 of the
    epochs); 1.0 never switches."""

    def __post_init__(self):
        if not 0.0 <= self.full_attention_from <= 1.0:
            raise SpecError(f"schedule.full_attention_from={self.full_attention_from!r} must be in [0, 1] "
                            "(a fraction of the run; 1.0 never switches)")
        if self.warmup_epochs < 0:
            raise SpecError(f"schedule.warmup_epochs={self.warmup_epochs!r} must be >= 0")
        if self.warmup_lr < 0 or self.min_lr < 0:
            raise SpecError("schedule.warmup_lr and schedule.min_lr must be >= 0")
        _one_of("schedule.decay", self.decay, ("cosine", "step", "poly"))
        if not self.power > 0:
            raise SpecError(f"schedule.power={self.power!r} must be > 0 (the recipe's 0.9)")
        if not all(0.0 < at < 1.0 for at in self.step_at) or list(self.step_at) != sorted(self.step_at):
            raise SpecError(f"schedule.step_at={list(self.step_at)!r} must be increasing fractions of the run in "
                            "(0, 1)")
        if self.decay == "step" and not self.step_at:
            raise SpecError("schedule.decay='step' needs schedule.step_at, e.g. [0.6667, 0.8889] (the 1x schedule)")
        if not 0.0 < self.step_factor <= 1.0:
            raise SpecError(f"schedule.step_factor={self.step_factor!r} must be in (0, 1]")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    epochs: int = 300
    """Epochs of the schedule (the cosine decay spans them)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total; 0 means epochs x steps per epoch."""
    ckpt_every: int = 1000
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    keep_checkpoints: int = 3
    """Keep the last K complete checkpoints."""
    exit_after_steps: int = 0
    """Save a checkpoint and exit cleanly after this many steps of this launch (schedule unchanged)."""
    seed: int = 0
    """Seed of the model init, the data order and the augmentation."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0-3."""
    precision: str = "bf16"
    """"fp32", "bf16" or "fp16" (fp16 on GPU only)."""
    micro_batch: int = 128
    """Images per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch x grad_accum x world size."""
    global_batch: int = 0
    """If set, grad_accum is derived from it: global_batch / (micro_batch x world size), a whole number."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    compile: bool = False
    """torch.compile the model before wrapping it."""
    log_every: int = 10
    """Write metrics.jsonl and the progress line every this many steps."""
    max_bad_steps: int = 5
    """Non-finite losses in a row before the run restores its last good checkpoint and stops."""
    record_samples: bool = False
    """Append the dataset indices of every step to RUN_DIR/samples/rank{r}.jsonl (audits exactly-once reading)."""
    collective_timeout_s: int = 900
    """Seconds a rank waits in a collective (all-reduce, barrier) for its peers before it gives up with a
    restartable error: a host lost mid-step would otherwise hold the survivors forever. Longer than any step,
    checkpoint save or evaluation of the run."""

    def __post_init__(self):
        _positive("train.epochs", self.epochs)
        for name in ("max_steps", "exit_after_steps", "global_batch"):
            if getattr(self, name) < 0:
                raise SpecError(f"train.{name}={getattr(self, name)!r} must be >= 0 (0 disables it)")
        for name in ("ckpt_every", "keep_checkpoints", "micro_batch", "grad_accum", "log_every",
                     "max_bad_steps", "collective_timeout_s"):
            _positive(f"train.{name}", getattr(self, name))
        if self.zero_stage not in (0, 1, 2, 3):
            raise SpecError(f"train.zero_stage={self.zero_stage!r} is not valid; use 0, 1, 2 or 3")
        _one_of("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        _one_of("train.device", self.device, DEVICE_CHOICES)


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalConfig:
    every_epochs: int = 1
    """Evaluate top-1/top-5 on the validation manifest every this many epochs (and at the end)."""
    batch_size: int = 256
    """Images per rank per evaluation step."""
    use_ema: bool = True
    """Evaluate the EMA weights when EMA is on."""

    def __post_init__(self):
        _positive("eval.every_epochs", self.every_epochs)
        _positive("eval.batch_size", self.batch_size)


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    """Interface each rank's Prometheus endpoint binds to (loopback by default; 0.0.0.0 for clusters)."""
    advertise_host: str = ""
    """Address of this rank's endpoint in prometheus_targets.json; "" = the bound address, or with
    host=0.0.0.0 the node's own address on the cluster network (the one it reaches the rendezvous
    host from; under Ray, the node's Ray address)."""
    port: int = 0
    """Port of rank 0's endpoint (rank r uses port + r); 0 picks any free port per rank."""
    enabled: bool = True
    """Serve Prometheus metrics at all."""
    peak_flops: float = 0.0
    """Peak dense FLOP/s of one device for MFU; 0 looks the device up in a table of known devices."""
    tensorboard: bool = False
    """Rank 0 also writes the scalars of metrics.jsonl (loss and its components, lr, img/s, evaluations, ...) to
    RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`); a resumed run continues the same run there."""

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise SpecError(f"metrics.port={self.port!r} must be in 0..65535 (0 = any free port)")
        if self.peak_flops < 0:
            raise SpecError(f"metrics.peak_flops={self.peak_flops!r} must be >= 0")


# sbatch options that `launcher.slurm.additional` may not set: {option: the key that sets it}, or "" where
# vilscale sets the option itself (the log files, the requeue signal and --requeue that restarts depend on).
SBATCH_OPTIONS_WITH_A_KEY = {
    "partition": "launcher.partition", "account": "launcher.account", "time": "launcher.time_min",
    "nodes": "launcher.nodes", "ntasks-per-node": "launcher.gpus_per_node or launcher.cpu_workers_per_node",
    "gpus-per-node": "launcher.gpus_per_node", "cpus-per-task": "launcher.cpus_per_task", "mem": "launcher.mem_gb",
    "qos": "launcher.slurm.qos", "constraint": "launcher.slurm.constraint", "exclusive": "launcher.slurm.exclusive",
    "reservation": "launcher.slurm.reservation", "exclude": "launcher.slurm.exclude",
    "job-name": "", "output": "", "error": "", "open-mode": "", "signal": "", "requeue": "", "no-requeue": "",
    "array": "",
}
_SBATCH_OPTION = re.compile(r"[a-z][a-z0-9-]*")
# What a value of an sbatch directive may hold: submitit writes `#SBATCH --OPTION=VALUE` lines unquoted, sbatch splits
# them at white space, and a newline ends the directives there (the rest of the value becomes a command of the batch
# script, and every directive after it is dropped). Letters, digits and the punctuation of node lists, constraints,
# mail addresses and times: `gpu[01-04]`, `h100&ib|a100`, `me@lab.org`, `1-00:00:00`, `END,FAIL`.
_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:;@%+=/&|!*^~()\[\]{}<>?-]*")


def check_sbatch_value(path: str, value: str) -> None:
    """SpecError unless ``value`` reads as one sbatch directive value (see ``_SBATCH_VALUE``)."""
    if not _SBATCH_VALUE.fullmatch(value):
        bad = next(c for c in value if not _SBATCH_VALUE.fullmatch(c))
        what = "a newline" if bad in "\n\r" else "a control character" if ord(bad) < 32 or ord(bad) == 127 else \
            "white space" if bad.isspace() else f"{bad!r}"
        raise SpecError(f"{path}={value!r} holds {what}, so it is not one sbatch directive value: in the batch "
                        "script a newline would end the #SBATCH lines there (dropping --requeue, --signal, --time) and "
                        "run the rest as a command, and white space or quotes would split it. Give the value without "
                        "them")


@dataclass(frozen=True, kw_only=True, slots=True)
class SlurmConfig:
    qos: str = ""
    """Quality of service (`sbatch --qos`; "" = the account's default)."""
    constraint: str = ""
    """Node features the job needs (`sbatch --constraint`, e.g. "a100" or "h100&ib"; "" = any node)."""
    exclusive: bool = False
    """Nodes to this job alone (`sbatch --exclusive`): no other job shares them, whatever the job leaves idle."""
    reservation: str = ""
    """Run in this reservation (`sbatch --reservation`; "" = none)."""
    exclude: str = ""
    """Nodes never to run on (`sbatch --exclude`, e.g. "gpu[07-08]"; "" = none)."""
    additional: dict[str, str] = field(default_factory=dict)
    """Other sbatch options, by their long name without dashes: {"mail-type": "END", "mail-user": "me@lab"}; an
    empty value writes the bare flag ({"overcommit": ""}). Options with a key of their own (time, partition,
    qos, ...) and those vilscale sets (output, error, signal, requeue) are refused."""
    max_excluded_nodes: int = 2
    """A node named in two failures in a row (a failing GPU or disk) is taken out of the job: it is requeued with
    the node added to its excluded nodes (`scontrol update ExcNodeList`), at most this many nodes per job; 0 never
    excludes (every restart may land on the same node, until launcher.max_restarts is used up)."""
    signal_lead_s: int = 120
    """Seconds before the time limit at which SLURM sends the preemption notice (USR2): the ranks finish their step,
    save a checkpoint and requeue the job, all within this. Raise it where an evaluation plus a save of the run's
    checkpoint on the cluster's file system can take longer (SLURM never requeues a job that hit its limit)."""

    def __post_init__(self):
        if self.max_excluded_nodes < 0:
            raise SpecError(f"launcher.slurm.max_excluded_nodes={self.max_excluded_nodes!r} must be >= 0 (0: never)")
        if not isinstance(self.signal_lead_s, int) or not 10 <= self.signal_lead_s <= 65535:
            raise SpecError(f"launcher.slurm.signal_lead_s={self.signal_lead_s!r} must be whole seconds in 10..65535 "
                            "(SLURM's limit), enough for one step, an evaluation and a checkpoint save")
        for name in ("qos", "constraint", "reservation", "exclude"):
            check_sbatch_value(f"launcher.slurm.{name}", getattr(self, name))
        for option, value in self.additional.items():
            check_sbatch_value(f"launcher.slurm.additional.{option}", value or "")
        for option in self.additional:
            name = option.replace("_", "-")
            if option.startswith("-"):
                raise SpecError(f"launcher.slurm.additional: {option!r} is not valid; name the sbatch option "
                                f"without the leading dashes, e.g. {option.lstrip('-')!r}")
            if not _SBATCH_OPTION.fullmatch(name):
                raise SpecError(f"launcher.slurm.additional: {option!r} is not an sbatch option name; use the long "
                                "name in lower case, e.g. 'mail-type'")
            if name in SBATCH_OPTIONS_WITH_A_KEY:
                key = SBATCH_OPTIONS_WITH_A_KEY[name]
                raise SpecError(f"launcher.slurm.additional: {option!r} has a key of its own; set {key} instead"
                                if key else f"launcher.slurm.additional: {option!r} is set by vilscale (its log "
                                "files, preemption signal and requeues depend on it); remove it")


@dataclass(frozen=True, kw_only=True, slots=True)
class LauncherConfig:
    backend: str = "local"
    """Default `vilscale submit` backend: "local", "ray" or "slurm"."""
    nodes: int = 1
    """Nodes (SLURM) or, with `workers_per_node`, Ray worker groups."""
    gpus_per_node: int = 0
    """GPUs per node; one task (rank) per GPU. 0 runs `cpu_workers_per_node` CPU ranks per node."""
    cpu_workers_per_node: int = 1
    """Ranks per node when `gpus_per_node` is 0."""
    cpus_per_task: int = 1
    """CPU cores per rank."""
    mem_gb: int = 0
    """Memory per node in GB for SLURM (0: the partition default)."""
    partition: str = ""
    """SLURM partition ("" = the cluster default)."""
    account: str = ""
    """SLURM account ("" = none)."""
    time_min: int = 60
    """SLURM wall-clock limit per allocation, minutes (the job requeues itself at the limit)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Site options of SLURM jobs: qos, constraint, exclusive, reservation, exclude and any other sbatch option."""
    max_restarts: int = 3
    """Restarts after a restartable failure (exit 1: a crashed or silent rank, a lost node), from the latest
    checkpoint: the local launcher relaunches the process group, Ray's driver fits again, SLURM's batch step
    relaunches the tasks within the allocation (counted per job across requeues; SLURM's own requeues at
    the time limit, on preemption or after a node failure do not count)."""
    ray_address: str = "auto"
    """Ray cluster address for `--backend ray` ("auto", "ray://host:10001" or the dashboard URL)."""
    working_dir: str = "."
    """Working directory shipped to the Ray cluster (relative to the spec's current directory)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every rank."""
    min_nodes: int = 0
    """Ray: the fewest nodes a run may go on with after losing some (0: launcher.nodes, never fewer). When fewer
    than launcher.nodes come back within `node_wait_s` but at least this many, the run refits on them (resuming
    through DeepSpeed's universal checkpoint) and keeps its global batch by accumulating more micro-batches (it needs
    train.global_batch); at the next restart it grows back to launcher.nodes if they are there."""
    node_wait_s: float = 300.0
    """Ray: how long a (re)fit waits for launcher.nodes nodes with room for their ranks before it goes on with fewer
    (launcher.min_nodes) or fails."""
    run_dir_mode: str = "0700"
    """Permissions a new run dir is created with (octal): owner-only by default, because the SLURM supervisor and
    `vilscale submit --wait` read pickled task results from it (whoever can write there could run code as you);
    e.g. "0750" lets the group read it. Group or others may never write to it."""

    def __post_init__(self):
        _one_of("launcher.backend", self.backend, ("local", "ray", "slurm"))
        if not 0 <= self.min_nodes <= self.nodes:
            raise SpecError(f"launcher.min_nodes={self.min_nodes!r} must be in 0..launcher.nodes={self.nodes} (0: "
                            "never fewer than launcher.nodes)")
        if not self.node_wait_s > 0:
            raise SpecError(f"launcher.node_wait_s={self.node_wait_s!r} must be > 0 seconds")
        if not re.fullmatch(r"0?[0-7]{3}", self.run_dir_mode) or int(self.run_dir_mode, 8) & 0o022 or \
                not int(self.run_dir_mode, 8) & 0o700 == 0o700:
            raise SpecError(f"launcher.run_dir_mode={self.run_dir_mode!r} must be an octal mode that gives its owner "
                            "rwx and nobody else write, e.g. '0700' (the default) or '0750'")
        for name in ("partition", "account"):
            check_sbatch_value(f"launcher.{name}", getattr(self, name))
        if str(self.env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "")).strip() == "0":
            raise SpecError("launcher.env.TORCH_NCCL_ASYNC_ERROR_HANDLING='0' turns NCCL's error handling off: a lost "
                            "peer would hang every other rank forever instead of ending the collective so the run can "
                            "restart. Remove it (vilscale sets 1), or set 1 or 3")
        for name in ("nodes", "cpu_workers_per_node", "cpus_per_task", "time_min"):
            _positive(f"launcher.{name}", getattr(self, name))
        for name in ("gpus_per_node", "mem_gb", "max_restarts"):
            if getattr(self, name) < 0:
                raise SpecError(f"launcher.{name}={getattr(self, name)!r} must be >= 0")

    @property
    def fewest_nodes(self) -> int:
        """launcher.min_nodes, or launcher.nodes when it is 0."""
        return self.min_nodes or self.nodes

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_workers_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    run_dir: str
    """Directory of this run: resolved spec, checkpoints/, metrics.jsonl, prometheus_targets.json, logs."""
    task: str = "classification"
    """"classification" (FFCV shards, top-1), "detection" (COCO-format data, `model.detector`, box/mask AP) or
    "segmentation" (ADE20K-format data, Semantic FPN, mIoU)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The ViL variant and how to build it."""
    data: DataConfig
    """Shards (manifests) and loading."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Batch-level training augmentation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its extras."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule: linear warmup then cosine, per step."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Engine, precision, batch and checkpoint cadence."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation cadence."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Prometheus endpoints and MFU."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Where and on how many ranks the job runs."""

    def __post_init__(self):
        if not self.run_dir:
            raise SpecError("run_dir is empty; give the directory this run writes to")
        self.check_fewer_nodes()
        _one_of("task", self.task, TASKS)
        if self.augment.loss == "semantic_softmax" and self.task != "classification":
            raise SpecError(f"augment.loss='semantic_softmax' is a classification loss; task={self.task!r} trains its "
                            "own losses (remove augment.loss)")
        if self.augment.loss == "semantic_softmax" and not self.data.hierarchy:
            raise SpecError("augment.loss='semantic_softmax' needs data.hierarchy: a file of CHILD PARENT class names "
                            "(the class tree whose levels get one softmax each)")
        if self.data.hierarchy and self.augment.loss != "semantic_softmax":
            raise SpecError(f"data.hierarchy={self.data.hierarchy!r} is read only by augment.loss='semantic_softmax'; "
                            "set that loss or remove data.hierarchy")
        if self.task == "classification" and self.data.num_workers < 1:
            raise SpecError("data.num_workers=0: classification decodes in FFCV's threads, at least 1 per rank; use "
                            "data.num_workers=1 or more (detection and segmentation take 0: no worker processes)")
        if self.task != "classification" and self.train.precision == "fp16":
            raise SpecError(f"train.precision='fp16' is not supported for task={self.task!r}: its weights stay fp32 "
                            "and it computes in bf16 autocast islands, which need no loss scaling; fp16 would. Use "
                            "train.precision=bf16 (any GPU from Ampere on) or fp32")
        if self.data.img_size == 0:  # not set: the loader produces what the model is built for
            object.__setattr__(self, "data", dataclasses.replace(self.data, img_size=self.model.img_size))
        elif self.data.img_size != self.model.img_size:
            raise SpecError(
                f"model.img_size={self.model.img_size} but data.img_size={self.data.img_size}: the loader would feed "
                f"{self.data.img_size}-pixel images to a model built for {self.model.img_size}. Set both (e.g. "
                f"--set model.img_size={self.data.img_size} --set data.img_size={self.data.img_size}), or leave "
                "data.img_size out and it follows model.img_size")

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per step on `world_size` ranks (derived from train.global_batch when set)."""
        if not self.train.global_batch:
            return self.train.grad_accum
        return self.train.global_batch // (self.train.micro_batch * world_size)

    def global_batch(self, world_size: int) -> int:
        return self.train.micro_batch * self.grad_accum(world_size) * world_size

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def digest(self) -> str:
        """Hash of everything that changes what is trained (not where it runs or how often it saves)."""
        trained = {key: value for key, value in flatten(self.to_dict()).items() if key_kind(key) != "execution"}
        return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:16]

    def check_fewer_nodes(self) -> None:
        """SpecError unless every node count from launcher.min_nodes to launcher.nodes keeps the global batch."""
        launcher = self.launcher
        if launcher.fewest_nodes == launcher.nodes:
            return
        if not self.train.global_batch:
            raise SpecError(f"launcher.min_nodes={launcher.min_nodes} lets the run go on with fewer nodes, which must "
                            "keep the global batch: set train.global_batch (e.g. "
                            f"{self.train.micro_batch * self.train.grad_accum * launcher.world_size}, this job's now)")
        for nodes in range(launcher.fewest_nodes, launcher.nodes + 1):
            per_step = self.train.micro_batch * nodes * launcher.ranks_per_node
            if self.train.global_batch % per_step:
                raise SpecError(f"train.global_batch={self.train.global_batch} cannot be kept on {nodes} node(s): it "
                                f"is not a multiple of train.micro_batch x {nodes * launcher.ranks_per_node} ranks = "
                                f"{per_step}; choose launcher.min_nodes or a global batch that every node count "
                                "from launcher.min_nodes to launcher.nodes divides")

    def check_world(self, world_size: int) -> None:
        """Combinations that only the world size reveals."""
        if self.train.precision == "fp16" and self.train.device == "cpu":
            raise SpecError("train.precision='fp16' is not supported on CPU; use 'bf16' or 'fp32'")
        if world_size < 1:
            raise SpecError(f"world size {world_size} must be >= 1")
        per_step = self.train.micro_batch * world_size
        if self.train.global_batch and self.train.global_batch % per_step:
            raise SpecError(
                f"train.global_batch={self.train.global_batch} is not divisible by train.micro_batch="
                f"{self.train.micro_batch} x world size {world_size} = {per_step}; choose a global batch that "
                f"is a multiple of {per_step} or change micro_batch")


def _one_of(path: str, value, valid) -> None:
    if value not in valid:
        raise SpecError(f"{path}={value!r} is not valid; use one of {list(valid)}")


def _positive(path: str, value) -> None:
    if not (isinstance(value, int | float) and value > 0):
        raise SpecError(f"{path}={value!r} must be a positive number")


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


# Keys (or sections) that say where and how a run executes, never what it trains: a resumed run may
# change them freely.
EXECUTION_KEYS = (
    "run_dir", "launcher", "metrics", "eval.batch_size", "eval.every_epochs",
    "train.ckpt_every", "train.keep_checkpoints", "train.exit_after_steps", "train.log_every",
    "train.record_samples", "train.max_bad_steps", "train.collective_timeout_s", "train.device",
    "train.activation_checkpointing",
    "train.compile", "model.attn_backend", "model.score_threshold",
    "data.num_workers", "data.batches_ahead", "data.os_cache", "data.verify_checksums", "data.decode_error_limit",
    "data.loader_workers",  # the old name of data.num_workers in detection/segmentation: older spec.yaml files hold it
)
# Keys a resumed run may change only when the user says so (`--allow-spec-change`): the checkpoint still
# loads, and the change is a deliberate decision about the rest of the run (train longer, moved shards,
# a lower learning rate from here on). Everything else (the model, batch layout, precision, ZeRO stage,
# optimizer, seed, data order) is fixed for the life of a run dir.
ADJUSTABLE_KEYS = (
    "train.max_steps", "train.epochs", "data.train_manifest", "data.val_manifest", "model.init_weights",
    "data.train_annotations", "data.train_images", "data.val_annotations", "data.val_images",
    "data.train_masks", "data.val_masks",
    "model.drop_path_rate", "optim.lr", "optim.lr_batch_ref", "optim.weight_decay", "optim.clip_grad",
    "optim.ema_decay", "schedule", "augment", "eval.use_ema", "data.crop_decode",
)


# Keys whose value is a mapping of the user's names (not a section): `flatten` keeps them whole.
MAPPING_KEYS = ("launcher.env", "launcher.slurm.additional")


def flatten(plain: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"max_steps": 8}} -> {"train.max_steps": 8} (lists and mappings of values kept whole)."""
    out = {}
    for key, value in plain.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in MAPPING_KEYS:
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def key_kind(path: str) -> str:
    """"execution", "adjustable" or "fixed" (see EXECUTION_KEYS and ADJUSTABLE_KEYS)."""
    def listed(keys):
        return any(path == key or path.startswith(key + ".") for key in keys)

    return "execution" if listed(EXECUTION_KEYS) else "adjustable" if listed(ADJUSTABLE_KEYS) else "fixed"


def default_values() -> dict[str, Any]:
    """{flattened key: default} for every key that has a default, as this version of vilscale fills it in."""
    return _field_defaults(JobSpec, "")


def _field_defaults(cls, prefix: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif dataclasses.is_dataclass(hints[f.name]):  # a section without a default of its own (data)
            out.update(_field_defaults(hints[f.name], f"{path}."))
            continue
        else:  # required: no default to compare with
            continue
        plain = _to_plain(value)
        if isinstance(plain, dict) and path not in MAPPING_KEYS:
            out.update(flatten(plain, f"{path}."))
        else:
            out[path] = plain
    return out


def spec_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose value differs, execution keys left out. A key that ``old``
    lacks (a spec.yaml written by a vilscale without that key) has its default there."""
    before, after = flatten(old), flatten(new)
    before = {**{key: value for key, value in default_values().items() if key in after}, **before}
    return [(key, before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key) and key_kind(key) != "execution"]
