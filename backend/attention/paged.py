"""Paged attention in plain PyTorch: the attention every runner on torch uses.

Each step writes the
new tokens' K/V at their slots first, then attends over the gathered context,
so prefill chunks, prefix-cache hits and decodes are one code path.

Batch order invariant: the `num_decodes` one-token sequences come first in the
packed batch; they are attended together in one batched call (the hot path, and
the shape CUDA graphs capture). Longer chunks (prefills) follow, one call each.

On CUDA with the Triton kernels on, a step with any prefill in it instead runs
one varlen kernel over all its packed tokens, decodes included, reading the
context straight from the pools (kernels/paged_prefill_attention.py); the
PyTorch path stays the reference and the CPU's.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvtriton.backend.attention.kv_cache import KVCache, gather_kv, write_kv
from kvtriton.backend.attention.metadata import AttentionMetadata
from kvtriton.backend.kernels.device_copy import to_device

# Prefill chunks come in every length. cuDNN's SDPA builds an execution plan per new shape (tens of
# ms on an H200: one new prompt length stalled its whole step), so prefill uses the kernels that
# need no plan. Decode keeps every backend: its shapes are the captured buckets, planned once.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Decode gathers at least this many block-table columns. The CPU's compiled decode pads narrower tables (dynamo
# specialises sizes 0 and 1: runners/cpu_compiled_decode.py), and the eager path pads the same way, so both
# reduce over the same slots: SDPA over 4 slots and over 8 with the last 4 masked differed in the last bit on
# an AVX2 CPU, enough to move a greedy token.
MIN_DECODE_TABLE_WIDTH = 2


def pad_decode_tables(tables: torch.Tensor) -> torch.Tensor:
    """(B, W) -> (B, max(W, MIN_DECODE_TABLE_WIDTH)): a narrower table repeats its last column (finite K/V,
    masked out by the context lengths). Both decode paths pad through here."""
    missing = MIN_DECODE_TABLE_WIDTH - tables.shape[1]
    return torch.cat([tables] + [tables[:, -1:]] * missing, dim=1) if missing > 0 else tables


class PagedAttention:
    """AttentionContext over a KVCache for one step (see models.llama.AttentionContext)."""

    def __init__(self, cache: KVCache, meta: AttentionMetadata, scale: float, varlen_kernel: bool = False,
                 query_start: torch.Tensor | None = None, decode_attention_fn=None):
        """varlen_kernel: prefill steps take the Triton varlen kernel (needs triton and a CUDA cache).
        query_start (B + 1,): the varlen kernel's, given rather than made from meta's host lists (a CUDA graph's
        static buffer). decode_attention_fn: what attends the decode rows, with `decode_attention`'s signature (the
        CPU's compiled decode passes its own, attention/cpu_decode.py)."""
        self.cache, self.meta, self.scale, self.varlen_kernel = cache, meta, scale, varlen_kernel
        self._decode_attention = decode_attention_fn or decode_attention
        self._decode_mask: torch.Tensor | None = None  # the same for every layer: built once per step
        self._query_start = query_start  # (B + 1,) the varlen kernel's: given, or built once per step

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        k_pool, v_pool = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (NB, BS, Hkv, D)
        write_kv(k_pool, v_pool, meta.slot_mapping, k, v)

        if meta.decode_only:
            return self._decode(q, k_pool, v_pool, meta.block_tables)
        if self.varlen_kernel:
            return self._varlen(q, k_pool, v_pool)
        out = torch.empty_like(q)  # (N, H, D)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_pool, v_pool, meta.block_tables[:nd, : meta.decode_context_blocks])
        start = nd
        for i in range(nd, len(meta.query_lens)):
            qlen, ctx = meta.query_lens[i], meta.context_lens_host[i]
            out[start : start + qlen] = self._prefill(q[start : start + qlen], k_pool, v_pool, i, ctx)
            start += qlen
        return out

    def _varlen(self, q, k_pool, v_pool):
        """q (N, H, D): every new token of the step, decodes and prefill chunks alike, in one launch."""
        from kvtriton.backend.kernels.paged_prefill_attention import paged_prefill_attention  # needs triton

        meta = self.meta
        if self._query_start is None:
            starts = [0, *accumulate(meta.query_lens)]
            self._query_start = to_device(torch.tensor(starts, dtype=torch.int64), q.device)
        return paged_prefill_attention(q, k_pool, v_pool, meta.block_tables, self._query_start, meta.context_lens,
                                       self.scale)

    def _decode(self, q, k_pool, v_pool, tables):
        """q (Bd, H, D), one new token per sequence, attends to its whole context; tables (Bd, MBd)."""
        tables = pad_decode_tables(tables)
        if self._decode_mask is None:
            self._decode_mask = decode_mask(self.meta.context_lens[: q.shape[0]], tables.shape[1] * k_pool.shape[1])
        return self._decode_attention(q, k_pool, v_pool, tables, self._decode_mask, self.scale)

    def _prefill(self, q, k_pool, v_pool, seq: int, ctx: int):
        """q (T, H, D): the last T tokens of a context of ctx tokens (earlier ones cached)."""
        t = q.shape[0]
        nblocks = -(-ctx // k_pool.shape[1])
        tables = self.meta.block_tables[seq : seq + 1, :nblocks]  # (1, nblocks)
        keys = gather_kv(k_pool, tables, q.dtype)[:, :ctx].transpose(1, 2)  # (1, Hkv, ctx, D)
        values = gather_kv(v_pool, tables, q.dtype)[:, :ctx].transpose(1, 2)  # (1, Hkv, ctx, D)
        qh = q.transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
        with sdpa_kernel(PREFILL_BACKENDS):
            return self._prefill_attention(qh, keys, values, t, ctx)

    def _prefill_attention(self, qh, keys, values, t: int, ctx: int):
        if t == ctx:
            o = F.scaled_dot_product_attention(qh, keys, values, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            qpos = torch.arange(ctx - t, ctx, device=qh.device)  # (T,)
            mask = torch.arange(ctx, device=qh.device)[None, :] <= qpos[:, None]  # (T, ctx)
            o = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1)  # (T, H, D)


def decode_mask(context_lens: torch.Tensor, length: int) -> torch.Tensor:
    """context_lens (B,) -> (B, 1, 1, length) bool: which of the gathered slots each sequence attends to
    (its context; the rest of its last block and any padded table column are not). The same for every layer."""
    return (torch.arange(length, device=context_lens.device)[None, :] < context_lens[:, None])[:, None, None, :]


def decode_attention(q, k_pool, v_pool, tables, mask, scale: float) -> torch.Tensor:
    """q (B, H, D), one new token per sequence (its K/V already written), over its context gathered from the
    pools by tables (B, MB) -> (B, H, D). Plain ops: the eager decode path and the CPU's compiled one."""
    keys = gather_kv(k_pool, tables, q.dtype).transpose(1, 2)  # (B, Hkv, L, D)
    values = gather_kv(v_pool, tables, q.dtype).transpose(1, 2)  # (B, Hkv, L, D)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(2)  # (B, H, D)
