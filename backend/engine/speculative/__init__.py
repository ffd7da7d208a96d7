"""Speculative decoding: proposers guess the next k tokens, the served model verifies them in one step.

- ngram.py: prompt lookup, proposals copied from the prompt and output so far (vLLM's `ngram` method);
- draft.py: a draft model (a checkpoint, or the served model quantized: self-int8 / self-int4) with its own
  runner and paged KV pool;
- policy.py: which sequences speculate this step, with how many proposals (the back-off rule);
- verification.py: the target's tokens at every proposal position -> the accepted run;
- verify_step.py: a verify step's sampling, its accepted runs into the scheduler, and the proposal counts.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.engine.tokenizer import Tokenizer


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """Up to ks[i] proposed tokens to follow seqs[i].token_ids (fewer, or none, where it has no guess)."""

    def close(self) -> None:
        """Free what the proposer holds on the device."""


def create_proposer(config: EngineConfig, tokenizer: Tokenizer, num_blocks: int, device: torch.device,
                    dtype: torch.dtype, max_model_len: int, vocab_size: int,
                    served_quantization: str | None = None) -> Proposer | None:
    """The proposer of config.speculative_method; None when speculation is off. served_quantization: the scheme
    the served model's weights are in (None: full precision)."""
    if config.speculative_method == "ngram":
        from kvtriton.backend.engine.speculative.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.speculative_method == "draft":
        from kvtriton.backend.engine.speculative.draft import DraftProposer, draft_pool_blocks

        return DraftProposer.create(config, tokenizer, draft_pool_blocks(config, num_blocks, max_model_len), device,
                                    dtype, max_model_len, vocab_size, served_quantization)
    return None
