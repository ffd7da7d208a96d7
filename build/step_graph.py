"""The step graph: one engine step of the Llama core as a pure function, the thing ONNX and TensorRT run.

    (input_ids, positions (B, T), k_cache, v_cache (L, NB, BS, Hkv, D), block_tables (B, MB))
        -> logits (B, V) of each row's last token, new_k, new_v (L, B, T, Hkv, D)

A call holds B sequences with T new tokens each (the decode group: T = 1;
a prefill chunk: B = 1), so queries are a dense (B, T) block and each
sequence's context is gathered once, not once per token. The graph never
writes the pools: it attends over the gathered *old* context (slots whose
position precedes the row's first new token) plus the new tokens' own K/V
(causal), and returns the new K/V for the runner to scatter into its pools.
So the graph has no in-place updates, and both prefill and decode are one
graph with dynamic B, T and MB.

Invariant the runner keeps: row b's old context fills block_tables[b] from
position 0 up to positions[b, 0] - 1; columns past it may hold anything.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtriton.backend.models.llama import LlamaForCausalLM

INPUT_NAMES = ["input_ids", "positions", "k_cache", "v_cache", "block_tables"]
OUTPUT_NAMES = ["logits", "new_k", "new_v"]


class GatheredContextAttention:
    """AttentionContext over read-only stacked pools: old context gathered by block table, new K/V collected."""

    def __init__(self, k_cache, v_cache, block_tables, positions, scale: float):
        self.k_cache, self.v_cache = k_cache, v_cache  # (L, NB, BS, Hkv, D)
        self.block_tables = block_tables  # (B, MB)
        self.positions = positions  # (B, T)
        self.scale = scale
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []
        b, t = positions.shape
        bs = k_cache.shape[2]
        s = block_tables.shape[1] * bs
        # Slot j of the gathered context holds position j; it is old context iff j < first new position.
        old = torch.arange(s, device=positions.device)[None, None, :] < positions[:, :1, None]  # (B, 1, S)
        causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()  # (T, T)
        self.mask = torch.cat([old.expand(b, t, s), causal[None].expand(b, t, t)], dim=-1)  # (B, T, S+T)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t = self.positions.shape
        n, h, d = q.shape
        hkv = k.shape[1]
        k = k.view(b, t, hkv, d)  # (B, T, Hkv, D)
        v = v.view(b, t, hkv, d)
        self.new_k.append(k)
        self.new_v.append(v)
        keys = torch.cat([_gather(self.k_cache[layer_idx], self.block_tables), k], dim=1)  # (B, S+T, Hkv, D)
        values = torch.cat([_gather(self.v_cache[layer_idx], self.block_tables), v], dim=1)
        keys = _repeat_kv(keys, h // hkv).transpose(1, 2)  # (B, H, S+T, D)
        values = _repeat_kv(values, h // hkv).transpose(1, 2)  # (B, H, S+T, D)
        qh = q.view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        # Scores and softmax in fp32 whatever the graph's dtype (half-precision exp sums overflow).
        scores = torch.matmul(qh, keys.transpose(2, 3)).float() * self.scale  # (B, H, T, S+T)
        scores = scores.masked_fill(~self.mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)  # (B, H, T, S+T)
        out = torch.matmul(probs, values)  # (B, H, T, D)
        return out.transpose(1, 2).reshape(n, h, d)  # (N, H, D)


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, S, Hkv, D) -> (B, S, Hkv*group, D), each KV head shared by `group` query heads (GQA).
    Expand + reshape rather than repeat_interleave, which exports with OneHot (TensorRT lacks it)."""
    b, s, hkv, d = x.shape
    return x[:, :, :, None, :].expand(b, s, hkv, group, d).reshape(b, s, hkv * group, d)


def _gather(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """pool (NB, BS, Hkv, D), tables (B, MB) -> (B, MB*BS, Hkv, D)."""
    b, mb = tables.shape
    _, bs, hkv, d = pool.shape
    return pool[tables].reshape(b, mb * bs, hkv, d)


class StepGraph(nn.Module):
    """The exported function around the unchanged model core (same weights, same layers)."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model
        self.scale = model.config.head_dim**-0.5

    def forward(self, input_ids, positions, k_cache, v_cache, block_tables):
        b, t = input_ids.shape
        ctx = GatheredContextAttention(k_cache, v_cache, block_tables, positions, self.scale)
        hidden = self.model(input_ids.reshape(-1), positions.reshape(-1), ctx)  # (B*T, hidden)
        last = hidden.view(b, t, -1)[:, -1]  # (B, hidden)
        logits = self.model.compute_logits(last)  # (B, V) fp32
        return logits, torch.stack(ctx.new_k), torch.stack(ctx.new_v)  # (L, B, T, Hkv, D) each


def example_inputs(model: LlamaForCausalLM, batch=2, tokens=3, num_blocks=4, block_size=4, table_width=2,
                   dtype=torch.float32):
    """Small inputs for tracing; every dimension distinct from the others so none is specialised by accident."""
    cfg = model.config
    shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    positions = torch.arange(tokens).repeat(batch, 1) + 1  # (B, T): one old token per row
    return (
        torch.zeros(batch, tokens, dtype=torch.int64),
        positions,
        torch.zeros(shape, dtype=dtype),
        torch.zeros(shape, dtype=dtype),
        torch.arange(batch * table_width, dtype=torch.int64).view(batch, table_width) % num_blocks,
    )


DYNAMIC_AXES = {
    "input_ids": {0: "batch", 1: "tokens"},
    "positions": {0: "batch", 1: "tokens"},
    "k_cache": {1: "num_blocks"},
    "v_cache": {1: "num_blocks"},
    "block_tables": {0: "batch", 1: "table_width"},
    "logits": {0: "batch"},
    "new_k": {1: "batch", 2: "tokens"},
    "new_v": {1: "batch", 2: "tokens"},
}
