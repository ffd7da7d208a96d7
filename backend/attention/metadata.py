"""AttentionMetadata: what one step tells attention about its packed batch.

Batch order invariant: the `num_decodes` one-token sequences come first in the
packed batch, then each longer chunk (a prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (N,) int64: flat pool slot of each new token
    block_tables: torch.Tensor  # (B, MB) int64: block ids per sequence, padded
    context_lens: torch.Tensor  # (B,) int64: tokens in context after this step, new ones included
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    query_lens: list[int]  # host copy: new tokens per sequence (B,)
    context_lens_host: list[int]  # host copy of context_lens
    decode_context_blocks: int  # block-table columns the decode group gathers (>= its longest context)
    # Every sequence has one new token and block_tables is already cut to the decode width:
    # the CUDA-graph path, which carries no host lists.
    decode_only: bool = False
