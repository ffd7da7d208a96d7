"""The shapes the CUDA runner captures graphs for: batch, context, verify and prefill buckets.

A CUDA graph replays fixed shapes, so every step is padded up to a captured bucket: more buckets cost capture
time and memory, fewer cost padded work. These functions say which buckets, from the config alone (no GPU), so
that runners/torch_runner.py captures them and tests check the rules.
"""

from __future__ import annotations

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # decode batch sizes, as vLLM's capture sizes double
# Verify-step CUDA graphs cover batches up to this many rows (batch x Q): their logits buffers stay allocated,
# and a larger verify step is compute-bound, where one launch per kernel costs little.
MAX_VERIFY_GRAPH_ROWS = 256
# The smallest token bucket of the prefill graphs; they double from here up to max_prefill_graph_tokens.
MIN_PREFILL_GRAPH_TOKENS = 16
# Past this many tokens a step is long enough that a doubling bucket would pad it by up to as much device work
# again: larger buckets grow by an eighth of the power of two below (1024, 1152, ... 2048, 2304, ...; at most 1/8
# of a step is padding), each for the largest sequence bucket only (a padding sequence costs its logits row alone:
# the varlen kernel's grid follows the tokens, not the sequences).
FINE_PREFILL_GRAPH_TOKENS = 512


def batch_buckets(max_num_seqs: int) -> list[int]:
    """The decode graphs' batch sizes: BATCH_BUCKETS up to max_num_seqs, and max_num_seqs itself."""
    sizes = [b for b in BATCH_BUCKETS if b <= max_num_seqs]
    return sizes if sizes[-1] == max_num_seqs else [*sizes, max_num_seqs]


def context_buckets(first: int, max_blocks: int) -> list[int]:
    """Block-table widths a decode graph is captured for: doubling from `first` up to max_blocks. The attention
    kernel reads only each context's own blocks, so its one bucket (first = its widest table) serves every
    context; the PyTorch path gathers the table's width, so its buckets double from 8."""
    buckets = [first]
    while buckets[-1] < max_blocks:
        buckets.append(buckets[-1] * 2)
    return sorted({min(b, max_blocks) for b in buckets})


def verify_buckets(q: int, most: int, batch_sizes: list[int]) -> list[int]:
    """The verify graphs' batch buckets for Q query rows a sequence, up to `most` sequences (the largest batch
    that speculates), each of at most MAX_VERIFY_GRAPH_ROWS rows; a batch past the last runs eagerly."""
    sizes = [b for b in batch_sizes if b < most] + [next(b for b in batch_sizes if b >= most)]
    return [b for b in sizes if b * q <= MAX_VERIFY_GRAPH_ROWS]


def prefill_buckets(limit: int, batch_sizes: list[int]) -> list[tuple[int, int]]:
    """The (tokens, sequences) buckets of the prefill-step graphs up to `limit` tokens: tokens doubling from
    MIN_PREFILL_GRAPH_TOKENS to FINE_PREFILL_GRAPH_TOKENS, by the decode graphs' batch buckets (at most one
    sequence a token); past it, in steps of an eighth of the power of two below, by the largest batch bucket
    alone. Empty for a limit of 0."""
    if not limit:
        return []
    tokens = [MIN_PREFILL_GRAPH_TOKENS]
    while tokens[-1] < limit:
        t = tokens[-1]
        step = t if t < FINE_PREFILL_GRAPH_TOKENS else (1 << (t.bit_length() - 1)) // 8  # doubling, then eighths
        tokens.append(min(t + step, limit))
    return ([(t, b) for t in tokens if t <= FINE_PREFILL_GRAPH_TOKENS for b in batch_sizes if b <= t]
            + [(t, batch_sizes[-1]) for t in tokens if t > FINE_PREFILL_GRAPH_TOKENS])
