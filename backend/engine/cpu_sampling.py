"""The random draw and the top-k / top-p filters on a CPU, where sorting and per-token noise are the cost.

The device path (sampler.py) sorts every row and draws one exponential per vocabulary entry (vLLM's
exponential race): on a GPU that is a few microseconds and needs no host sync. On a CPU the same work is
most of a small model's step: over a 49,152-token vocabulary a stable sort takes 3.6 ms a row and the
exponentials 0.9 ms a row (2-core VM), against a ~7 ms decode step for the default model; 32 rows at once,
60 and 28 ms. Here, with the same semantics:

- top-k / top-p keep a prefix of each row's descending order, so they are a threshold on the logits. It is
  found among the row's CANDIDATES largest logits (torch.topk, linear in V), then among more of them, and
  by a full sort only for a row whose 4,096 largest hold less than its top_p mass. Whichever width decides
  a row, its threshold comes from the same leading values summed in the same order: the same bits whatever
  its neighbours needed.
- the draw is inverse-CDF: one uniform number a row (from the row's own generator when seeded), against
  the cumulative sum of its probabilities.

A CPU has no device to sync with, so reading a row's coverage on the host costs nothing here.
"""

from __future__ import annotations

import torch

# Leading logits searched for the top-p threshold, then for the rows it does not decide, then the whole order.
# The default model, 32 streams, temperature 1 / 0.7, top_p 0.9 / 0.95: 256 decide 89% / ~100% of rows (a 135M
# model's distributions are flat at temperature 1); torch.topk of 4,096 of 49,152 logits takes 0.5 ms a row,
# a full sort 3.6-4.0.
CANDIDATES = 256
WIDER = (4096, float("inf"))


def top_k_top_p_(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask `logits` (B, V) fp32 in place to each row's top-k tokens, then to the smallest leading set of them
    whose probability (renormalised over the top-k, vLLM's order) reaches top_p. top_k (B,) holds V where a
    row has none, top_p (B,) 1 where a row has none. Every row keeps its largest logit; ties with a row's last
    kept logit are kept too."""
    batch, vocab = logits.shape
    k = top_k if top_k is not None else torch.full((batch,), vocab, dtype=torch.long)
    p = top_p if top_p is not None else torch.ones(batch)
    k_wanted = k[k < vocab]
    # Enough candidates for every row's top-k; rows with only a top-p start from CANDIDATES.
    only_p = top_p is not None and len(k_wanted) < batch
    width = min(vocab, max(CANDIDATES if only_p else 1, int(k_wanted.max()) if len(k_wanted) else 1))
    values = logits.topk(width, dim=-1).values  # (B, width), descending
    threshold, covered = _thresholds(values, logits, k, p)
    missing = (~covered).nonzero().flatten()
    for wider in WIDER:  # rows whose top_p mass lies past the candidates: more of their order, those rows only
        if not len(missing):
            break
        rows = logits[missing]
        values = rows.topk(min(wider, vocab), dim=-1).values if wider < vocab else rows.sort(
            dim=-1, descending=True).values
        threshold[missing], covered = _thresholds(values, rows, k[missing], p[missing])
        missing = missing[~covered]
    return logits.masked_fill_(logits < threshold.unsqueeze(1), float("-inf"))


def _thresholds(values: torch.Tensor, logits: torch.Tensor, k: torch.Tensor,
                p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values (B, W): each row's W largest logits, descending. -> (each row's smallest kept logit, -inf where
    nothing is filtered; whether the W values decide the row)."""
    width, vocab = values.shape[1], logits.shape[1]
    position = torch.arange(width).unsqueeze(0)  # (1, W)
    in_top_k = position < k.unsqueeze(1)  # (B, W)
    # The distribution top-p measures: over the top-k where a row has one, else over the whole row.
    has_k = k < vocab
    norm = values.masked_fill(~in_top_k, float("-inf")).logsumexp(dim=-1)  # (B,)
    if not has_k.all():
        norm = torch.where(has_k, norm, logits.logsumexp(dim=-1))
    probs = (values - norm.unsqueeze(1)).exp_().masked_fill_(~in_top_k, 0.0)  # (B, W)
    mass = probs.cumsum(dim=-1)  # (B, W)
    has_p = p < 1.0
    # A token is kept while the mass before it is short of p (the first always is).
    keep = in_top_k & (~has_p.unsqueeze(1) | (mass - probs < p.unsqueeze(1)))  # (B, W), a prefix of each row
    # A row with no finite logit (its constraints allow no token in common, as a guided_* grammar with
    # allowed_token_ids may) keeps none: it takes its first value (-inf) and filters nothing, so that the request
    # ends with the error that names its constraints, not the whole step with an index error.
    last = (keep.sum(dim=-1) - 1).clamp_(min=0)  # (B,)
    threshold = values.gather(1, last.unsqueeze(1)).squeeze(1)
    threshold = torch.where(has_k | has_p, threshold, float("-inf"))
    # Decided here: the row's top-k lies within W (then so does its top-p set), or it has no top-k and its W
    # values already hold p.
    covered = (k <= width) | (~has_k & (~has_p | (mass[:, -1] >= p)))
    return threshold, covered


def inverse_cdf_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """probs (B, V), rows summing to ~1 -> (B,) token ids, each drawn with its probability: the first token
    whose cumulative probability exceeds u * the row's total, u ~ U[0, 1). A token of probability 0 is never
    drawn (the sum does not grow there). A seeded row draws u from its own generator only."""
    batch = probs.shape[0]
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(batch, 1) if len(generators) < batch else torch.empty(batch, 1)
    for row, generator in generators.items():
        u[row] = torch.rand(1, generator=generator)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1)
    return token.squeeze(1).clamp_(max=probs.shape[1] - 1)
