"""Split an engine step (packed tokens, backend/runners/step_input.py) into the step graph's dense (B, T) calls.

The graph (backend/runners/step_graph.py) takes B sequences with T new tokens each.
The decode group (one new token per sequence, first in the packed batch) is
one call; every longer chunk (a prefill) is a call of its own. Shared by
the onnxruntime and tensorrt runners, so both feed the graph the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtriton.backend.runners.step_input import StepInput


@dataclass
class StepGroup:
    input_ids: torch.Tensor  # (B, T) int64
    positions: torch.Tensor  # (B, T) int64
    block_tables: torch.Tensor  # (B, MB) int64: only the columns that hold old context (>= 1 column)
    slot_mapping: torch.Tensor  # (B*T,) int64: pool slot of each new token, row-major


def split_step(step: StepInput, block_size: int, device: torch.device) -> list[StepGroup]:
    """-> the step's calls, their tensors on `device` (the runner's, which may differ from the engine's)."""
    meta = step.attn
    groups: list[StepGroup] = []
    nd = meta.num_decodes
    if nd:
        groups.append(_group(step, 0, nd, slice(0, nd), 1, block_size, device))
    start = nd
    for i in range(nd, len(meta.query_lens)):
        qlen = meta.query_lens[i]
        groups.append(_group(step, start, start + qlen, slice(i, i + 1), qlen, block_size, device))
        start += qlen
    return groups


def _group(step: StepInput, lo: int, hi: int, seqs: slice, t: int, block_size: int, device) -> StepGroup:
    meta = step.attn
    old_tokens = [c - t for c in meta.context_lens_host[seqs]]
    # At least one column, so that no dimension is 0 (TensorRT profiles reject empty shapes); a column
    # beyond a row's old context is masked by position inside the graph.
    width = max(1, max(-(-n // block_size) for n in old_tokens))
    return StepGroup(
        input_ids=step.input_ids[lo:hi].reshape(-1, t).to(device).contiguous(),
        positions=step.positions[lo:hi].reshape(-1, t).to(device).contiguous(),
        block_tables=step.attn.block_tables[seqs, :width].to(device).contiguous(),
        slot_mapping=meta.slot_mapping[lo:hi].to(device).contiguous(),
    )
