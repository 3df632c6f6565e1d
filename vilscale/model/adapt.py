"""Fit weights trained at one resolution, window or class count to a model built for another.

One implementation serves every source of weights (a vilscale export, a run's checkpoint, an
official checkpoint after ``vilscale.model.official`` has translated its names):

- APE row and column embeddings are interpolated linearly to the model's token maps;
- relative-position tables are resized bilinearly over their 2-D grid of offsets: a ViL table to the
  model's ``(4w-1)^2`` window, a full-attention table to its ``(2H-1)(2W-1)`` map (the official
  fine-tuning loader does the same);
- the classifier: kept when its shape fits; on a class-count change ``head="replace"`` keeps the model's
  freshly initialised head (fine-tuning 21K -> 1K), ``head="truncate"`` keeps the first rows, and a
  ``class_map`` picks the rows of the source head for each new class.

Anything else that does not fit (another variant, another ``pos_embed``) is a ValueError naming the
weight and both shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from vilscale.model.attention import ViLAttention
from vilscale.model.position import resize_1d, resize_table_2d
from vilscale.model.vil import VisionLongformer

HEAD_POLICIES = ("replace", "truncate")


@dataclass
class Adaptation:
    """What ``adapt_state_dict`` did, for the one-line report a fine-tune prints."""

    interpolated: list[str] = field(default_factory=list)
    """Position tables resized (name: old shape -> new shape)."""
    head: str = "kept"
    """``kept``, ``replaced (C1 -> C2 classes)``, ``truncated (...)``, ``remapped (...)`` or ``none``."""
    kept: int = 0
    """Weights loaded unchanged."""
    source: str = ""
    """Where the weights came from (set by the caller that read them)."""

    def summary(self) -> str:
        tables = f"{len(self.interpolated)} position table(s) interpolated" if self.interpolated else \
            "no position table interpolated"
        detail = f" ({', '.join(self.interpolated[:3])}{', ...' if len(self.interpolated) > 3 else ''})" \
            if self.interpolated else ""
        origin = f"from {self.source}: " if self.source else ""
        return f"{origin}{self.kept} weights kept, {tables}{detail}, head {self.head}"


def square_side(entries: int, key: str) -> int:
    side = math.isqrt(entries)
    if side * side != entries:
        raise ValueError(f"{key}: a relative table of {entries} entries is not square; cannot infer its grid")
    return side


def _table_target(model: VisionLongformer, key: str) -> tuple[int, int] | None:
    """The 2-D grid of offsets the model's table ``key`` covers, None when ``key`` is not a local table."""
    parts = key.split(".")
    if len(parts) != 6 or parts[0] != "stages" or parts[2] != "blocks" or parts[-1] != "rel_bias_local":
        return None
    stage_index = int(parts[1])
    attention = model.stages[stage_index].blocks[int(parts[3])].attn
    if isinstance(attention, ViLAttention):
        return (4 * attention.window - 1,) * 2
    height, width = model.config.stage_maps()[stage_index]
    return 2 * height - 1, 2 * width - 1


def adapt_state_dict(state: Mapping[str, torch.Tensor], model: VisionLongformer, *, head: str = "replace",
                     class_map: Sequence[int] | None = None) -> tuple[dict[str, torch.Tensor], Adaptation]:
    """``state`` (vilscale names) resized to fit ``model``; returns (state dict for ``load_state_dict``,
    what was done). Raises ValueError naming the first weight that cannot fit."""
    if head not in HEAD_POLICIES:
        raise ValueError(f"head={head!r} is not valid; use one of {HEAD_POLICIES}")
    target = model.state_dict()
    report = Adaptation()
    out: dict[str, torch.Tensor] = {}
    # A model built without a head or final norm (features only, backbone) simply leaves those out.
    unexpected = sorted(key for key in set(state) - set(target) if not key.startswith(("head.", "norm.")))
    if unexpected:
        raise ValueError(f"weights {unexpected[:6]} have no place in the model; is the model name "
                         "(or pos_embed='ape'/'rpe') right?")
    missing = sorted(key for key in set(target) - set(state) if not key.startswith("head."))
    if missing:
        raise ValueError(f"the weights lack {len(missing)} tensors of the model, e.g. {missing[:6]}; is "
                         "the model name (or pos_embed='ape'/'rpe') right?")
    for key, value in state.items():
        if key.startswith("head.") or key not in target:
            continue
        want = target[key]
        if value.shape == want.shape:
            out[key] = value
            report.kept += 1
            continue
        if key.endswith(("pos_embed.row_embed", "pos_embed.col_embed")) and value.shape[::2] == want.shape[::2]:
            out[key] = resize_1d(value, want.shape[1])
        elif (grid := _table_target(model, key)) is not None and value.shape[0] == want.shape[0]:
            side = square_side(value.shape[1], key)
            out[key] = resize_table_2d(value, (side, side), grid)
        else:
            raise ValueError(f"{key}: the weights have shape {tuple(value.shape)}, the model needs "
                             f"{tuple(want.shape)}; is the model name right?")
        report.interpolated.append(f"{key}: {tuple(value.shape)} -> {tuple(want.shape)}")
    out.update(_adapt_head(state, target, head, class_map, report))
    return out, report


def _adapt_head(state, target, policy: str, class_map, report: Adaptation) -> dict[str, torch.Tensor]:
    keys = [key for key in ("head.weight", "head.bias") if key in target]
    if not keys:
        report.head = "none"
        return {}
    if not all(key in state for key in keys):
        report.head = "new (the weights have none)"
        return {}
    old, new = state["head.weight"].shape[0], target["head.weight"].shape[0]
    if class_map is not None:
        index = torch.as_tensor(list(class_map), dtype=torch.long)
        if len(index) != new:
            raise ValueError(f"class_map has {len(index)} entries but the model has {new} classes")
        if int(index.max()) >= old or int(index.min()) < 0:
            raise ValueError(f"class_map indexes outside the weights' {old} classes")
        report.head = f"remapped ({old} -> {new} classes)"
        return {key: state[key][index] for key in keys}
    if state["head.weight"].shape == target["head.weight"].shape:
        report.head = "kept"
        report.kept += len(keys)
        return {key: state[key] for key in keys}
    if state["head.weight"].shape[1:] != target["head.weight"].shape[1:]:
        raise ValueError(f"head.weight: the weights have shape {tuple(state['head.weight'].shape)}, the model needs "
                         f"{tuple(target['head.weight'].shape)}; is the model name right?")
    if policy == "truncate":
        if old < new:
            raise ValueError(f"the checkpoint head has {old} classes, fewer than num_classes={new}; pass "
                             "num_classes<= that, or class_map")
        report.head = f"truncated ({old} -> first {new} classes)"
        return {key: state[key][:new] for key in keys}
    report.head = f"replaced ({old} -> {new} classes, freshly initialised)"
    return {key: target[key] for key in keys}
