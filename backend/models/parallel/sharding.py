"""Which checkpoints split over how many ranks, and the model as one rank sees it.

Megatron's split: each rank owns num_heads / tp query heads and intermediate_size / tp
MLP columns. KV heads are split the same way when there are at least tp of them;
with fewer, each is replicated on tp / num_kv_heads ranks (vLLM's rule), so every
rank still holds exactly one whole KV head per query group it serves.
"""

from __future__ import annotations

import dataclasses

from kvtriton.backend.models.model_config import ModelConfig


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError (one line, naming the sizes that work) when `cfg` does not split over `tp` ranks."""
    why = _why_not(cfg, tp)
    if why:
        sizes = ", ".join(str(t) for t in range(1, cfg.num_heads + 1) if _why_not(cfg, t) is None)
        raise ValueError(f"tensor_parallel_size {tp} {why}; this model splits over {sizes}")


def _why_not(cfg: ModelConfig, tp: int) -> str | None:
    kv = cfg.num_kv_heads
    if cfg.num_heads % tp:
        return f"must divide the model's {cfg.num_heads} attention heads"
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        return (f"and the model's {kv} KV heads: one must divide the other (KV heads are split, or replicated "
                "when fewer than the ranks)")
    if cfg.intermediate_size % tp:
        return f"must divide the model's intermediate_size {cfg.intermediate_size}"
    return None


def num_kv_heads_per_rank(total_kv_heads: int, tp: int) -> int:
    return max(1, total_kv_heads // tp)


def rank_model_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The architecture one rank computes: its heads and MLP columns (its KV pool and kernels see these).
    Vocabulary and hidden size stay whole: the embedding's output and the gathered logits are full width."""
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp,
                               num_kv_heads=num_kv_heads_per_rank(cfg.num_kv_heads, tp),
                               intermediate_size=cfg.intermediate_size // tp)
