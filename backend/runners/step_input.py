"""StepInput: the tensors one engine step feeds a runner, built from the scheduler's decision.

Shared by every runner (torch, onnxruntime, tensorrt), so that they all see the
same packed layout: the step's new tokens of all sequences concatenated, the
decode group first (see attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from kvtriton.backend.attention.metadata import AttentionMetadata


class ScheduledSequence(Protocol):
    """What a step needs of a scheduled sequence (the engine's Sequence has it; runners never import it)."""

    token_ids: list[int]  # prompt + generated
    num_computed_tokens: int  # tokens whose K/V are already in the pools
    block_ids: list[int]  # the block table, covering num_computed_tokens + this step's tokens


@dataclass
class StepInput:
    input_ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    attn: AttentionMetadata
    last_token_indices: torch.Tensor  # (B,) int64: each sequence's last new token in the packed batch
    # One int64 buffer behind input_ids, positions, slot_mapping, context_lens and last_token_indices, in
    # that order (one host-to-device copy per step). In a decode-only step (N == B) it is a (5, B) matrix.
    packed: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.attn.query_lens)


def prepare_step(scheduled: Sequence[tuple[ScheduledSequence, int]], block_size: int, device) -> StepInput:
    """scheduled: (sequence, new tokens) with one-token sequences first."""
    block_tables = [seq.block_ids for seq, _ in scheduled]
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

    n, b = len(ids), len(query_lens)
    packed = torch.tensor(ids + positions + slots + context_lens + last, dtype=torch.int64)
    packed = packed.pin_memory() if str(device).startswith("cuda") else packed
    packed = packed.to(device, non_blocking=True)
    input_ids, positions_t, slots_t = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n]
    context_lens_t, last_t = packed[3 * n : 3 * n + b], packed[3 * n + b :]
    return StepInput(
        input_ids=input_ids,
        positions=positions_t,
        attn=AttentionMetadata(
            slot_mapping=slots_t,
            block_tables=torch.tensor(padded, dtype=torch.int64).to(device, non_blocking=True),
            context_lens=context_lens_t,
            num_decodes=num_decodes,
            query_lens=query_lens,
            context_lens_host=context_lens,
            decode_context_blocks=decode_blocks,
        ),
        last_token_indices=last_t,
        packed=packed,
    )
