"""Stops a sequence at the first stop string in its streamed text, across delta boundaries.

A stop string may arrive split over several deltas ("<|e" "nd" "|>"), so text that could still
become the start of one is held back until it is disproved; everything after the stop string is
never streamed, nor is the stop string itself unless the request asked for it
(`include_stop_str_in_output`, vLLM's).

Cost: one KMP automaton per stop string (its failure table: O(len) memory), fed each new
character once, so a feed costs O(len(delta) * number of stop strings), whatever the length of
the output; the held-back window is shorter than the longest stop string. The request limits
(MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS, checked by `check_stop_strings` before a request is
admitted) bound both.
"""

from __future__ import annotations

from collections.abc import Sequence

# Request limits: a stop list is a client's input, so its size bounds the engine thread's work per token.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


def check_stop_strings(stop: Sequence[str]) -> None:
    """Raise ValueError naming the limit when a stop list is over MAX_STOP_STRINGS or MAX_STOP_STRING_CHARS."""
    check_string_list("stop", stop, MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS, "strings")


def check_string_list(name: str, strings: Sequence[str], max_count: int, max_chars: int, noun: str) -> None:
    """A request's list of strings within its limits (stop strings, bad words): ValueError naming the field."""
    if len(strings) > max_count:
        raise ValueError(f"{name} must hold at most {max_count} {noun}, got {len(strings)}")
    for i, s in enumerate(strings):
        if len(s) > max_chars:
            raise ValueError(f"{name}[{i}] must be at most {max_chars} characters long, got {len(s)}")


class _Automaton:
    """KMP matcher of one stop string. `state`: length of the longest prefix of the stop string that is a
    suffix of the text fed so far."""

    __slots__ = ("stop", "fail", "state")

    def __init__(self, stop: str) -> None:
        self.stop = stop
        # fail[i]: the longest proper prefix of stop[:i + 1] that is also its suffix.
        fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            fail[i] = k
        self.fail = fail
        self.state = 0

    def step(self, ch: str) -> bool:
        """Feed one character; True when the whole stop string has just been seen."""
        stop, k = self.stop, self.state
        while k and ch != stop[k]:
            k = self.fail[k - 1]
        if ch == stop[k]:
            k += 1
        if k == len(stop):
            self.state = self.fail[k - 1]
            return True
        self.state = k
        return False


class StopStringMatcher:
    """Per-sequence filter between the detokenizer and the client; used by one thread.

    Invariant: everything emitted so far is free of stop strings, and `_held` is the longest
    suffix of the text seen that is a proper prefix of some stop string (so shorter than it).

    The stop string that ends the sequence is the one that is complete first in the text (earliest
    end); of two that end at the same character, the longer (it starts earlier).
    """

    def __init__(self, stop: Sequence[str], include_stop: bool = False) -> None:
        if isinstance(stop, str):
            raise TypeError("stop must be a list of strings, not one string (wrap it in a list)")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._automata = [_Automaton(s) for s in self.stop]
        self.include_stop = include_stop  # the text ends with the stop string that ended it, not before it
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the sequence, once `stopped`."""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to stream now, whether a stop string has just ended the sequence)."""
        if self.stopped:
            raise RuntimeError("StopStringMatcher.feed() called after a stop string ended the sequence")
        if not self._automata:
            return delta, False
        text = self._held + delta
        base = len(self._held)  # delta[i] is text[base + i]
        for i, ch in enumerate(delta):
            done = [a.stop for a in self._automata if a.step(ch)]  # every automaton sees every character
            if done:
                matched = max(done, key=len)
                self.stopped, self.matched, self._held = True, matched, ""
                return text[: base + i + 1 - (0 if self.include_stop else len(matched))], True
        keep = max(a.state for a in self._automata)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release held-back text when the sequence ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        for a in self._automata:
            a.state = 0
        return held
