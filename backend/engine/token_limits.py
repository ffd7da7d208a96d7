"""vLLM's per-request token limits that are not grammars, as rows of the step's allowed-token bitmask.

- `allowed_token_ids`: only these ids may be sampled.
- `bad_words`: never these words. Each word is tokenized as written and after a space (a word inside the
  text); a one-token word is banned at every step, a longer one's last token where the output ends with
  the rest of it (vLLM's rule: the output tokens, not the prompt). vLLM keeps the spaced form only when it
  has as many tokens as the plain one, which with byte-level BPE (" quick" one token, "quick" two) lets
  the word through inside the text; here both forms are always banned.

StructuredOutputManager.bitmask builds the step's mask after the host has taken the previous step's
tokens (the overlapped loop waits for them there already, for grammars), so a row's output is complete
when its bans are worked out. A limited request does not speculate: a verify step's proposals would not
pass through the mask.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from kvtriton.backend.engine.stop_strings import check_string_list
from kvtriton.backend.engine.token_bitmask import token_set_row

if TYPE_CHECKING:
    from kvtriton.backend.engine.sequence import Sequence
    from kvtriton.backend.engine.tokenizer import Tokenizer

# Request limits, as for stop strings: the engine thread looks at each word's tokens every step.
MAX_BAD_WORDS = 16
MAX_BAD_WORD_CHARS = 256


def check_bad_words(words: Seq[str]) -> None:
    """ValueError naming the limit when a bad_words list is over MAX_BAD_WORDS or MAX_BAD_WORD_CHARS."""
    check_string_list("bad_words", words, MAX_BAD_WORDS, MAX_BAD_WORD_CHARS, "words")


def bad_words_token_ids(tokenizer: Tokenizer, words: Seq[str]) -> tuple[tuple[int, ...], ...]:
    """Each word's token sequences: as written (leading spaces stripped), and after a space."""
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not plain:
            continue
        out.append(plain)
        out.append(tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)))
    return tuple(dict.fromkeys(out))


def banned_tokens(bad_ids: tuple[tuple[int, ...], ...], output_ids: Seq[int]) -> list[int]:
    """The tokens a row may not sample next: each bad word's last token where the output ends with its others."""
    banned = []
    for ids in bad_ids:
        prefix = len(ids) - 1
        if prefix == 0 or (prefix <= len(output_ids)
                           and list(output_ids[len(output_ids) - prefix:]) == list(ids[:-1])):
            banned.append(ids[-1])
    return banned


def is_limited(seq: Sequence) -> bool:
    return bool(seq.params.allowed_token_ids or seq.bad_words_token_ids)


def limit_row(row: np.ndarray, seq: Sequence) -> None:
    """Narrow one bitmask row (int32 words, in place) by the sequence's allowed ids and banned tokens."""
    if seq.params.allowed_token_ids:
        row &= token_set_row(seq.params.allowed_token_ids, row.shape[0])
    if not seq.bad_words_token_ids:
        return
    words = row.view(np.uint32)  # bit 31 too: clearing it must not go through a signed constant
    for token in banned_tokens(seq.bad_words_token_ids, seq.output_token_ids):
        if token < words.shape[0] * 32:
            words[token // 32] &= np.uint32(0xFFFFFFFF ^ (1 << (token % 32)))
