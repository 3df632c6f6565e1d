"""What a run keeps on (shared) storage: checkpoints that are never half-written (`store`), each
rank's RNG state (`rank_state`), consolidated fp32 weights for export and fine-tuning
(`consolidate`), and the run directory itself: its lock, spec and id (`rundir`)."""

from vilscale.orchestration.checkpoint.store import (
    EMA_FILE,
    LATEST,
    MANIFEST,
    Checkpointer,
    CheckpointError,
    NoUsableCheckpoint,
    discard_checkpoints,
    tag_for,
)

__all__ = ["EMA_FILE", "LATEST", "MANIFEST", "CheckpointError", "Checkpointer", "NoUsableCheckpoint",
           "discard_checkpoints", "tag_for"]
