"""The named ViL variants and ``create_model``.

Paper variants (arXiv 2103.15358, Table 1; official arch strings in microsoft/vision-longformer):
stage = (depth n, patch p, heads h, width d); global tokens 1,1,1,0; ViL attention in stages 1-2
(``s1``), full attention in stages 3-4 (``s0``); window 7 at 224x224.

``vil_nano`` is a small member of the family for CPU tests and the quickstart (32x32 digits):
three stages (1,4,2,32) (1,2,2,64) (2,2,4,128), global tokens 1,1,0, ViL attention in stages 1-2,
window 2 and img_size 32 by default: maps 8x8 -> 4x4 -> 2x2, about 0.46 M parameters. Any window
that fits its ViL maps works (at 32x32: window <= 4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vilscale.model.config import StageConfig, ViLConfig
from vilscale.model.vil import VisionLongformer

_GLOBALS_4 = (1, 1, 1, 0)
_VIL_4 = (True, True, False, False)


def _stages(shapes, num_global=_GLOBALS_4, vil=_VIL_4, window=7) -> tuple[StageConfig, ...]:
    return tuple(StageConfig(depth=n, patch_size=p, heads=h, dim=d, num_global=g, vil_attention=s, window=window)
                 for (n, p, h, d), g, s in zip(shapes, num_global, vil))


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    stages: tuple[StageConfig, ...]
    img_size: int = 224
    window: int = 7
    params_m: float | None = None
    """Parameter count reported by the paper and the official README (millions), 1000 classes, 224x224."""


VARIANTS: dict[str, Variant] = {
    "vil_nano": Variant(_stages([(1, 4, 2, 32), (1, 2, 2, 64), (1, 2, 4, 128)], num_global=(1, 1, 0),
                                vil=(True, True, False), window=2), img_size=32, window=2),
    "vil_tiny": Variant(_stages([(1, 4, 1, 48), (1, 2, 3, 96), (9, 2, 3, 192), (1, 2, 6, 384)]),
                        params_m=6.7),
    "vil_small": Variant(_stages([(1, 4, 3, 96), (2, 2, 3, 192), (8, 2, 6, 384), (1, 2, 12, 768)]),
                         params_m=24.6),
    "vil_medium_deep": Variant(_stages([(1, 4, 3, 96), (4, 2, 3, 192), (16, 2, 6, 384), (1, 2, 12, 768)]),
                               params_m=39.7),
    "vil_medium_wide": Variant(_stages([(1, 4, 3, 192), (2, 2, 6, 384), (8, 2, 8, 512), (1, 2, 12, 768)]),
                               params_m=39.8),
    "vil_base_deep": Variant(_stages([(1, 4, 3, 96), (8, 2, 3, 192), (24, 2, 6, 384), (1, 2, 12, 768)]),
                             params_m=55.7),
    "vil_base_wide": Variant(_stages([(1, 4, 3, 192), (2, 2, 6, 384), (8, 2, 12, 768), (1, 2, 16, 1024)]),
                             params_m=79.0),
}

# create_model overrides that set one value per stage, and the StageConfig field each one sets.
_PER_STAGE = {"depths": "depth", "patch_sizes": "patch_size", "heads": "heads", "dims": "dim",
              "num_global": "num_global", "vil_stages": "vil_attention"}
_CONFIG_OVERRIDES = ("in_chans", "mlp_ratio", "qkv_bias", "ln_eps")


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(VARIANTS)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return VARIANTS[name]


def build_config(name: str, *, pos_embed: str = "ape", window_mode: str = "chunk", shift_mode: str = "full",
                 window: int | Sequence[int] | None = None, img_size: int | Sequence[int] | None = None,
                 num_classes: int = 1000, attn_backend: str = "auto", drop_path_rate: float = 0.1,
                 backbone: bool = False, **overrides) -> ViLConfig:
    """The ``ViLConfig`` that ``create_model`` builds (same arguments)."""
    variant = get_variant(name)
    unknown = set(overrides) - set(_PER_STAGE) - set(_CONFIG_OVERRIDES)
    if unknown:
        raise ValueError(f"unknown create_model argument(s) {sorted(unknown)}; valid overrides: "
                         f"{sorted(set(_PER_STAGE) | set(_CONFIG_OVERRIDES))}")
    stages = list(variant.stages)
    n_stages = len(stages)

    def per_stage(key, value):
        values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,) * n_stages
        if len(values) != n_stages:
            raise ValueError(f"{key}={value!r} needs one value per stage ({n_stages} stages in {name})")
        return values

    window = variant.window if window is None else window
    for key, value in [("window", window)] + [(k, overrides.pop(k)) for k in list(overrides) if k in _PER_STAGE]:
        field = _PER_STAGE.get(key, key)
        stages = [dataclasses.replace(stage, **{field: item}) for stage, item in zip(stages, per_stage(key, value))]
    img_size = variant.img_size if img_size is None else img_size
    img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(img_hw) != 2:
        raise ValueError(f"img_size={img_size!r} must be an int or (height, width)")
    return ViLConfig(stages=tuple(stages), img_size=img_hw, num_classes=num_classes, pos_embed=pos_embed,
                     window_mode=window_mode, shift_mode=shift_mode, drop_path_rate=drop_path_rate,
                     attn_backend=attn_backend, backbone=backbone, **overrides)


def create_model(name: str, *, pos_embed: str = "ape", window_mode: str = "chunk", shift_mode: str = "full",
                 window: int | Sequence[int] | None = None, img_size: int | Sequence[int] | None = None,
                 num_classes: int = 1000, attn_backend: str = "auto", drop_path_rate: float = 0.1,
                 backbone: bool = False, **overrides) -> VisionLongformer:
    """Build a ViL variant.

    Args:
        name: one of ``list_models()``.
        pos_embed: ``ape`` (absolute, default) or ``rpe`` (relative position biases).
        window_mode: ``chunk`` (default, the released checkpoints) or ``exact`` (the paper's window).
        shift_mode: which chunks a ViL attention query sees (chunk windows only): ``full`` (default) its
            own and the 8 neighbouring chunks; ``random`` in training its own plus one random neighbouring
            chunk per layer and call, full in evaluation (the official random-shift training); ``own``
            its own chunk only. Switch later with ``model.set_shift_mode``.
        window: ViL window, one int or one per stage; ``None`` = the variant's default (7; 2 for vil_nano).
        img_size: int or (height, width) the position tables are built for; ``None`` = the variant's
            default (224; 32 for vil_nano). Other input sizes work at run time.
        num_classes: classes of the head (0: no head).
        attn_backend: ``auto``, ``reference``, ``chunked`` or ``triton``.
        drop_path_rate: stochastic depth of the last block (linear from 0 over all blocks).
        backbone: ViL attention in every stage, no norm/head; ``forward`` returns per-stage maps.
        **overrides: ``in_chans``, ``mlp_ratio``, ``qkv_bias``, ``ln_eps``, or one value per stage:
            ``depths``, ``patch_sizes``, ``heads``, ``dims``, ``num_global``, ``vil_stages``.
    """
    return VisionLongformer(build_config(
        name, pos_embed=pos_embed, window_mode=window_mode, shift_mode=shift_mode, window=window, img_size=img_size,
        num_classes=num_classes, attn_backend=attn_backend, drop_path_rate=drop_path_rate, backbone=backbone,
        **overrides))
