"""Official ViL checkpoints (microsoft/vision-longformer) <-> vilscale weights.

The official ``MsViT`` stores stage ``s`` as ``layer{s}``: ``layer{s}.0`` is the patch embedding
(``proj``, ``norm_embed``, ``cls_token``, ``cls_pos_embed``, ``x_pos_embed`` for rows,
``y_pos_embed`` for columns), then an attention block ``layer{s}.{2i+1}`` (``norm``, ``attn``) and an
MLP block ``layer{s}.{2i+2}`` (``norm``, ``mlp.fc1``, ``mlp.fc2``) per block ``i``; then ``norm`` and
``head``. Its ViL attention has ``query`` and ``kv`` projections and, because the released models
were trained with shared global weights (``SHARE_W=True``), identical copies under
``query_global``, ``kv_global``, ``proj_global``; full attention has one ``qkv``. vilscale keeps one
``qkv`` (query rows first, then key, then value) for both kinds, so a full-attention stage loads
into a ViL stage (``backbone=True``) unchanged and a ViL stage is split back into ``query``/``kv``
when exporting.

Relative-position tables are stored ``(entries, heads)`` and indexed by ``query - key`` in the
official code; vilscale stores ``(heads, entries)`` indexed by ``key - query``, which is the same
table reversed. ``g2l_relative_position_bias[0]`` is vilscale's ``g2l`` (global query -> local
keys), ``[1]`` its ``l2g`` (local query -> global key).

Adapting to another resolution or window: row/column embeddings are interpolated linearly, and
relative tables bilinearly over their 2-D grid of offsets (as the official fine-tuning loader
does); a full-attention table becomes a ViL ``(4w-1)^2`` table the same way. The classifier is
truncated to the first ``num_classes`` rows, or remapped with ``class_map``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

from vilscale.model.adapt import adapt_state_dict
from vilscale.model.attention import ViLAttention
from vilscale.model.registry import create_model
from vilscale.model.vil import VisionLongformer

_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")


def read_official(path_or_state_dict) -> dict[str, torch.Tensor]:
    """The bare state dict of an official checkpoint: unwraps ``{"net": ...}`` (also ``model`` and
    ``state_dict`` containers) and strips DataParallel/DDP ``module.`` prefixes."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    else:
        state = path_or_state_dict
    if not isinstance(state, Mapping):
        raise ValueError(f"an official checkpoint is a dict, got {type(state).__name__}")
    for container in ("net", "model", "state_dict"):
        if container in state and isinstance(state[container], Mapping):
            state = state[container]
            break
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"no tensors found in the checkpoint (top-level keys: {sorted(state)[:10]})")
    while all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    return tensors


def _flip(table: torch.Tensor) -> torch.Tensor:
    """Official (entries, heads) indexed by query - key -> ours (heads, entries) indexed by key - query."""
    return table.flip(0).t().contiguous()


def _unflip(table: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_flip``."""
    return table.flip(1).t().contiguous()


def official_to_vilscale(official: Mapping[str, torch.Tensor], model: VisionLongformer, *,
                         class_map: Sequence[int] | None = None, head: str = "truncate") -> dict[str, torch.Tensor]:
    """Translate an official state dict into ``model``'s state dict: official names and layouts become
    vilscale's (``translate_official``), then ``vilscale.model.adapt`` resizes position tables to the
    model's resolution and windows and adapts the classifier on a class-count change (``head``:
    "truncate" to the model's classes or "replace" by the model's fresh head; or remapped by
    ``class_map``)."""
    translated = translate_official(official, num_stages=len(model.config.stages))
    adapted, _ = adapt_state_dict(translated, model, head=head, class_map=class_map)
    return adapted


def translate_official(official: Mapping[str, torch.Tensor], *, num_stages: int) -> dict[str, torch.Tensor]:
    """Official names and layouts -> vilscale's (tables reoriented, query/kv joined into qkv), no resizing.

    Raises ValueError for keys that have no vilscale counterpart or for separately trained global
    projections (``SHARE_W=False``)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # our qkv key -> official query/kv parts
    unused = []
    n_stages = num_stages
    for key, value in official.items():
        if key.endswith("relative_position_index"):
            continue  # a buffer derived from the shapes
        match = _BLOCK_KEY.match(key)
        if match is None:
            if key.startswith(("norm.", "head.")):
                out[key] = value
            else:
                unused.append(key)
            continue
        stage_index, position, rest = int(match.group(1)) - 1, int(match.group(2)), match.group(3)
        if not 0 <= stage_index < n_stages:
            unused.append(key)
            continue
        prefix = f"stages.{stage_index}"
        if position == 0:
            mapped = _patch_embed_key(rest)
            if mapped is None:
                unused.append(key)
            elif not (mapped == "pos_embed.global_embed" and value.numel() == 0):
                out[f"{prefix}.{mapped}"] = value
            continue
        block_prefix = f"{prefix}.blocks.{(position - 1) // 2}"
        if position % 2 == 0:  # MLP block
            if rest.startswith("norm."):
                out[f"{block_prefix}.norm2.{rest[5:]}"] = value
            elif rest.startswith("mlp."):
                out[f"{block_prefix}.{rest}"] = value
            else:
                unused.append(key)
            continue
        if rest.startswith("norm."):
            out[f"{block_prefix}.norm1.{rest[5:]}"] = value
            continue
        if not rest.startswith("attn."):
            unused.append(key)
            continue
        name = rest[5:]
        attn = f"{block_prefix}.attn"
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith(("query_global.", "kv_global.", "proj_global.")):
            local_name = name.replace("_global", "")
            if local_name not in _official_attn(official, stage_index, position) or not torch.equal(
                    value, official[f"layer{stage_index + 1}.{position}.attn.{local_name}"]):
                raise ValueError(f"{key} differs from attn.{local_name}: this checkpoint was trained with separate "
                                 "global projections (SHARE_W=False), which vilscale does not model")
            continue
        if name.startswith(("query.", "kv.")):
            pending.setdefault(f"{attn}.qkv.{leaf}", {})[name.split(".")[0]] = value
        elif name.startswith(("qkv.", "proj.")):
            out[f"{attn}.{name}"] = value
        elif name == "local_relative_position_bias_table":
            out[f"{attn}.rel_bias_local"] = _flip(value)
        elif name == "g2l_relative_position_bias":
            out[f"{attn}.rel_bias_g2l"], out[f"{attn}.rel_bias_l2g"] = value[0], value[1]
        elif name == "g2g_relative_position_bias":
            out[f"{attn}.rel_bias_g2g"] = value
        else:
            unused.append(key)
    for key, parts in pending.items():
        if set(parts) != {"query", "kv"}:
            raise ValueError(f"{key}: the checkpoint has {sorted(parts)} but needs both query and kv")
        out[key] = torch.cat([parts["query"], parts["kv"]], dim=0)
    if unused:
        raise ValueError(f"checkpoint keys that a {n_stages}-stage ViL has no place for: {unused[:10]}"
                         f"{' ...' if len(unused) > 10 else ''}; is the model name right?")
    return out


def _official_attn(official, stage_index, position) -> set[str]:
    prefix = f"layer{stage_index + 1}.{position}.attn."
    return {key[len(prefix):] for key in official if key.startswith(prefix)}


def _patch_embed_key(rest: str) -> str | None:
    names = {"proj.weight": "patch_embed.proj.weight", "proj.bias": "patch_embed.proj.bias",
             "norm_embed.weight": "patch_embed.norm.weight", "norm_embed.bias": "patch_embed.norm.bias",
             "cls_token": "global_tokens", "cls_pos_embed": "pos_embed.global_embed",
             "x_pos_embed": "pos_embed.row_embed", "y_pos_embed": "pos_embed.col_embed"}
    return names.get(rest)


def vilscale_to_official(model: VisionLongformer) -> dict[str, torch.Tensor]:
    """``model``'s weights under the official key names and layouts (shared global projections
    duplicated as in the released checkpoints; the ``relative_position_index`` buffers are left out)."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key.startswith(("norm.", "head.")):
            if key in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
                out[key] = value
            continue
        parts = key.split(".")
        stage_index, layer = int(parts[1]), f"layer{int(parts[1]) + 1}"
        if parts[2] != "blocks":
            inverse = {"patch_embed.proj.weight": "proj.weight", "patch_embed.proj.bias": "proj.bias",
                       "patch_embed.norm.weight": "norm_embed.weight", "patch_embed.norm.bias": "norm_embed.bias",
                       "global_tokens": "cls_token", "pos_embed.global_embed": "cls_pos_embed",
                       "pos_embed.row_embed": "x_pos_embed", "pos_embed.col_embed": "y_pos_embed"}
            out[f"{layer}.0.{inverse['.'.join(parts[2:])]}"] = value
            continue
        block, rest = int(parts[3]), ".".join(parts[4:])
        attn_prefix, mlp_prefix = f"{layer}.{2 * block + 1}", f"{layer}.{2 * block + 2}"
        if rest.startswith("norm1."):
            out[f"{attn_prefix}.norm.{rest[6:]}"] = value
        elif rest.startswith("norm2."):
            out[f"{mlp_prefix}.norm.{rest[6:]}"] = value
        elif rest.startswith("mlp."):
            out[f"{mlp_prefix}.{rest}"] = value
        elif rest.startswith("attn."):
            out.update(_attention_to_official(model, stage_index, block, rest[5:], value, f"{attn_prefix}.attn"))
    for stage_index, stage in enumerate(model.stages):  # g2l/l2g are one (2, heads, G) tensor officially
        for block_index, block in enumerate(stage.blocks):
            attn = block.attn
            if attn.rpe and attn.num_global:
                prefix = f"layer{stage_index + 1}.{2 * block_index + 1}.attn"
                out[f"{prefix}.g2l_relative_position_bias"] = torch.stack(
                    [attn.rel_bias_g2l.detach(), attn.rel_bias_l2g.detach()]).clone()
    return out


def _attention_to_official(model, stage_index, block, name, value, prefix) -> dict[str, torch.Tensor]:
    attn = model.stages[stage_index].blocks[block].attn
    if name in ("rel_bias_g2l", "rel_bias_l2g"):
        return {}
    if name == "rel_bias_g2g":
        return {f"{prefix}.g2g_relative_position_bias": value}
    if name == "rel_bias_local":
        return {f"{prefix}.local_relative_position_bias_table": _unflip(value)}
    if not isinstance(attn, ViLAttention):
        return {f"{prefix}.{name}": value}
    leaf = name.split(".")[-1]
    if name.startswith("qkv."):
        dim = value.shape[0] // 3
        query, kv = value[:dim].clone(), value[dim:].clone()
        return {f"{prefix}.query.{leaf}": query, f"{prefix}.kv.{leaf}": kv,
                **({f"{prefix}.query_global.{leaf}": query.clone(), f"{prefix}.kv_global.{leaf}": kv.clone()}
                   if attn.num_global else {})}
    if name.startswith("proj."):
        return {f"{prefix}.proj.{leaf}": value,
                **({f"{prefix}.proj_global.{leaf}": value.clone()} if attn.num_global else {})}
    raise ValueError(f"no official name for attention weight {name}")


def load_official(path_or_state_dict, name: str, *, class_map: Sequence[int] | None = None,
                  **create_kwargs) -> VisionLongformer:
    """Build ``create_model(name, **create_kwargs)`` and load an official ViL checkpoint into it.

    Args:
        path_or_state_dict: a ``.pth`` path (read with ``torch.load(weights_only=True)``) or a loaded dict;
            ``{"net": state_dict}`` containers and ``module.`` prefixes are handled.
        name: vilscale variant (e.g. ``vil_small``); ``pos_embed`` must match the checkpoint (``rpe`` for
            the relative-position releases).
        class_map: for each class of the new head, the row of the checkpoint's head to take (e.g. the
            ImageNet-1K classes inside a 21K head); without it the head is truncated to ``num_classes``.
        **create_kwargs: ``create_model`` arguments (img_size, window, window_mode, num_classes, backbone, ...).
    """
    model = create_model(name, **create_kwargs)
    state = official_to_vilscale(read_official(path_or_state_dict), model, class_map=class_map)
    model.load_state_dict(state)
    return model
