"""Prompt lookup (n-gram) proposer, as vLLM's `ngram` method and HF's prompt_lookup_num_tokens.

The last n tokens of the text (prompt + output) are looked up earlier in the same text, longest n first
(prompt_lookup_max down to prompt_lookup_min); at the most recent match, the k tokens that followed it
are the proposal. No model runs, so a proposal costs microseconds; it pays off where the output quotes
its input: summaries, edits, code.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kvtriton.backend.engine.sequence import Sequence


class NgramProposer:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        return [lookup(np.asarray(seq.token_ids, dtype=np.int64), self.min_n, self.max_n, k)
                for seq, k in zip(seqs, ks)]

    def close(self) -> None:
        pass


def lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """The up to k tokens that followed the most recent earlier occurrence of the longest suffix of
    `tokens` with min_n <= n <= max_n tokens; [] when no such suffix occurs earlier."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows start at 0 .. length - n - 1: each is followed by a token, and none is the suffix itself.
        windows = sliding_window_view(tokens[: length - 1], n)  # (length - n, n)
        starts = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if len(starts):
            start = int(starts[-1]) + n
            return tokens[start : start + k].tolist()
    return []
