"""Which model shapes the Triton paged attention kernels (paged_decode_attention, paged_prefill_attention) serve."""

from __future__ import annotations

import torch


def unsupported_shape(kernel: str, min_head_dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype) -> str | None:
    """None if `kernel` (its name, for the message) serves this shape, else why not (one line, for the log).
    min_head_dim: the smallest head_dim its tl.dot tiles take (tl.dot's inner dimension is at least 16);
    head_dim must also be a power of two, as tl.arange spans it."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{kernel} needs bf16/fp16, not {dtype}"
    if head_dim < min_head_dim or head_dim & (head_dim - 1):
        return f"{kernel} needs a power-of-two head_dim >= {min_head_dim}, not {head_dim}"
    if num_heads % num_kv_heads:
        return f"{kernel} needs num_heads divisible by num_kv_heads"
    return None
