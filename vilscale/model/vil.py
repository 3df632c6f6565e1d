"""The Multi-Scale Vision Longformer: a pyramid of stages and a mean-pool classification head."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vilscale.model.attention import ViLAttention
from vilscale.model.config import ViLConfig, check_shift_mode
from vilscale.model.stage import Stage


class VisionLongformer(nn.Module):
    """ViL (arXiv 2103.15358) with timm-style entry points.

    ``forward_features`` returns the final normalised map ``(B, C, h, w)``; ``forward_head`` mean-pools
    it and applies the linear head; ``forward_intermediates`` returns one NCHW map per stage.
    With ``config.backbone`` every stage uses ViL attention, there is no final norm or head, and
    ``forward`` returns the per-stage maps.

    The head pools the local tokens of the last stage. The paper's variants have no global token in
    the last stage, where this equals the official model; with global tokens there the official
    model would read the first global token instead.

    Args:
        config: the network (see ``vilscale.model.config.ViLConfig``).
    """

    def __init__(self, config: ViLConfig):
        super().__init__()
        self.config = config
        maps = config.stage_maps()
        depth = sum(stage.depth for stage in config.stages)
        rates = torch.linspace(0, config.drop_path_rate, depth, device="cpu").tolist()  # the official linear schedule
        stages, in_chans, first = [], config.in_chans, 0
        for index, (stage, map_hw) in enumerate(zip(config.stages, maps)):
            stages.append(Stage(in_chans, stage, map_hw=map_hw, use_vil=config.uses_vil(index),
                                pos_embed=config.pos_embed, window_mode=config.window_mode,
                                drop_paths=rates[first:first + stage.depth], mlp_ratio=config.mlp_ratio,
                                qkv_bias=config.qkv_bias, ln_eps=config.ln_eps, attn_backend=config.attn_backend,
                                shift_mode=config.shift_mode))
            in_chans, first = stage.dim, first + stage.depth
        self.stages = nn.ModuleList(stages)
        self.num_features = in_chans
        self.feature_dims = [stage.dim for stage in config.stages]
        self.feature_strides = []
        stride = 1
        for stage in config.stages:
            stride *= stage.patch_size
            self.feature_strides.append(stride)
        if config.backbone:
            self.norm, self.head = nn.Identity(), nn.Identity()
        else:
            self.norm = nn.LayerNorm(in_chans, eps=config.ln_eps)
            self.head = nn.Linear(in_chans, config.num_classes) if config.num_classes else nn.Identity()
        self.apply(_init_weights)

    def set_attn_backend(self, backend: str) -> None:
        """Switch the backend of every ViL attention (``auto``, ``reference``, ``chunked``, ``triton``)."""
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend

    def set_grad_checkpointing(self, enable: bool = True) -> int:
        """Recompute every block's activations in backward instead of storing them (less memory, about
        one more forward of compute); returns how many blocks are affected."""
        for stage in self.stages:
            stage.grad_checkpointing = enable
        return sum(len(stage.blocks) for stage in self.stages) if enable else 0

    @property
    def shift_mode(self) -> str:
        """Which chunks the ViL attention queries see: ``full``, ``random`` or ``own`` (see
        ``ViLConfig.shift_mode``)."""
        return self.config.shift_mode

    def set_shift_mode(self, shift_mode: str) -> None:
        """Switch every ViL attention to ``shift_mode`` (``full``, ``random``, ``own``), e.g. from random
        shifts to full attention for the last part of training, as the official recipe does at 0.75 of
        the epochs (``MsViT.reset_vil_mode``). ``config.shift_mode`` follows; weights are unchanged, so
        the switch can happen at any step and in either direction."""
        check_shift_mode(shift_mode, self.config.window_mode)
        self.config = dataclasses.replace(self.config, shift_mode=shift_mode)
        for module in self.modules():
            if isinstance(module, ViLAttention):
                module.shift_mode = shift_mode

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One ``(B, C_s, h_s, w_s)`` map per stage, global tokens dropped, before the final norm."""
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, C, h, w) last-stage map after the final LayerNorm."""
        for stage in self.stages:
            x = stage(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (or the pooled features with ``pre_logits``)."""
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor):
        if self.config.backbone:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters the official recipe trains without weight decay: position
        embeddings, global tokens, relative-position tables, every LayerNorm and the head's bias.
        The official ``get_opt`` skips decay for names containing one of ``pos_embed``, ``cls_token``,
        ``norm.weight``, ``norm.bias``, ``norm_embed``, ``head.bias``, ``relative_position``; its block
        LayerNorms are named ``norm`` (``layer1.1.norm.weight``), so they match too. Other biases
        (qkv, proj, MLP, patch convolution) are decayed in the official recipe.
        ``tests/test_model_weight_decay.py`` checks this list against that rule on the official names."""
        names = set()
        for module_name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                names.update(f"{module_name}.{name}" for name, _ in module.named_parameters())
        for name, _ in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if ".pos_embed." in name or leaf == "global_tokens" or leaf.startswith("rel_bias") or name == "head.bias":
                names.add(name)
        return names


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
