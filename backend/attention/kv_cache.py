"""The paged KV pools every runner shares, and the one way to write into and gather from them.

Per layer a K pool and a V pool `(num_blocks, block_size, Hkv, D)`. A
sequence's context lives in the blocks its block table lists; token i of a
sequence sits at slot `table[i // bs] * bs + i % bs`. The block manager owns
the block ids; this module owns the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1 << 30


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
    k_pool.view(*lead, nb * bs, hkv, d).index_copy_(dim, slots, k.reshape(*lead, -1, hkv, d))
    v_pool.view(*lead, nb * bs, hkv, d).index_copy_(dim, slots, v.reshape(*lead, -1, hkv, d))


def gather_kv(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """pool (NB, BS, Hkv, D), tables (B, MB) -> (B, MB*BS, Hkv, D): each sequence's context, in position order.

    index_select, not pool[tables]: the same result, several times faster for small gathers on CPU, and
    exported to ONNX as the same Gather.
    """
    b, mb = tables.shape
    _, bs, hkv, d = pool.shape
    return pool.index_select(0, tables.reshape(-1)).view(b, mb * bs, hkv, d)
