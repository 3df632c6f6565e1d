"""ViL attention ops: ``reference`` (the definition), ``chunked`` (PyTorch, O(N*window) memory),
``triton`` (fused forward and backward), behind one dispatcher."""

from vilscale.kernels.dispatch import BACKEND_NAMES, get_backend, refusals, select_backend, vil_attention
from vilscale.kernels.reference import WINDOW_MODES, vil_attention_reference

__all__ = ["BACKEND_NAMES", "WINDOW_MODES", "get_backend", "refusals", "select_backend", "vil_attention",
           "vil_attention_reference"]
