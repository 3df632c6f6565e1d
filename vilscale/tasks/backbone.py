"""The ViL backbone of the dense tasks: its stage maps through torchvision's FPN (``ViLFPN``), and the one home of
what a detector or segmenter built on it delegates to its ViL body (``OnViLBody``): the attention's shift mode and
backend, activation checkpointing, the weight-decay exclusions, the body's config."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from vilscale.tasks.precision import LowPrecision


class ViLFPN(LowPrecision, nn.Module):
    """The ViL backbone's stage maps through torchvision's FPN: an OrderedDict of levels, ``out_channels`` each
    (fp32; computed in the model's compute dtype, ``vilscale.tasks.precision``).

    Args:
        body: a ``VisionLongformer`` built with ``backbone=True``.
        levels: which stages (0-based) feed the FPN.
        out_channels: channels of every FPN level.
        extra_blocks: torchvision's ``LastLevelP6P7`` (detection's ``P6P7FromC5``), ``LastLevelMaxPool`` or None.
    """

    def __init__(self, body: nn.Module, levels: list[int], out_channels: int, extra_blocks):
        from torchvision.ops import FeaturePyramidNetwork

        super().__init__()
        self.body, self.levels = body, list(levels)
        self.fpn = FeaturePyramidNetwork([body.feature_dims[level] for level in self.levels], out_channels,
                                         extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        maps = self.body.forward_intermediates(images)
        return self.fpn(OrderedDict((str(index), maps[level]) for index, level in enumerate(self.levels)))


class OnViLBody:
    """Mixed into a task model that holds a ``ViLFPN`` at ``body_path`` + ".body" (e.g. "detector.backbone"): the
    ViL body's switches and weight-decay exclusions are reachable from the task model as on a classifier."""

    body_path: str = "backbone"
    """Where the ``ViLFPN`` sits in the task model (dotted attribute path)."""

    @property
    def body(self) -> nn.Module:
        module = self
        for name in self.body_path.split("."):
            module = getattr(module, name)
        return module.body

    @property
    def config(self):
        return self.body.config

    @property
    def shift_mode(self) -> str:
        return self.body.shift_mode

    def set_shift_mode(self, shift_mode: str) -> None:
        self.body.set_shift_mode(shift_mode)

    def set_attn_backend(self, backend: str) -> None:
        self.body.set_attn_backend(backend)

    def set_grad_checkpointing(self, enable: bool = True) -> int:
        return self.body.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """The ViL body's exclusions of its ImageNet training (LayerNorms, position tables, global tokens); the FPN
        and the heads are decayed. (The official detection fork decays every parameter: see the COCO jobs'
        headers for why vilscale keeps the body's exclusions.)"""
        return {f"{self.body_path}.body.{name}" for name in self.body.no_weight_decay()}


__all__ = ["OnViLBody", "ViLFPN"]
