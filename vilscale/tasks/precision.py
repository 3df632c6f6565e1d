"""Mixed precision for the dense tasks, as detectron2 and torchvision's references do it: fp32 weights, and
low-precision compute in islands (the backbone, the FPN and the heads' convolutions and linears run under
``torch.autocast``), while everything that is a coordinate or a decision stays fp32.

Why not DeepSpeed's bf16 mode (which casts every parameter and buffer to bf16) for detection and segmentation:
anchors are made in the dtype of the feature maps, torchvision's box coder decodes in the dtype of the regression
output, and a bf16 coordinate near 1333 px moves in 8-px steps (a perfect detector decoded in bf16 scores COCO AP
74 instead of 99.7); torchvision's ``nms`` has no bf16 kernel at all. With islands, each island's outputs are cast
back to fp32 at its border, so anchors, box coding and decoding, RoIAlign (its inputs are the fp32 FPN levels),
the losses, NMS, mask pasting and the predictions written to disk are fp32, and DeepSpeed keeps fp32 weights and
gradients (no loss scaling needed with bf16). Classification keeps DeepSpeed's bf16 mode: it has no coordinates,
its loss is computed from fp32 logits, and bf16 weights halve its gradient all-reduce
(``vilscale.tasks.classification``).

An island is a module whose class mixes in ``LowPrecision``: its forward runs under autocast in the dtype that
``set_compute_dtype(model, dtype)`` gave the model (fp32: no autocast at all), and every floating tensor it returns
is fp32.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.precision`` -> the compute dtype."""


def to_fp32(value):
    """``value`` with every floating-point tensor in it (tensors, lists, tuples, dicts) cast to fp32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((key, to_fp32(item)) for key, item in value.items())
    if isinstance(value, list | tuple):
        return type(value)(to_fp32(item) for item in value)
    return value


def island(dtype: torch.dtype, device_type: str):
    """The context of an island's compute: autocast to ``dtype`` on ``device_type`` ("cpu", "cuda"), or nothing
    for fp32. What runs inside returns low-precision tensors: cast them to fp32 at the island's border."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


class LowPrecision:
    """Mixed into an ``nn.Module`` class: the class's forward (its own, or the one it inherits, e.g. a torchvision
    head's) runs under ``torch.autocast`` in ``compute_dtype`` (fp32: plain fp32) and returns fp32 tensors.
    Parameter names do not change."""

    compute_dtype: torch.dtype = torch.float32

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        inner = cls.forward
        if getattr(inner, "_island", False):  # a subclass of an island that keeps its forward
            return

        @functools.wraps(inner)
        def forward(self, *args, **kwargs):
            if self.compute_dtype == torch.float32:
                return inner(self, *args, **kwargs)
            with island(self.compute_dtype, _device_type(self, args)):
                out = inner(self, *args, **kwargs)
            return to_fp32(out)

        forward._island = True
        cls.forward = forward


def _device_type(module: nn.Module, args) -> str:
    for parameter in module.parameters():
        return parameter.device.type
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return "cpu"


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every island in ``model`` computes in ``dtype`` (bf16, fp16 or fp32); weights stay as they are."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute dtype {dtype} is not one of fp32, bf16, fp16")
    for module in model.modules():
        if isinstance(module, LowPrecision):
            module.compute_dtype = dtype
    return model


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The islands' compute dtype (fp32 when the model has none)."""
    for module in model.modules():
        if isinstance(module, LowPrecision):
            return module.compute_dtype
    return torch.float32


__all__ = ["COMPUTE_DTYPES", "LowPrecision", "compute_dtype", "island", "set_compute_dtype", "to_fp32"]
