"""Configuration of a ViL model: one frozen dataclass per stage and one for the whole network."""

from __future__ import annotations

import dataclasses

from vilscale.kernels import BACKEND_NAMES, WINDOW_MODES

POS_EMBEDS = ("ape", "rpe")
ATTN_BACKENDS = ("auto", *BACKEND_NAMES)
SHIFT_MODES = ("full", "random", "own")


def check_shift_mode(shift_mode: str, window_mode: str) -> None:
    """Raise ValueError unless ``shift_mode`` is valid with ``window_mode``."""
    if shift_mode not in SHIFT_MODES:
        raise ValueError(f"shift_mode={shift_mode!r} is not valid; use one of {SHIFT_MODES}")
    if shift_mode != "full" and window_mode != "chunk":
        raise ValueError(f"shift_mode={shift_mode!r} needs window_mode='chunk': the shift modes choose among the "
                         f"chunks around a query, and window_mode={window_mode!r} has no chunks (the official code "
                         "refuses this combination too); use shift_mode='full' with exact windows")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StageConfig:
    """One stage: patch embedding, global tokens, position information and ``depth`` blocks.

    The official arch string ``l1,h3,d96,n1,s1,g1,p4,f7`` reads ``heads=3, dim=96, depth=1,
    vil_attention=True, num_global=1, patch_size=4, window=7``.
    """

    depth: int
    """Number of pre-norm transformer blocks (``n``)."""
    patch_size: int
    """Kernel and stride of the patch-embedding convolution (``p``)."""
    heads: int
    """Attention heads (``h``); must divide ``dim``."""
    dim: int
    """Channel width of the stage (``d``)."""
    num_global: int
    """Learned global tokens prepended to the local tokens (``g``); 0 is allowed."""
    vil_attention: bool
    """True: ViL attention (windowed + global, ``s1``); False: plain full attention (``s0``)."""
    window: int = 7
    """ViL window ``w`` (``f``): chunk size in ``chunk`` mode, one-sided reach in ``exact`` mode."""

    def __post_init__(self):
        for name in ("depth", "patch_size", "heads", "dim", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"stage {name}={value!r} must be a positive integer")
        if self.num_global < 0:
            raise ValueError(f"stage num_global={self.num_global} must be >= 0")
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} does not divide the stage width dim={self.dim}; "
                             f"pick heads from {[h for h in range(1, self.dim + 1) if self.dim % h == 0][:12]}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ViLConfig:
    """A whole Multi-Scale Vision Longformer."""

    stages: tuple[StageConfig, ...]
    """Three or four stages, each downsampling by its ``patch_size``."""
    img_size: tuple[int, int] = (224, 224)
    """Input (height, width) the position tables are built for; other sizes work by interpolation."""
    in_chans: int = 3
    """Input image channels."""
    num_classes: int = 1000
    """Classes of the linear head; 0 gives no head (features only)."""
    pos_embed: str = "ape"
    """``ape``: absolute 2-D position embedding; ``rpe``: relative position bias in every attention."""
    window_mode: str = "chunk"
    """``chunk`` (the released checkpoints) or ``exact`` (the paper's sliding window)."""
    shift_mode: str = "full"
    """Which chunks a local query of a ViL attention sees (the official ``Long2DSCSelfAttention``
    ``mode``; ``chunk`` windows only): ``full`` its own and all 8 neighbouring chunks (official 0);
    ``random`` in training its own chunk plus ONE neighbouring chunk, drawn uniformly per attention
    layer and forward call from torch's global generator, and ``full`` in evaluation (official > 0,
    the paper's random-shift training); ``own`` its own chunk only, in training and evaluation
    (official -1)."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the last block; rates grow linearly from 0 over all blocks."""
    attn_backend: str = "auto"
    """ViL attention backend: ``auto``, ``reference``, ``chunked`` or ``triton``."""
    backbone: bool = False
    """True: ViL attention in every stage, no final norm and no head; ``forward`` returns the maps."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP relative to the stage width."""
    qkv_bias: bool = True
    """Bias in the query/key/value projection (the official models use one)."""
    ln_eps: float = 1e-6
    """LayerNorm epsilon everywhere (the official code uses 1e-6 in every released model)."""

    def __post_init__(self):
        if not 3 <= len(self.stages) <= 4:
            raise ValueError(f"a ViL has 3 or 4 stages, got {len(self.stages)}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed={self.pos_embed!r} is not valid; use one of {POS_EMBEDS}")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"window_mode={self.window_mode!r} is not valid; use one of {WINDOW_MODES}")
        check_shift_mode(self.shift_mode, self.window_mode)
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r} is not valid; use one of {ATTN_BACKENDS}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes} must be >= 0")
        if self.pos_embed == "ape":
            for index, stage in enumerate(self.stages):
                if stage.dim % 2:
                    raise ValueError(f"stage {index + 1} dim={stage.dim} must be even for pos_embed='ape' "
                                     "(half the channels encode the row, half the column)")
        self.stage_maps()  # validates img_size against patches and windows

    def uses_vil(self, stage_index: int) -> bool:
        return self.backbone or self.stages[stage_index].vil_attention

    def stage_maps(self) -> list[tuple[int, int]]:
        """(height, width) of every stage's token map at ``img_size``; raises ValueError when the
        image is smaller than a patch or a ViL window is larger than its map."""
        height, width = self.img_size
        maps = []
        for index, stage in enumerate(self.stages):
            if height < stage.patch_size or width < stage.patch_size:
                raise ValueError(
                    f"img_size={self.img_size} is too small: stage {index + 1} gets a {height}x{width} input, "
                    f"smaller than its patch_size={stage.patch_size}; use a larger img_size")
            height, width = height // stage.patch_size, width // stage.patch_size
            if self.uses_vil(index) and stage.window > min(height, width):
                raise ValueError(
                    f"window={stage.window} is larger than the {height}x{width} token map of stage {index + 1} at "
                    f"img_size={self.img_size}; use window <= {min(height, width)} or a larger img_size")
            maps.append((height, width))
        return maps
