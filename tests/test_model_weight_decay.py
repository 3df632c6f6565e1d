"""Weight-decay groups on vil_small, pinned by parameter name: the default equals the official
``get_opt`` (microsoft/vision-longformer ``src/optim/__init__.py``), the ``timm`` rule is timm's.

Officially, a parameter is not decayed when its name contains one of ``MsViT.no_weight_decay()``'s
substrings. The official block LayerNorms are called ``norm`` (``layer1.1.norm.weight``), so
``norm.weight`` matches them: every LayerNorm is excluded, while the q/k/v, projection, MLP and
patch-convolution biases are decayed. The test applies that substring rule to the official names of
our weights (``vilscale_to_official``), so it does not depend on our own reading of the rule; with
``VILSCALE_OFFICIAL_REPO`` set, it also builds the official model and applies its own rule.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from vilscale.model import create_model, vilscale_to_official
from vilscale.orchestration.training.optim import param_groups

# MsViT.no_weight_decay() in the official code: substrings of parameter names.
OFFICIAL_NO_DECAY = ("pos_embed", "cls_token", "norm.weight", "norm.bias", "norm_embed", "head.bias",
                     "relative_position")


def _grouping(model, rule: str) -> tuple[set[str], set[str]]:
    """(decayed names, not decayed names) of ``param_groups``."""
    groups = param_groups(model, 0.05, rule)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    kept = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert not decayed & kept and decayed | kept == set(names.values())
    return decayed, kept


def _official_names(model) -> dict[str, set[str]]:
    """For each of our parameters, the official state-dict keys its values land in (found by filling
    every parameter with its own number and reading the numbers back from the official layout)."""
    names = [name for name, _ in model.named_parameters()]
    with torch.no_grad():
        for number, parameter in enumerate(model.parameters(), start=1):
            parameter.fill_(number)
    origin: dict[str, set[str]] = {}
    for key, value in vilscale_to_official(model).items():
        for number in value.unique().tolist():
            origin.setdefault(names[int(number) - 1], set()).add(key)
    return origin


def _pinned_official(model) -> set[str]:
    """What the official rule leaves undecayed, in our names: LayerNorms, position embeddings, global
    tokens, relative-position tables and the head's bias."""
    layer_norms = {f"{module_name}.{leaf}" for module_name, module in model.named_modules()
                   if isinstance(module, torch.nn.LayerNorm) for leaf in ("weight", "bias")}
    others = {name for name, _ in model.named_parameters()
              if ".pos_embed." in name or name.endswith((".global_tokens", "head.bias")) or ".rel_bias_" in name}
    return layer_norms | others


@pytest.mark.parametrize("pos_embed", ["rpe", "ape"])
def test_default_groups_equal_the_official_get_opt(pos_embed):
    model = create_model("vil_small", pos_embed=pos_embed)
    decayed, kept = _grouping(model, "official")
    assert _grouping(model, "official") == _grouping(model, "official")  # deterministic
    assert param_groups(model, 0.05)[1]["params"] == param_groups(model, 0.05, "official")[1]["params"]
    assert kept == _pinned_official(model)
    for name in ("stages.0.blocks.0.norm1.weight", "stages.2.blocks.7.norm2.bias", "stages.0.patch_embed.norm.weight",
                 "norm.weight", "head.bias", "stages.0.global_tokens"):
        assert name in kept, name
    for name in ("stages.0.blocks.0.attn.qkv.bias", "stages.1.blocks.1.attn.proj.bias",
                 "stages.2.blocks.0.mlp.fc1.bias", "stages.3.blocks.0.mlp.fc2.bias", "stages.0.patch_embed.proj.bias",
                 "head.weight", "stages.2.blocks.3.attn.qkv.weight"):
        assert name in decayed, name
    # the official substring rule, applied to the official names of our weights
    for name, keys in _official_names(model).items():
        officially_kept = {any(pattern in key for pattern in OFFICIAL_NO_DECAY) for key in keys}
        assert officially_kept == {name in kept}, (name, sorted(keys))


def test_timm_rule_also_keeps_every_bias_and_1d_parameter_undecayed():
    model = create_model("vil_small", pos_embed="rpe")
    decayed, kept = _grouping(model, "timm")
    one_d_or_bias = {name for name, p in model.named_parameters() if p.ndim <= 1 or name.endswith(".bias")}
    assert kept == _pinned_official(model) | one_d_or_bias
    assert "stages.0.blocks.0.attn.qkv.bias" in kept and "stages.0.patch_embed.proj.bias" in kept
    assert decayed == {name for name, p in model.named_parameters()
                       if p.ndim >= 2 and name not in _pinned_official(model)}
    official_decayed, _ = _grouping(model, "official")
    assert official_decayed - decayed == {name for name in official_decayed if name.endswith(".bias")}


def test_unknown_rule_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"'decoupled'.*\('official', 'timm'\)"):
        param_groups(create_model("vil_nano"), 0.05, "decoupled")


OFFICIAL_REPO = os.environ.get("VILSCALE_OFFICIAL_REPO")


@pytest.mark.skipif(not OFFICIAL_REPO, reason="set VILSCALE_OFFICIAL_REPO to a microsoft/vision-longformer checkout")
@pytest.mark.parametrize("pos_embed", ["rpe", "ape"])
def test_default_groups_equal_those_of_the_official_model(pos_embed):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from model import build_official  # noqa: E402  (imports the official package from the checkout)

    model = create_model("vil_small", pos_embed=pos_embed)
    official = build_official(OFFICIAL_REPO, model.config)
    patterns = list(official.no_weight_decay())  # get_opt: any(nd in n for nd in no_decay)
    officially_kept = {n for n, p in official.named_parameters() if p.requires_grad and any(nd in n for nd in patterns)}
    official_parameters = {n for n, _ in official.named_parameters()}  # shared global projections appear once
    _, kept = _grouping(model, "official")
    for name, keys in _official_names(model).items():
        keys = keys & official_parameters
        assert keys and {key in officially_kept for key in keys} == {name in kept}, (name, sorted(keys))
