"""StepInput: the tensors one engine step feeds a runner, built from the scheduler's decision.

Shared by every runner (torch, onnxruntime, tensorrt), so that they all see the
same packed layout: the step's new tokens of all sequences concatenated, the
decode group first (see attention.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from kvtriton.backend.attention.metadata import AttentionMetadata
from kvtriton.backend.kernels.device_copy import to_device
from kvtriton.backend.models.lora import StepAdapters


class ScheduledSequence(Protocol):
    """What a step needs of a scheduled sequence (the engine's Sequence has it; runners never import it)."""

    token_ids: list[int]  # prompt + the generated tokens the host knows
    num_computed_tokens: int  # tokens with K/V in the pools once this step ran (this step's included)
    block_ids: list[int]  # the block table, covering num_computed_tokens
    spec_token_ids: list[int]  # speculative proposals scheduled after token_ids (verified by this step)
    lora_adapter: int  # the LoRA adapter its tokens run through, 1-based (0: the base model; models/lora.py)


@dataclass
class StepInput:
    input_ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    attn: AttentionMetadata
    # (M,) int64: the packed tokens whose logits are computed: each sequence's last new token, and for a
    # sequence that verifies proposals every one of its new tokens (M = B + the proposals).
    last_token_indices: torch.Tensor
    # One int64 buffer behind input_ids, positions, slot_mapping, context_lens and last_token_indices, in
    # that order (one host-to-device copy per step). In a decode-only step (N == B) it is a (5, B) matrix.
    packed: torch.Tensor | None = None
    # (packed position, row in `scheduled`) of each token the host does not know yet (sampled by the step
    # in flight, async scheduling): its input_ids entry holds 0 until the engine fills it from the device.
    placeholders: list[tuple[int, int]] | None = None
    # Prompt logprobs: (row in `scheduled`, positions) of the prompt tokens whose logits this step also
    # computes; their rows come last in last_token_indices, after every row above, in this order.
    prompt_logprob_rows: list[tuple[int, range]] | None = None
    # The step's LoRA adapters (each packed token's, 0: the base model); None when no sequence of the step has
    # one, so that base-model steps carry nothing for them.
    adapters: StepAdapters | None = None
    # Every sequence of the step decodes one token or verifies proposals: no prompt chunk, no prompt logprobs.
    # Each new token is then a decode row of its own (the CPU's one-call decode step takes such steps).
    verify_only: bool = False

    @property
    def num_prompt_logit_rows(self) -> int:
        return sum(len(positions) for _, positions in self.prompt_logprob_rows or ())

    @property
    def num_seqs(self) -> int:
        return len(self.attn.query_lens)


def prepare_step(scheduled: Sequence[tuple[ScheduledSequence, int]], block_size: int, device,
                 prompt_logprob_rows: list[tuple[int, range]] | None = None) -> StepInput:
    """scheduled: (sequence, new tokens) with one-token sequences first.

    A sequence whose newest token is still on the device (a placeholder: at most one, the last of its
    new tokens) gets input id 0 there, listed in `placeholders`. `prompt_logprob_rows`: (row in `scheduled`,
    positions among its new tokens) whose logits are also wanted, as StepInput.prompt_logprob_rows."""
    block_tables = [seq.block_ids for seq, _ in scheduled]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    last: list[int] = []
    placeholders: list[tuple[int, int]] = []
    for row, ((seq, n), table) in enumerate(zip(scheduled, block_tables)):
        start = seq.num_computed_tokens - n
        if n == 1:  # a decode: the hot path, one token
            if start < len(seq.token_ids):
                ids.append(seq.token_ids[start])
            else:
                placeholders.append((len(ids), row))
                ids.append(0)
            positions.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
            query_lens.append(1)
            context_lens.append(start + 1)
            last.append(len(ids) - 1)
            continue
        known = seq.token_ids[start : start + n]
        ids += known
        if seq.spec_token_ids:  # verify: the proposals follow the last known token; logits at every one
            ids += seq.spec_token_ids
            last += range(len(ids) - n, len(ids) - 1)
        elif len(known) < n:
            placeholders.append((len(ids), row))
            ids.append(0)
        positions += range(start, start + n)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        query_lens.append(n)
        context_lens.append(start + n)
        last.append(len(ids) - 1)
    if prompt_logprob_rows:  # after every other row: the rows the sampler and the verifier read stay first
        starts = list(itertools.accumulate(query_lens, initial=0))
        for row, wanted in prompt_logprob_rows:
            first = scheduled[row][0].num_computed_tokens - scheduled[row][1]  # the position of the row's first token
            last += [starts[row] + p - first for p in wanted]
    width = max(len(t) for t in block_tables)
    padded = np.zeros((len(block_tables), width), dtype=np.int64)  # numpy: rows copy at C speed
    for row, table in enumerate(block_tables):
        padded[row, : len(table)] = table
    num_decodes = sum(1 for n in query_lens if n == 1)  # the scheduler puts them first
    decode_blocks = max((-(-c // block_size) for c in context_lens[:num_decodes]), default=0)

    packed = torch.from_numpy(np.array(ids + positions + slots + context_lens + last, dtype=np.int64))
    step = unpack_step(to_device(packed, device), to_device(torch.from_numpy(padded), device),
                       len(ids), num_decodes, query_lens, context_lens, decode_blocks)
    step.placeholders = placeholders
    step.prompt_logprob_rows = prompt_logprob_rows or None
    step.verify_only = not prompt_logprob_rows and all(n == 1 or seq.spec_token_ids for seq, n in scheduled)
    row_adapters = [seq.lora_adapter for seq, _ in scheduled]
    if any(row_adapters):
        tokens = to_device(torch.from_numpy(np.repeat(np.array(row_adapters, dtype=np.int64), query_lens)), device)
        step.adapters = StepAdapters.of_rows(tokens, row_adapters)
    return step


def unpack_step(packed: torch.Tensor, block_tables: torch.Tensor, num_tokens: int, num_decodes: int,
                query_lens: list[int], context_lens: list[int], decode_context_blocks: int) -> StepInput:
    """The StepInput over one packed buffer (see StepInput.packed) and its block tables (B, MB); the host
    lists as prepare_step made them. Tensor-parallel ranks rebuild rank 0's step with it."""
    n, b = num_tokens, len(query_lens)
    return StepInput(
        input_ids=packed[:n],
        positions=packed[n : 2 * n],
        attn=AttentionMetadata(
            slot_mapping=packed[2 * n : 3 * n],
            block_tables=block_tables,
            context_lens=packed[3 * n : 3 * n + b],
            num_decodes=num_decodes,
            query_lens=query_lens,
            context_lens_host=context_lens,
            decode_context_blocks=decode_context_blocks,
        ),
        last_token_indices=packed[3 * n + b :],
        packed=packed,
    )
