"""EngineStats: what an engine reports of itself after each step (the metrics' gauges and counters)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """EngineStats(): an engine that has done nothing yet."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    num_preemptions: int = 0  # since start
    num_prompt_tokens: int = 0  # computed prompt tokens since start (prefix hits excluded)
    num_generation_tokens: int = 0  # since start
    # Prefix cache, since start: prompt tokens looked up when a request was first scheduled, and those found.
    num_prefix_cache_queries: int = 0
    num_prefix_cache_hits: int = 0
    # Speculative decoding, since start: proposals verified, and how many of them were accepted.
    num_spec_proposed_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    num_spec_drafts: int = 0  # sequence-steps that verified at least one proposal (vLLM's num_drafts)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verifying sequence gains per verify step: 1 + accepted / drafts (vLLM's definition)."""
        return 1 + self.num_spec_accepted_tokens / self.num_spec_drafts if self.num_spec_drafts else 0.0
