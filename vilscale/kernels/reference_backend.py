"""The dense reference wrapped as a dispatcher backend (fp32 math, O(N^2) memory)."""

from __future__ import annotations

from vilscale.kernels.reference import vil_attention_reference

# Above this many tokens the (heads, N, N) score matrix of one image no longer fits comfortably.
MAX_TOKENS = 16384


class _ReferenceBackend:
    name = "reference"

    def can_run(self, q, *, map_hw, num_global, window, mode) -> str | None:
        tokens = num_global + map_hw[0] * map_hw[1]
        if tokens > MAX_TOKENS:
            return f"{tokens} tokens exceed the dense reference's limit of {MAX_TOKENS} (O(N^2) memory)"
        return None

    def forward(self, q, k, v, **problem):
        return vil_attention_reference(q, k, v, **problem)


BACKEND = _ReferenceBackend()
