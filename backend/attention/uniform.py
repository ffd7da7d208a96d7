"""UniformQueryAttention: a step in which every sequence owns the same number Q of query rows (CUDA graphs).

A verify step (speculative decoding) gives each sequence 1 + its proposals new
tokens, a plain decode beside it 1. A CUDA graph fixes every shape, so the
runner lays the step out as (batch bucket, Q) rows: sequence s's new tokens
first in its Q rows, padding after them, and whole padding sequences up to
the bucket. vLLM's "uniform decode" CUDA graphs for speculative decoding
(1 + num_speculative_tokens query tokens per request) and TensorRT-LLM's
padding of draft tokens to max_draft_len for its graphs do the same.

Per layer: every row's K/V is stored at its slot (padding rows' in the
scratch block, which the block manager never hands out), then the paged
attention kernel's fixed-stride form attends each real row causally over its
context (kernels/paged_prefill_attention.py). The decode attention kernel
could not serve it: it stores one token's K/V in the launch that reads the
context, which leaves no room for a second new token of the same sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from kvtriton.backend.attention.kv_cache import KVCache, write_kv


def uniform_rows(query_lens: list[int], width: int) -> np.ndarray:
    """(N,) the row of each packed new token (sequence s's n_s tokens one after another) in the layout of Q =
    width rows per sequence: token j of sequence s goes to row s * width + j."""
    lens = np.asarray(query_lens, dtype=np.int64)
    first = np.cumsum(lens) - lens  # packed index of each sequence's first token
    return np.repeat(np.arange(len(lens), dtype=np.int64) * width - first, lens) + np.arange(int(lens.sum()))


class UniformQueryAttention:
    """AttentionContext over a KVCache for a fixed-stride step (see models.llama.AttentionContext)."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, tables: torch.Tensor, query_lens: torch.Tensor,
                 context_lens: torch.Tensor, scale: float):
        """slots (B * Q,): every row's slot (padding: the scratch block); tables (B, W); query_lens (B,) real
        rows per sequence (>= 1); context_lens (B,) with the new tokens counted."""
        self.cache, self.slots, self.tables = cache, slots, tables
        self.query_lens, self.context_lens, self.scale = query_lens, context_lens, scale

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from kvtriton.backend.kernels.paged_prefill_attention import paged_uniform_attention  # needs triton

        k_pool, v_pool = self.cache.k[layer_idx], self.cache.v[layer_idx]
        write_kv(k_pool, v_pool, self.slots, k, v)
        return paged_uniform_attention(q, k_pool, v_pool, self.tables, self.query_lens, self.context_lens,
                                       self.scale)
