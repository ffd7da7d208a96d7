"""Stops a sequence at the first stop string in its streamed text, across delta boundaries.

A stop string may arrive split over several deltas ("<|e" "nd" "|>"), so text that could still
become the start of one is held back until it is disproved; the stop string and everything
after it are never streamed. Work per feed is bounded by the delta and the longest stop string,
never by the length of the output.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Per-sequence filter between the detokenizer and the client; used by one thread.

    Invariant: everything emitted so far is free of stop strings, and `_held` is the longest
    suffix of the text seen that is a proper prefix of some stop string (shorter than it).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            raise TypeError("stop must be a list of strings, not one string (wrap it in a list)")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        # Every proper prefix of every stop string: the candidates for held-back text.
        self._prefixes = frozenset(s[:n] for s in self.stop for n in range(1, len(s)))
        self._max_held = max((len(s) - 1 for s in self.stop), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the sequence, once `stopped`."""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to stream now, whether a stop string has just ended the sequence)."""
        if self.stopped:
            raise RuntimeError("StopStringMatcher.feed() called after a stop string ended the sequence")
        if not self.stop:
            return delta, False
        text = self._held + delta
        # Earliest start wins; earlier text was free of stop strings, so only `text` is searched.
        start, matched = min(
            ((i, s) for s in self.stop if (i := text.find(s)) >= 0), default=(-1, None), key=lambda m: m[0]
        )
        if matched is not None:
            self.stopped, self.matched, self._held = True, matched, ""
            return text[:start], True
        keep = self._held_suffix_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release held-back text when the sequence ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return held

    def _held_suffix_len(self, text: str) -> int:
        for n in range(min(self._max_held, len(text)), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0
