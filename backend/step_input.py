"""StepInput: the tensors one engine step feeds a runner, built from the scheduler's decision.

Shared by every runner (torch, onnxruntime, tensorrt), so that they all see the
same packed layout: the step's new tokens of all sequences concatenated, the
decode group first (see attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtriton.backend.attention import AttentionMetadata
from kvtriton.backend.sequence import Sequence


@dataclass
class StepInput:
    input_ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    attn: AttentionMetadata
    last_token_indices: torch.Tensor  # (B,) int64: each sequence's last new token in the packed batch

    @property
    def num_seqs(self) -> int:
        return len(self.attn.query_lens)


def prepare_step(
    scheduled: list[tuple[Sequence, int]], block_tables: list[list[int]], block_size: int, device
) -> StepInput:
    """scheduled: (sequence, new tokens) with one-token sequences first; block_tables: each one's table."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    last: list[int] = []
    for (seq, n), table in zip(scheduled, block_tables):
        start = seq.num_computed_tokens
        ids += seq.token_ids[start : start + n]
        positions += range(start, start + n)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        query_lens.append(n)
        context_lens.append(start + n)
        last.append(len(ids) - 1)
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    num_decodes = sum(1 for n in query_lens if n == 1)  # the scheduler puts them first
    decode_blocks = max((-(-c // block_size) for c in context_lens[:num_decodes]), default=0)

    def tensor(values):
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    return StepInput(
        input_ids=tensor(ids),
        positions=tensor(positions),
        attn=AttentionMetadata(
            slot_mapping=tensor(slots),
            block_tables=tensor(padded),
            context_lens=tensor(context_lens),
            num_decodes=num_decodes,
            query_lens=query_lens,
            context_lens_host=context_lens,
            decode_context_blocks=decode_blocks,
        ),
        last_token_indices=tensor(last),
    )
