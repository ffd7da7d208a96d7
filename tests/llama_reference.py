"""Test helper: run our Llama core over whole prompts (one prefill step) on a private paged cache."""

from __future__ import annotations

import torch

from kvtriton.backend.attention.kv_cache import KVCache
from kvtriton.backend.attention.metadata import AttentionMetadata
from kvtriton.backend.attention.paged import PagedAttention


def prefill_logits(model, prompts: list[list[int]], block_size: int = 4) -> list[torch.Tensor]:
    """Every prompt in one packed step, on the model's device; returns each prompt's logits (T_i, V)."""
    cfg = model.config
    weight = next(model.parameters())
    blocks_per_seq = [-(-len(p) // block_size) for p in prompts]
    cache = KVCache.allocate(cfg.num_layers, sum(blocks_per_seq), block_size, cfg.num_kv_heads, cfg.head_dim,
                             weight.dtype, weight.device)
    mb = max(blocks_per_seq)
    tables, slots, first = [], [], 0
    for p, n in zip(prompts, blocks_per_seq):
        table = list(range(first, first + n))
        first += n
        tables.append(table + [0] * (mb - n))
        slots += [table[i // block_size] * block_size + i % block_size for i in range(len(p))]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=weight.device),
        block_tables=torch.tensor(tables, device=weight.device),
        context_lens=torch.tensor([len(p) for p in prompts], device=weight.device),
        num_decodes=0,
        query_lens=[len(p) for p in prompts],
        context_lens_host=[len(p) for p in prompts],
        decode_context_blocks=0,
    )
    ids = torch.tensor([t for p in prompts for t in p], device=weight.device)
    pos = torch.cat([torch.arange(len(p)) for p in prompts]).to(weight.device)
    ctx = PagedAttention(cache, meta, cfg.head_dim**-0.5)
    with torch.no_grad():
        logits = model.compute_logits(model(ids, pos, ctx))
    return list(logits.split([len(p) for p in prompts]))
