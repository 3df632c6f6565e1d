"""Activation memory of a ViL stage grows linearly with the number of tokens (chunked backend).

Measured honestly on CPU as the bytes autograd keeps for the backward pass (every tensor saved by
any op, counted once per storage), for one stage built at 56x56 and at 224x224 (16x the tokens).
Dense attention would keep 256x; the test allows 16x plus a margin for fixed costs."""

from __future__ import annotations

import torch

from vilscale.model.config import StageConfig
from vilscale.model.stage import Stage


def _saved_bytes(module: torch.nn.Module, image: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = module(image)
    out.float().sum().backward()
    return sum(storages.values())


def _stage(side: int, backend: str) -> Stage:
    config = StageConfig(depth=1, patch_size=1, heads=1, dim=16, num_global=1, vil_attention=True, window=7)
    return Stage(16, config, map_hw=(side, side), use_vil=True, pos_embed="rpe", window_mode="chunk",
                 drop_paths=[0.0], attn_backend=backend)


def test_vil_stage_activation_memory_grows_linearly_from_56_to_224():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        small = _saved_bytes(_stage(56, "chunked"), torch.randn(1, 16, 56, 56))
        large = _saved_bytes(_stage(224, "chunked"), torch.randn(1, 16, 224, 224))
    finally:
        torch.set_num_threads(threads)
    ratio = large / small
    assert 14 <= ratio <= 18, f"saved activations grew {ratio:.1f}x for 16x the tokens"


def test_dense_reference_grows_quadratically_for_contrast():
    # The same measure on the reference backend: doubling the side (4x tokens) keeps ~16x bytes,
    # which shows the measure above would catch a quadratic backend.
    small = _saved_bytes(_stage(14, "reference"), torch.randn(1, 16, 14, 14))
    large = _saved_bytes(_stage(28, "reference"), torch.randn(1, 16, 28, 28))
    assert large / small > 8
