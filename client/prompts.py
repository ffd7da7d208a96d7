"""Benchmark prompts of a known length, built from common English words.

Each word below is one token (with its leading space) for SmolLM2's tokenizer
(checked against its tokenizer.json) and for most BPE vocabularies, so an
n-word prompt is about n tokens. The server reports the exact count
(num_input_tokens), and that is what a benchmark reports.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = tuple("""
time year people way day man thing woman life child world school state family student group country problem
hand part place case week company system program question work government number night point home water room
mother area money story fact month lot right study book eye job word business issue side kind head house service
friend father power hour game line end member law car city community name president team minute idea kid body
information back parent face others level office door health person art war history party result change morning
reason research girl guy moment air teacher force education foot boy age policy music market sense nation plan
college interest death experience effect class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road arm difference value
building action model season society tax director position player record paper space ground form event official
matter center couple site project activity star table need court oil situation cost industry figure street image
phone data picture practice piece land product doctor wall patient worker news test movie north love support
technology step baby computer type attention film tree source organization hair window evidence population truth
song
""".split())


@dataclass(frozen=True)
class BenchPrompt:
    text: str
    num_words: int
    max_tokens: int


def _length(rng: random.Random, mean: int, random_range: float) -> int:
    low = max(1, round(mean * (1 - random_range)))
    high = max(low, round(mean * (1 + random_range)))
    return rng.randint(low, high)


def make_prompts(num_prompts: int, input_len: int, output_len: int, random_range: float = 0.0,
                 seed: int = 0) -> list[BenchPrompt]:
    """`num_prompts` prompts of input_len words and max_tokens output_len, each drawn
    uniformly from [len * (1 - random_range), len * (1 + random_range)].

    Words are drawn at random, so prompts share no prefix beyond chance (no
    artificial prefix-cache hits); the same seed gives the same prompts.
    """
    for name, value in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0 <= random_range < 1:
        raise ValueError(f"random_range must be in [0, 1), got {random_range!r}")
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        n = _length(rng, input_len, random_range)
        prompts.append(BenchPrompt(" ".join(rng.choice(WORDS) for _ in range(n)), n,
                                   _length(rng, output_len, random_range)))
    return prompts
