"""Which sequences speculate this step, and with how many proposals.

The back-off rule: verifying k proposals costs k more tokens of compute per sequence. At a small batch the
step is bound by reading the weights, so those tokens are nearly free; once the batch is large, the step
is compute-bound and they cost as much as they save. So a step with `speculative_disable_by_batch_size`
running sequences or more does not speculate at all (vLLM v0's setting of that name did the same); below
it each sequence proposes its request's k, capped so that no proposal lands past max_tokens or
max_model_len (a proposal there could never be emitted), and the sum of the step's proposals is kept
within the token budget by the scheduler.
"""

from __future__ import annotations

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.sequence import Sequence


def speculation_allowed(config: EngineConfig, num_running: int) -> bool:
    limit = config.speculative_disable_by_batch_size
    return config.speculative_enabled and (limit == 0 or num_running < limit)


def proposal_lengths(running: list[Sequence], max_model_len: int) -> tuple[list[Sequence], list[int]]:
    """The running sequences that may speculate now and their k: in decode (every known token but the
    last computed, nothing in flight), with a request k > 0 and room for a proposal."""
    seqs, ks = [], []
    for seq in running:
        if not seq.num_speculative_tokens or seq.num_placeholders or seq.num_computed_tokens != seq.num_tokens - 1:
            continue
        room = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - seq.num_tokens) - 1
        k = min(seq.num_speculative_tokens, room)
        if k > 0:
            seqs.append(seq)
            ks.append(k)
    return seqs, ks
