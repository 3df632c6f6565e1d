"""Multiply-adds of a ViL forward pass, counted by torch's own FLOP counter.

``count_flops`` runs one forward pass of a single image under ``torch.utils.flop_counter.FlopCounterMode``
with every ViL attention on the ``chunked`` backend, and returns multiply-adds (the counter's FLOPs
/ 2), the convention of the paper's tables. What is counted: every matrix product and convolution
(patch embeddings, q/k/v and output projections, MLPs, the head) and the attention products as the
windowed backend runs them: each local query against its 3x3 neighbourhood of chunks (``9 w^2``
keys, padding included when the map is not a multiple of ``w``) and the global keys, each global
query against all tokens, and ``N x N`` products in full-attention stages. Normalisations, softmax,
GELU and additions are not counted.

``training=True`` counts the forward as it runs in training, where the shift mode applies: with
``shift_mode="random"`` a local query sees its own chunk and one neighbour (``2 w^2`` keys), with
``"own"`` its own chunk (``w^2``, in evaluation too). The default counts evaluation, where ``random``
runs full attention.

This reproduces the official README's figures (ViL-Tiny 1.43 G, Small 5.12 G, Medium-Deep 9.1 G,
Medium-Wide 11.3 G at 224; Medium-Deep 29.4 G, Medium-Wide 35.1 G, Base-Deep 45.3 G, Base-Wide
55.8 G at 384) within 0.6%. The arXiv tables list lower numbers for some variants (Tiny 1.3 G,
Small 4.86 G, Medium-Deep 8.7 G, Base-Deep 13.4 G at 224); those match this count *without* the
``N x N`` products of the full-attention stages (1.30, 4.90, 8.65, 13.36 G), so that is what they
leave out. For MFU the full count is the honest one.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Two products (scores and weighted values) of a fused attention call, in FLOPs."""
    batch, heads, queries, head_dim = query_shape
    return 2 * 2 * batch * heads * queries * key_shape[-2] * head_dim


# torch's counter knows the CUDA fused attention ops but not the CPU one.
_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops


@torch.no_grad()
def count_flops(model: torch.nn.Module, img_size: int | tuple[int, int] | None = None, *,
                training: bool = False) -> int:
    """Multiply-adds of one forward pass of ``model`` on one ``img_size`` image (default: the size the
    model was built for), as the model runs in evaluation (default) or in ``training`` (the shift
    mode's neighbour draws use a forked RNG, so counting leaves the global generator untouched)."""
    config = model.config
    height, width = config.img_size if img_size is None else (
        (img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
    parameter = next(model.parameters())
    image = torch.zeros(1, config.in_chans, height, width, dtype=parameter.dtype, device=parameter.device)
    backends = {module: module.backend for module in model.modules() if hasattr(module, "backend")}
    was_training = model.training
    try:
        model.set_attn_backend("chunked")
        model.train(training)
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            model(image)
    finally:
        model.train(was_training)
        for module, backend in backends.items():
            module.backend = backend
    return counter.get_total_flops() // 2
