"""Prompt logprobs: the log-probability of each prompt token given the ones before it (vLLM's prompt_logprobs).

A prefill step whose sequences ask for them computes the logits of those positions too (prepare_step's
prompt_logprob_rows, after the rows the sampler reads). Position p's logits give token p + 1's logprob: the
raw log_softmax, before logit_bias, penalties or temperature, as the sampled tokens' logprobs; and the token's
rank there (1 + the tokens likelier than it, so tied tokens share a rank, as vLLM counts). One host copy per
such step; only requests that ask pay for it.
"""

from __future__ import annotations

import torch

from kvtriton.backend.engine.outputs import TokenLogprob
from kvtriton.backend.engine.sequence import Sequence


def split_prompt_logits(logits: torch.Tensor, num_prompt_rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the rows the sampler or the verifier read, the prompt rows after them)."""
    if not num_prompt_rows:
        return logits, None
    return logits[:-num_prompt_rows], logits[-num_prompt_rows:]


def record_prompt_logprobs(rows: list[tuple[int, range]], scheduled: list[tuple[Sequence, int]],
                           logits: torch.Tensor, vocab_size: int) -> None:
    """Append each sequence's new prompt logprobs to seq.prompt_logprobs. `rows`: StepInput.prompt_logprob_rows;
    `logits`: their rows, in that order."""
    seqs = [scheduled[row][0] for row, _ in rows]
    targets = [seq.prompt_token_ids[p + 1] for seq, (_, positions) in zip(seqs, rows) for p in positions]
    logprobs = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)
    chosen_t = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])  # (rows, 1)
    chosen, ranks = chosen_t[:, 0].tolist(), ((logprobs > chosen_t).sum(dim=-1) + 1).tolist()
    top_n = max(seq.params.prompt_logprobs for seq in seqs)
    top_ids = top_lps = None
    if top_n:
        top = logprobs.topk(top_n, dim=-1)
        top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    row = 0
    for seq, (_, positions) in zip(seqs, rows):
        for _ in positions:
            seq.prompt_logprobs.append(TokenLogprob.from_rows(targets[row], row, seq.params.prompt_logprobs, chosen,
                                                              top_ids, top_lps, ranks))
            row += 1
