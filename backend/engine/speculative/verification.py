"""Verification: the served model's tokens at every proposal position -> each sequence's accepted run.

A verify step computes logits at the sequence's last known token and at each of its k proposals (k + 1
rows). Row j is sampled exactly as a plain decode step would sample the token after the text plus the
first j proposals: same processors (penalties and min_tokens see those j proposals as output), same
temperature, top-k/p, min-p, and the request's own generator. Proposal j + 1 is accepted while it equals
row j's token; the first row whose token differs gives the correction, and when all k are accepted row k
gives the bonus token. So every step emits between 1 and k + 1 tokens.

Why this is rejection sampling (Leviathan et al. 2023, Chen et al. 2023): both proposers propose
deterministically (a copy, or the draft model's argmax), so the proposal distribution q is a point mass
on the proposal d. Their rule accepts d with probability min(1, p(d) / q(d)) = p(d) and otherwise samples
from norm(max(p - q, 0)), which is p with d removed. Sampling x ~ p and accepting iff x == d does the same:
P(accept) = p(d), and a rejected x is distributed as p conditioned on x != d. Hence the output has the
target's distribution, greedy output is the target's argmax token for token, and a seeded request draws
from its own generator in a fixed order (reproducible for a given configuration).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.sequence import Sequence


@dataclass
class VerifyRows:
    """The rows to sample in a step where some sequences verify proposals, in sample_indices order."""

    logits_rows: list[int] = field(default_factory=list)  # row of the runner's logits for each sampled row
    proposals: list[list[int]] = field(default_factory=list)  # per sampled sequence ([] when it proposed none)
    params: list[SamplingParams] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    output_token_ids: list[list[int]] = field(default_factory=list)  # output + the proposals before the row
    generators: list[torch.Generator | None] = field(default_factory=list)
    stop_token_ids: list[frozenset[int]] = field(default_factory=list)

    @classmethod
    def build(cls, scheduled: list[tuple[Sequence, int]], sample_indices: list[int]) -> "VerifyRows":
        """`scheduled` and `sample_indices` of the step. The runner's logits hold one row per scheduled
        sequence (its last new token), preceded by one row per proposal for a verifying sequence."""
        first_row, row = [], 0
        for seq, _ in scheduled:
            first_row.append(row)
            row += 1 + len(seq.spec_token_ids)
        rows = cls()
        for i in sample_indices:
            seq = scheduled[i][0]
            proposals = list(seq.spec_token_ids)
            rows.proposals.append(proposals)
            output = seq.output_token_ids
            for j in range(len(proposals) + 1):
                rows.logits_rows.append(first_row[i] + j)
                rows.params.append(seq.params)
                rows.prompt_token_ids.append(seq.prompt_token_ids)
                rows.output_token_ids.append(output + proposals[:j] if j else output)
                rows.generators.append(seq.generator)
                rows.stop_token_ids.append(seq.stop_token_ids)
        return rows


def accepted_runs(sampled: list[int], proposals: list[list[int]]) -> list[tuple[int, int]]:
    """(first sampled row, number of tokens emitted) per sequence: its proposals up to the first that
    differs from the target's token at its position, then the target's token there (correction or bonus)."""
    runs, row = [], 0
    for props in proposals:
        accepted = 0
        while accepted < len(props) and sampled[row + accepted] == props[accepted]:
            accepted += 1
        runs.append((row, accepted + 1))
        row += len(props) + 1
    return runs
