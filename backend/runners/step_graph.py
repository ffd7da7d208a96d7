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

from kvtriton.backend.attention.gathered import GatheredContextAttention
from kvtriton.backend.models.llama import LlamaForCausalLM

INPUT_NAMES = ["input_ids", "positions", "k_cache", "v_cache", "block_tables"]
OUTPUT_NAMES = ["logits", "new_k", "new_v"]


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
