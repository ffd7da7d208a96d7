"""Which sequences speculate this step, and with how many proposals.

The back-off rule: verifying k proposals costs k more tokens of compute per sequence. At a small batch the
step is bound by reading the weights, so those tokens are nearly free; as the batch grows the step turns
compute-bound and they cost as much as they save. So with L = `speculative_disable_by_batch_size` and n
running sequences, a sequence proposes at most

    k(n) = ceil(k * (L - n) / (L - 1))    for n < L   (k at batch 1, tapering to 1 at batch L - 1)
    k(n) = 0                              for n >= L  (no speculation: vLLM v0's setting of that name)

and L = 0 never backs off (k at every batch). Each sequence proposes min(its request's k, k(n)), capped so
that no proposal lands past max_tokens or max_model_len (a proposal there could never be emitted); the sum
of the step's proposals is kept within the token budget by the scheduler.
"""

from __future__ import annotations

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.sequence import Sequence


def proposal_cap(config: EngineConfig, num_running: int) -> int:
    """k(n) above: the most proposals a sequence makes in a step with num_running running sequences."""
    k, limit = config.num_speculative_tokens, config.speculative_disable_by_batch_size
    if not config.speculative_enabled or (limit and num_running >= limit):
        return 0
    if limit <= 1 or num_running <= 1:  # L = 0: never backs off (L = 1 never speculates: n >= L above)
        return k
    return max(1, -(-k * (limit - num_running) // (limit - 1)))


def proposal_lengths(running: list[Sequence], max_model_len: int, cap: int) -> tuple[list[Sequence], list[int]]:
    """The running sequences that may speculate now and their k (at most `cap`, proposal_cap): in decode
    (every known token but the last computed, nothing in flight), with a request k > 0 and room for a
    proposal."""
    seqs, ks = [], []
    for seq in running:
        if not seq.num_speculative_tokens or seq.num_placeholders or seq.num_computed_tokens != seq.num_tokens - 1:
            continue
        room = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - seq.num_tokens) - 1
        k = min(seq.num_speculative_tokens, room, cap)
        if k > 0:
            seqs.append(seq)
            ks.append(k)
    return seqs, ks
