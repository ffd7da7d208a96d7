"""Prompt lookup (n-gram) proposer, as vLLM's `ngram` method and HF's prompt_lookup_num_tokens.

The last n tokens of the text (prompt + output) are looked up earlier in the same text, longest n first
(prompt_lookup_max down to prompt_lookup_min); at the most recent match, the k tokens that followed it
are the proposal. No model runs, so a proposal costs microseconds; it pays off where the output quotes
its input: summaries, edits, code.
"""

from __future__ import annotations

import numpy as np

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
    `tokens` with min_n <= n <= max_n tokens; [] when no such suffix occurs earlier.

    One pass over the text finds where its last token occurred before (each such place is followed by a
    token); the suffix is then extended backwards from those few places only, up to max_n tokens, so a
    round costs O(length + matches * max_n), not a comparison of every window for every n."""
    length = len(tokens)
    longest = min(max_n, length - 1)
    if longest < min_n:
        return []
    ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])  # where an occurrence would end
    if not len(ends):
        return []
    matched = np.ones(len(ends), dtype=np.int64)  # tokens matched backwards from each end, up to `longest`
    alive = np.ones(len(ends), dtype=bool)
    for j in range(1, longest):
        before = ends - j
        alive &= (before >= 0) & (tokens[np.maximum(before, 0)] == tokens[length - 1 - j])
        if not alive.any():
            break
        matched += alive
    best = int(matched.max())
    if best < min_n:
        return []
    end = int(ends[np.flatnonzero(matched >= best)[-1]])  # the most recent of the longest
    return tokens[end + 1 : end + 1 + k].tolist()
