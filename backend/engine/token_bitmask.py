"""Allowed-token bitmasks applied to a batch of logits in one op (structured output).

A bitmask row holds one bit per token id, little-endian within int32 words:
token t is allowed when bit t % 32 of word t // 32 is set (llguidance's and
xgrammar's layout). An unconstrained row is all ones (-1).
"""

from __future__ import annotations

import numpy as np
import torch


def token_set_row(token_ids, width: int) -> np.ndarray:
    """(width,) int32: the bitmask row allowing exactly `token_ids` (ids past width * 32 are dropped)."""
    bits = np.zeros(width * 32, dtype=np.uint8)
    ids = np.asarray(token_ids, dtype=np.int64)
    bits[ids[ids < width * 32]] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf, in place, for every row at once; returns `logits`.

    logits (B, V) float; bitmask (B, W) int32 on the same device, W * 32 >= V (bits past V are ignored).
    """
    batch, vocab = logits.shape
    if bitmask.shape[0] != batch or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"bitmask of shape {tuple(bitmask.shape)} does not cover logits of shape {(batch, vocab)}")
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)  # (32,)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (B, W, 32); & 1 also clears an arithmetic shift's sign bits
    allowed = bits.view(batch, -1)[:, :vocab].bool()  # (B, V)
    return logits.masked_fill_(~allowed, float("-inf"))
