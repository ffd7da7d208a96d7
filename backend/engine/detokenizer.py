"""Turns a sequence's growing token ids into UTF-8-safe text deltas for streaming.

Byte-level tokens may end inside a multi-byte character, and decoders such as SentencePiece's
strip the leading space of the first token they see, so a token cannot be decoded on its own.

Three decoders share one contract (concatenated deltas equal the full decode; bounded work a step);
`detokenizer_for` picks one for a sequence:
- `ByteTableDetokenizer`, for byte-level tokenizers (GPT-2, Llama 3, Qwen, SmolLM): each id's bytes
  from a table (byte_level.py) into Python's incremental UTF-8 decoder, no call into the tokenizer
  (~0.3 us a token).
- `IncrementalDetokenizer`, for the others: tokenizers' own `DecodeStream`, which keeps
  prefix/read offsets in Rust (~2 us a token against ~8 us for a window decode through Python),
  as vLLM's FastIncrementalDetokenizer does. At batch 64 the per-token cost is most of the engine
  thread's output processing.
- `WindowDetokenizer`, IncrementalDetokenizer's fallback: each step decodes a short window of recent tokens. Progress
  inside the window is counted in characters, so a run of tokens that each end mid-character
  still streams every completed character at once, and the window is re-anchored with a check
  instead of at token boundaries that happen to be clean. DecodeStream gives up ("Invalid
  prefix") when a decoder's output is not monotonic (vLLM issue 17448); the sequence then
  continues on a window.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from kvtriton.backend.engine.tokenizer import InvalidPrefixError, Tokenizer

# What decoders print for bytes that are not (yet) valid UTF-8.
REPLACEMENT_CHAR = "\ufffd"
# Tokens of context kept in front of new ones: enough for a decoder's start-of-text effects
# (SentencePiece's stripped leading space, orphaned UTF-8 continuation bytes) to stay clear of
# the characters still being streamed; vLLM keeps 5 prompt tokens for the same reason.
CONTEXT_TOKENS = 5
# The window is re-anchored once it holds this many tokens, which bounds the work per step.
MAX_WINDOW_TOKENS = 16
# The most ids IncrementalDetokenizer's stream holds without text before a window takes over.
MAX_HELD_TOKENS = 4 * MAX_WINDOW_TOKENS


class _SequenceDecoder:
    """What every streaming decoder of one sequence shares: its skip_special_tokens setting, and the rule that
    nothing steps after flush()."""

    def __init__(self, skip_special_tokens: bool) -> None:
        self._skip_special_tokens = skip_special_tokens
        self._finished = False

    @property
    def skip_special_tokens(self) -> bool:
        return self._skip_special_tokens

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("step() called after flush(); the sequence has ended")

    def _close(self) -> bool:
        """Mark the sequence ended; True the first time (flush's work is due), False after."""
        was_open, self._finished = not self._finished, True
        return was_open


class WindowDetokenizer(_SequenceDecoder):
    """Per-sequence streaming decoder over a window of recent tokens; one instance per sequence,
    used by one thread.

    Invariant: `_window` holds the last tokens of prompt+output, `_text` is their decoded
    text and `_text[:_emitted]` has been streamed (or belongs to the prompt). Everything up to
    the trailing run of U+FFFD is final, because appending tokens only completes a character
    at the end. Concatenated deltas therefore equal `tokenizer.decode(output_ids)` when
    `prompt_ids` is None or the decoder is byte-level (GPT-2 style); otherwise they are the
    text the output adds after the prompt (a SentencePiece first token keeps its space).
    One known gap, shared with vLLM: SentencePiece byte fallback turns a whole run of byte
    tokens into U+FFFD when the run ends invalid, so a character streamed from the start of
    such a run differs from the full decode.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        super().__init__(skip_special_tokens)
        # The prompt's tail gives the first output token its context (e.g. its leading space)
        # and counts as already emitted.
        self._window: list[int] = list(prompt_ids[-CONTEXT_TOKENS:]) if prompt_ids else []
        self._text = self._decode(self._window)
        self._emitted = len(self._text)

    def step(self, new_ids: Sequence[int]) -> str:
        """Text completed by the newly sampled `new_ids` ('' while a character is incomplete)."""
        self._check_open()
        self._window.extend(new_ids)
        try:
            self._text = self._decode(self._window)
        except ValueError:  # an id outside the vocabulary: leave the state as it was
            del self._window[-len(new_ids) :]
            raise
        # Trailing U+FFFD may be a character whose bytes are still arriving: hold it back.
        final = len(self._text.rstrip(REPLACEMENT_CHAR))
        delta = ""
        if final > self._emitted:
            delta = self._text[self._emitted : final]
            self._emitted = final
        if len(self._window) > MAX_WINDOW_TOKENS:
            self._reanchor()
        return delta

    def flush(self) -> str:
        """At the end of the sequence: the held-back tail (invalid bytes show as U+FFFD)."""
        if not self._close():
            return ""
        delta = self._text[self._emitted :]
        self._emitted = len(self._text)
        return delta

    def _reanchor(self) -> None:
        """Shrink the window to its last few tokens when that is provably safe.

        The short window's text may start with artefacts (U+FFFD for continuation bytes of a
        character begun earlier, a stripped space); after them it must coincide with the end of
        the long window's text. Safe when that common tail reaches back past the held-back
        characters to the last emitted one, which is a real character: then the held bytes lie
        wholly inside the short window and will decode the same there. Cuts at CONTEXT_TOKENS
        and the next 3 lengths are tried, so with byte tokens one of them falls on a character
        boundary (SentencePiece byte fallback turns a whole run of bytes cut mid-character into
        U+FFFD). If none is safe, keep the long window and try again next step (degenerate
        output: long runs of invalid bytes or of skipped special tokens).
        """
        held = len(self._text) - self._emitted
        if self._emitted == 0 or self._text[self._emitted - 1] == REPLACEMENT_CHAR:
            return
        for keep in range(CONTEXT_TOKENS, CONTEXT_TOKENS + 4):
            short_window = self._window[-keep:]
            short_text = self._decode(short_window)
            if _common_suffix_len(short_text, self._text) > held:
                self._window = short_window
                self._text = short_text
                self._emitted = len(short_text) - held
                return

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def _common_suffix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


class IncrementalDetokenizer(_SequenceDecoder):
    """Per-sequence streaming decoder on tokenizers' DecodeStream; one instance per sequence, used by
    one thread. Same contract as WindowDetokenizer, whose docstring states it.

    Invariant: `_held` are the ids stepped since the stream last returned text (a character still
    arriving, or tokens that decode to nothing); `_recent` are the last CONTEXT_TOKENS ids before
    them, whose text has been streamed (or belongs to the prompt).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        super().__init__(skip_special_tokens)
        self._recent: list[int] = list(prompt_ids[-CONTEXT_TOKENS:]) if prompt_ids else []
        self._held: list[int] = []
        self._stream = tokenizer.decode_stream(self._recent, skip_special_tokens)
        self._window: WindowDetokenizer | None = None  # set once the stream gave up

    def step(self, new_ids: Sequence[int]) -> str:
        """Text completed by the newly sampled `new_ids` ('' while a character is incomplete)."""
        self._check_open()
        if self._window is not None:
            return self._window.step(new_ids)
        new_ids = list(new_ids)
        try:
            # The stream re-decodes its held ids each step: a long run without text (skipped special
            # tokens, invalid bytes) would cost more each step, so a window with its bounds takes over.
            # Real text holds a character's bytes at most (or a multi-token step's worth).
            if len(self._held) + len(new_ids) > MAX_HELD_TOKENS:
                raise InvalidPrefixError("too many held tokens")
            text = self._tokenizer.stream_step(self._stream, new_ids)  # checks the ids first: no trace if bad
        except InvalidPrefixError:
            # Continue on a window that starts where the streamed text ends.
            self._window = WindowDetokenizer(self._tokenizer, self._recent, self._skip_special_tokens)
            return self._window.step(self._held + new_ids)
        self._held += new_ids
        if text is None:
            return ""
        self._recent = (self._recent + self._held)[-CONTEXT_TOKENS:]
        self._held = []
        return text

    def flush(self) -> str:
        """At the end of the sequence: the held-back tail (invalid bytes show as U+FFFD)."""
        if not self._close():
            return ""
        if self._window is not None:
            return self._window.flush()
        if not self._held:
            return ""
        # The tail's text is what it adds to the streamed context (a decoder may strip a first space).
        context = self._tokenizer.decode(self._recent, skip_special_tokens=self._skip_special_tokens)
        full = self._tokenizer.decode(self._recent + self._held, skip_special_tokens=self._skip_special_tokens)
        return full[len(context):] if full.startswith(context) else full


class ByteTableDetokenizer(_SequenceDecoder):
    """Per-sequence streaming decoder for byte-level tokenizers: each id's bytes (Tokenizer.token_bytes) fed
    to an incremental UTF-8 decoder, which holds a character's bytes until it is complete and replaces invalid
    ones with U+FFFD as the tokenizer's decode does. A token's bytes do not depend on the ones before it, so
    the prompt gives no context and concatenated deltas equal `tokenizer.decode(output_ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        """tokenizer: one with a byte table (Tokenizer.token_bytes is not None)."""
        super().__init__(skip_special_tokens)
        self._tokenizer = tokenizer
        self._table = tokenizer.token_bytes(skip_special_tokens)
        self._vocab_size = tokenizer.vocab_size
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, new_ids: Sequence[int]) -> str:
        """Text completed by the newly sampled `new_ids` ('' while a character is incomplete)."""
        self._check_open()
        if len(new_ids) == 1 and 0 <= new_ids[0] < self._vocab_size:  # a decode step's token: the per-token hot path
            return self._utf8.decode(self._table[new_ids[0]])
        new_ids = self._tokenizer.checked_ids(new_ids)  # before any byte reaches the decoder: no trace if bad
        return self._utf8.decode(b"".join(self._table[i] for i in new_ids))

    def flush(self) -> str:
        """At the end of the sequence: the bytes of an unfinished character, as U+FFFD."""
        return self._utf8.decode(b"", final=True) if self._close() else ""


def detokenizer_for(tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = True
                    ) -> ByteTableDetokenizer | IncrementalDetokenizer:
    """The streaming decoder of one sequence: the byte table where the tokenizer has one, else DecodeStream."""
    if tokenizer.token_bytes(skip_special_tokens) is not None:
        return ByteTableDetokenizer(tokenizer, skip_special_tokens)
    return IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
