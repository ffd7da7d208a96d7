"""Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): each token id's bytes, so text can stream without a call
into the tokenizer per token.

A byte-level vocabulary spells each byte as one printable character (GPT-2's table: printable ASCII and
Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 onwards), and its decoder maps every
token's characters back to bytes and decodes them all as UTF-8 with replacement; a token with a character
outside the table (an added token's own text) keeps its UTF-8 bytes. A token's bytes therefore depend on the
token alone: one table per tokenizer, and Python's incremental UTF-8 decoder, turn a sequence's tokens into
the same text as the tokenizer's own decode (detokenizer.ByteTableDetokenizer).
"""

from __future__ import annotations

import tokenizers
from tokenizers import decoders

# Ids decoded through the tokenizer to check a table: every added token, and every SAMPLE_STRIDE-th id.
SAMPLE_STRIDE = 97


def byte_of_char() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, character to byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = (b for b in range(256) if b not in table.values())
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def token_bytes_table(backend: tokenizers.Tokenizer, skip_special_tokens: bool) -> tuple[bytes, ...] | None:
    """Each id's bytes as the tokenizer's decode makes them (b"" for a skipped special token or an unused id),
    or None: the decoder is not the plain ByteLevel one, or a sample of ids decodes otherwise than the table
    says (a tokenizer whose decode this module does not model keeps tokenizers' own streaming)."""
    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    byte_of = byte_of_char()
    added = backend.get_added_tokens_decoder()
    special = {i for i, token in added.items() if token.special}
    table = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        token = backend.id_to_token(i)
        if token is None or (skip_special_tokens and i in special):
            table.append(b"")
        elif all(c in byte_of for c in token):
            table.append(bytes(byte_of[c] for c in token))
        else:
            table.append(token.encode())
    for i in sorted(set(added) | set(range(0, len(table), SAMPLE_STRIDE))):
        if backend.decode([i], skip_special_tokens=skip_special_tokens) != table[i].decode("utf-8", "replace"):
            return None
    return tuple(table)
