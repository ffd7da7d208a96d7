"""GatheredContextAttention: the attention of the exported step graph (backend/runners/step_graph.py).

It never writes the pools: it attends over the gathered *old* context (slots
whose position precedes the row's first new token) plus the new tokens' own
K/V (causal), and collects the new K/V for the runner to write. Plain ops only
(Gather, MatMul, Softmax, Where), so onnxruntime and TensorRT's parser take it.
"""

from __future__ import annotations

import torch

from kvtriton.backend.attention.kv_cache import gather_kv


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
        keys = torch.cat([gather_kv(self.k_cache[layer_idx], self.block_tables), k], dim=1)  # (B, S+T, Hkv, D)
        values = torch.cat([gather_kv(self.v_cache[layer_idx], self.block_tables), v], dim=1)
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
