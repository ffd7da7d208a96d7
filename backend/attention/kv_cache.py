"""The paged KV pools every runner shares, and the one way to write into and gather from them.

Per layer a K pool and a V pool `(num_blocks, block_size, Hkv, D)`. A
sequence's context lives in the blocks its block table lists; token i of a
sequence sits at slot `table[i // bs] * bs + i % bs`. The block manager owns
the block ids; this module owns the tensors.

The pools hold the model's dtype, or fp8 e4m3 (`kv_cache_dtype: fp8`, as
vLLM's `kv_cache_dtype="fp8"` without calibrated scales): values are stored
unscaled, saturated at +-448 (e4m3fn has no infinity, and torch's cast of a
larger value gives NaN), and every reader widens them to the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1 << 30
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def pool_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pools' element type for EngineConfig.kv_cache_dtype ("auto": the model's)."""
    return FP8 if kv_cache_dtype == "fp8" else model_dtype


def to_pool(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a pool of `dtype` stores it: fp8 saturates at +-FP8_MAX, as the Triton kernels' stores do."""
    if x.dtype == dtype:
        return x
    return (x.clamp(-FP8_MAX, FP8_MAX) if dtype == FP8 else x).to(dtype)


def _indexable(t: torch.Tensor) -> torch.Tensor:
    """t, or an fp8 tensor's bytes as uint8: index_copy_ and index_select have no fp8 kernels on the CPU, and a
    copy of the bytes is the same copy."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


@dataclass
class KVCache:
    """The pools of all layers. Allocated once; the block manager owns the ids."""

    k: list[torch.Tensor]  # per layer (num_blocks, block_size, Hkv, D)
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device) -> "KVCache":
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def num_blocks_for_budget(bytes_per_block: int, memory_gb: float, num_kv_blocks: int = 0) -> int:
    """How many KV blocks a pool of `memory_gb` GiB holds: the size of every runner's pool that is not
    sized from measured free GPU memory (CPU pools, onnxruntime's).

    num_kv_blocks > 0 is a size the user set, and wins over the budget. At least one block: a budget
    below one block still starts (and serves one block at a time) rather than failing at start-up.
    """
    if num_kv_blocks:
        return num_kv_blocks
    return max(1, int(memory_gb * GIB // bytes_per_block))


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Store new K/V at their flat slots, in place.

    One layer: pools (NB, BS, Hkv, D), k/v (N, Hkv, D). Stacked layers (the exported graph's runners):
    pools (L, NB, BS, Hkv, D), k/v (L, ..., Hkv, D) with N = B*T tokens per layer; slots (N,) either way.
    """
    *lead, nb, bs, hkv, d = k_pool.shape
    dim = len(lead)
    for pool, new in ((k_pool, k), (v_pool, v)):
        new = _indexable(to_pool(new, pool.dtype))
        _indexable(pool).view(*lead, nb * bs, hkv, d).index_copy_(dim, slots, new.reshape(*lead, -1, hkv, d))


def gather_kv(pool: torch.Tensor, tables: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """pool (NB, BS, Hkv, D), tables (B, MB) -> (B, MB*BS, Hkv, D): each sequence's context, in position order,
    as `dtype` (the model's, for an fp8 pool; None: the pool's).

    index_select, not pool[tables]: the same result, several times faster for small gathers on CPU, and
    exported to ONNX as the same Gather.
    """
    b, mb = tables.shape
    _, bs, hkv, d = pool.shape
    gathered = _indexable(pool).index_select(0, tables.reshape(-1))
    if gathered.dtype != pool.dtype:  # an fp8 pool's bytes
        gathered = gathered.view(pool.dtype)
    gathered = gathered.view(b, mb * bs, hkv, d)
    return gathered if dtype is None else gathered.to(dtype)
