"""The streaming decoders (byte-table, DecodeStream-based and window-based): UTF-8-safe deltas whose
concatenation is the full decode, in bounded work."""

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from kvtriton.backend.engine.detokenizer import (
    MAX_HELD_TOKENS,
    MAX_WINDOW_TOKENS,
    REPLACEMENT_CHAR,
    ByteTableDetokenizer,
    IncrementalDetokenizer,
    WindowDetokenizer,
    detokenizer_for,
)
from kvtriton.backend.engine.tokenizer import Tokenizer

MIXED = [
    "The quick brown fox jumps over the lazy dog. ",
    "你好，世界！今天天气很好。",
    "Emoji 😀🚀 family 👨‍👩‍👧 thumbs 👍🏽 ",
    "Ünïcödé àccents — “quotes” ",
    "日本語のテキスト、한국어 텍스트 ",
    "code: x = f(y) ** 2\n\n",
]


def byte_level(vocab_size: int | None) -> RustTokenizer:
    """GPT-2-style byte-level BPE: one token per byte (None), or trained; a small trained vocabulary
    has tokens holding part of a CJK character and tokens spanning two characters."""
    tk = RustTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if vocab_size is None:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        tk.model = models.BPE({c: i for i, c in enumerate(alphabet)}, [])
        tk.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    else:
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(MIXED * 3, trainer)
    return tk


def sentencepiece_like() -> RustTokenizer:
    """Llama-2-style: '▁' for spaces, <0xXX> byte fallback, and a decoder that strips the first space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "▁abcdefghijklmnopqrstuvwxyzTEU.,:=()*!0123456789\n":
        vocab.setdefault(c, len(vocab))
    tk = RustTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens(["<s>", "</s>"])
    return tk


# name -> (rust tokenizer factory, tokenizer_config.json)
TOKENIZERS = {
    "per_byte": (lambda: byte_level(None), {"eos_token": "<|endoftext|>"}),
    "bpe": (lambda: byte_level(360), {"eos_token": "<|endoftext|>"}),
    "spm": (sentencepiece_like, {"bos_token": "<s>", "eos_token": "</s>"}),
}


def load(name: str, folder: Path, cls: type = Tokenizer) -> Tokenizer:
    factory, config = TOKENIZERS[name]
    folder.mkdir(parents=True, exist_ok=True)
    factory().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return cls.from_pretrained(folder)


@pytest.fixture(scope="module")
def per_byte(tmp_path_factory) -> Tokenizer:
    return load("per_byte", tmp_path_factory.mktemp("per_byte"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    return load("bpe", tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    return load("spm", tmp_path_factory.mktemp("spm"))


def byte_table(tok, prompt_ids=None, skip_special_tokens=True):
    """ByteTableDetokenizer behind the other decoders' constructor; only byte-level tokenizers have a table."""
    if tok.token_bytes(skip_special_tokens) is None:
        pytest.skip("not a byte-level tokenizer: no byte table")
    return ByteTableDetokenizer(tok, skip_special_tokens)


@pytest.fixture(autouse=True, params=[byte_table, IncrementalDetokenizer, WindowDetokenizer],
                ids=["bytes", "stream", "window"])
def Detok(request, monkeypatch):
    """Every test runs on both decoders; `stream()` and the tests build the one this run is for."""
    monkeypatch.setitem(globals(), "Detokenizer", request.param)
    return request.param


Detokenizer = IncrementalDetokenizer  # set per test by the Detok fixture


def stream(tok, ids, rng=None, prompt_ids=None, skip_special_tokens=True, max_chunk=3):
    """All deltas of one sequence, fed in random-size chunks like an engine with multi-token steps."""
    rng = rng or random.Random(0)
    detok = Detokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        deltas.append(detok.step(ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


def long_text(seed: int, pieces: int = 120) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(MIXED) for _ in range(pieces))


def test_four_byte_emoji_is_held_until_complete(per_byte):
    ids = per_byte.encode("a😀b", add_special_tokens=False)
    assert len(ids) == 6
    detok = Detokenizer(per_byte)
    assert [detok.step([i]) for i in ids] == ["a", "", "", "", "😀", "b"]
    assert detok.flush() == ""


def test_cjk_split_inside_trained_tokens(bpe):
    # Merged tokens that end mid-character: the text must still come out whole and in order.
    text = "你好，世界！今天天气很好。"
    ids = bpe.encode(text, add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in bpe.decode([i]) for i in ids), "the fixture must cut characters"
    detok = Detokenizer(bpe)
    deltas = [detok.step([i]) for i in ids]
    assert "".join(deltas) == text
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "" in deltas  # at least one token completed no character


@pytest.mark.parametrize("name", ["per_byte", "bpe", "spm"])
@pytest.mark.parametrize("seed", range(4))
def test_random_splits_concatenate_to_the_full_decode(request, name, seed):
    tok = request.getfixturevalue(name)
    text = long_text(seed)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 20 * MAX_WINDOW_TOKENS  # long enough to re-anchor the window many times
    deltas = stream(tok, ids, random.Random(seed), max_chunk=1 + seed)
    assert "".join(deltas) == tok.decode(ids)
    assert all(REPLACEMENT_CHAR not in d for d in deltas), "a partial character was emitted"


@pytest.mark.parametrize("name", ["per_byte", "bpe"])
def test_prompt_context_does_not_leak_into_the_output(request, name):
    tok = request.getfixturevalue(name)
    prompt = tok.encode("Prompt 你好 😀 ", add_special_tokens=False)
    output = tok.encode(long_text(7, 30), add_special_tokens=False)
    assert "".join(stream(tok, output, prompt_ids=prompt)) == tok.decode(output)


def test_sentencepiece_prompt_keeps_the_first_space(spm):
    # Decoded alone, the first output token would lose its leading space to the decoder's Strip.
    prompt = spm.encode("hello", add_special_tokens=False)
    output = spm.encode("hello world 你好", add_special_tokens=False)[len(prompt) :]
    full = spm.decode(prompt + output)
    with_prompt = "".join(stream(spm, output, prompt_ids=prompt))
    assert with_prompt == full[len(spm.decode(prompt)) :] == " world 你好"
    assert "".join(stream(spm, output)) == spm.decode(output) == "world 你好"


def test_invalid_bytes_surface_as_replacement(per_byte):
    cut = per_byte.encode("中", add_special_tokens=False)[:2]  # two of three bytes
    detok = Detokenizer(per_byte)
    assert detok.step(cut) == ""
    assert detok.flush() == REPLACEMENT_CHAR == per_byte.decode(cut)
    # Followed by a real character, the broken one is final and streams at once.
    detok = Detokenizer(per_byte)
    assert detok.step(cut) == ""
    assert detok.step(per_byte.encode("x", add_special_tokens=False)) == REPLACEMENT_CHAR + "x"


def test_literal_replacement_character_round_trips(bpe):
    ids = bpe.encode("a\ufffd\ufffdb\ufffd", add_special_tokens=False)
    assert "".join(stream(bpe, ids)) == "a\ufffd\ufffdb\ufffd"


def test_special_tokens_skipped_or_kept(per_byte):
    end = per_byte.token_to_id("<|im_end|>")
    ids = (
        per_byte.encode("ok", add_special_tokens=False)
        + [end]
        + per_byte.encode("!", add_special_tokens=False)
    )
    assert "".join(stream(per_byte, ids)) == "ok!"
    assert "".join(stream(per_byte, ids, skip_special_tokens=False)) == "ok<|im_end|>!"


class CountingTokenizer(Tokenizer):
    """Records how many ids each decode call sees; the detokenizer's cost per step."""

    decoded_lengths: list

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", [long_text(3, 200), "你好世界今天天气很好" * 300])
def test_work_per_step_is_bounded(tmp_path, name, text):
    tok = load(name, tmp_path, CountingTokenizer)
    tok.decoded_lengths = []
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 600
    assert "".join(stream(tok, ids, max_chunk=1)) == text
    if Detokenizer is byte_table:
        assert tok.decoded_lengths == []  # no decode at all: a table lookup per id
        return
    if Detokenizer is IncrementalDetokenizer:
        # DecodeStream drains its ids whenever it returns text; it holds at most a window's worth.
        detok = Detokenizer(tok)
        for i in ids:
            detok.step([i])
            assert len(detok._held) <= MAX_HELD_TOKENS and detok._window is None
        return
    # Never the whole output: a short window, about one decode per step.
    assert max(tok.decoded_lengths) <= MAX_WINDOW_TOKENS + 4
    assert len(tok.decoded_lengths) < 1.3 * len(ids)


def test_a_long_run_without_text_moves_to_a_window(per_byte):
    # Skipped special tokens decode to nothing: the stream would re-decode a growing run every step.
    end = per_byte.token_to_id("<|im_end|>")
    ids = (per_byte.encode("ok", add_special_tokens=False) + [end] * (2 * MAX_HELD_TOKENS)
           + per_byte.encode("!", add_special_tokens=False))
    assert "".join(stream(per_byte, ids, max_chunk=1)) == "ok!"


def test_misuse_is_reported(per_byte):
    detok = Detokenizer(per_byte)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        detok.step([per_byte.token_to_id("a"), per_byte.vocab_size + 5])
    for bad in (per_byte.vocab_size, -1):  # one token (the decode step's path) is checked as well
        with pytest.raises(ValueError, match="outside the vocabulary"):
            detok.step([bad])
    assert detok.step([per_byte.token_to_id("b")]) == "b"  # the rejected steps left no trace
    detok = Detokenizer(per_byte)
    detok.flush()
    with pytest.raises(RuntimeError, match="after flush"):
        detok.step([1])
    assert detok.flush() == ""
    assert Detokenizer(per_byte).step([]) == ""


def default_model_tokenizer() -> Tokenizer:
    from kvtriton.backend.models.default_model import default_model_dir

    folder = default_model_dir()
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"default model not converted yet at {folder}")
    return Tokenizer.from_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_default_model_streams_mixed_text(seed):
    tok = default_model_tokenizer()
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "Write."}]), add_special_tokens=False
    )
    output = tok.encode(long_text(seed, 300), add_special_tokens=False) + [min(tok.eos_token_ids)]
    deltas = stream(tok, output, random.Random(seed), prompt_ids=prompt, max_chunk=1 + seed)
    assert "".join(deltas) == tok.decode(output)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)


def test_byte_level_tokenizers_get_the_table_and_the_others_the_stream(per_byte, bpe, spm):
    for tok in (per_byte, bpe):
        assert isinstance(detokenizer_for(tok), ByteTableDetokenizer)
        assert isinstance(detokenizer_for(tok, skip_special_tokens=False), ByteTableDetokenizer)
    assert isinstance(detokenizer_for(spm), IncrementalDetokenizer)
