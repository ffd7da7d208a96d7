"""vLLM's allowed_token_ids and bad_words as rows of the step's allowed-token bitmask (token_limits.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.engine.token_limits import (
    MAX_BAD_WORDS,
    bad_words_token_ids,
    banned_tokens,
    check_bad_words,
    limit_row,
)
from kvtriton.backend.engine.tokenizer import Tokenizer

from tests.tiny_model import make_tiny_engine


def allowed(row: np.ndarray) -> set[int]:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def test_a_multi_token_word_bans_its_last_token_only_after_the_rest_of_it():
    bad = ((7,), (3, 4, 5))
    assert banned_tokens(bad, []) == [7]
    assert banned_tokens(bad, [1, 3]) == [7]
    assert banned_tokens(bad, [1, 3, 4]) == [7, 5]
    assert banned_tokens(bad, [3, 4, 9]) == [7]


def test_limit_row_narrows_by_allowed_ids_and_clears_banned_bits_bit_31_too():
    seq = Sequence("r", [1, 2], SamplingParams(allowed_token_ids=(5, 31, 40, 63)), bad_words_token_ids=((31,), (8, 63)))
    row = np.full(2, -1, dtype=np.int32)  # 64 tokens, all allowed
    limit_row(row, seq)
    assert allowed(row) == {5, 40, 63}  # 31 banned (one-token word); 63 only after 8
    seq.token_ids.append(8)
    row = np.full(2, -1, dtype=np.int32)
    limit_row(row, seq)
    assert allowed(row) == {5, 40}


def test_bad_words_tokenize_as_written_and_after_a_space(default_model_folder):
    tokenizer = Tokenizer.from_pretrained(default_model_folder)
    ids = bad_words_token_ids(tokenizer, ["Paris", " Paris"])
    plain = tuple(tokenizer.encode("Paris", add_special_tokens=False))
    spaced = tuple(tokenizer.encode(" Paris", add_special_tokens=False))
    assert plain != spaced and ids == (plain, spaced)  # the second word adds nothing new
    with pytest.raises(ValueError, match=f"at most {MAX_BAD_WORDS} words"):
        check_bad_words(["w"] * (MAX_BAD_WORDS + 1))
    with pytest.raises(ValueError, match="bad_words must be a list of non-empty strings"):
        SamplingParams(bad_words=["ok", "  "])
    assert SamplingParams.from_dict({"bad_words": "one"}).bad_words == ("one",)


def test_the_engine_never_writes_a_bad_word(tiny_folder):
    engine = make_tiny_engine(tiny_folder).start()
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        free = engine.generate(["the quick"], greedy)[0]
        word = free.text.split()[1]  # a word the free-running answer writes
        banned = bad_words_token_ids(engine.tokenizer, [word])
        out = engine.generate(["the quick"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                            bad_words=[word]))[0]
        assert out.finish_reason == "length" and out.token_ids != free.token_ids
        for ids in banned:  # no banned token sequence anywhere in the output
            assert not any(tuple(out.token_ids[i:i + len(ids)]) == ids for i in range(len(out.token_ids)))
    finally:
        engine.shutdown()
