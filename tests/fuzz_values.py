"""Request keys for fuzzing a served model: valid values of the sampling and constraint keys that interact
(tests/test_reliability.py, tests/test_speculative_server.py)."""

from __future__ import annotations

import random

# Valid values of the keys that interact: a request may combine several, each fine alone, that together
# leave no token to sample (a grammar and allowed_token_ids that share none, then top-p over all -inf logits).
CONSTRAINTS = {
    "guided_choice": [["yes", "no"], ["a" * 300, "b"]], "guided_regex": ["[0-9]+", "[a-z ]{3,20}"],
    "guided_json": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}],
    "allowed_token_ids": [[1, 2, 3], [28, 29, 30, 2]], "bad_words": [["the"], ["a b c"]],
    "logit_bias": [{"5": 100}, {"11": -100}], "min_tokens": [1, 2], "stop": [[" "], ["a"] * 4],
}
SAMPLING = {
    "temperature": [0.0, 0.7, 1.5], "top_p": [0.1, 0.9], "top_k": [1, 5], "min_p": [0.5, 1.0], "seed": [0, 7],
    "logprobs": [0, 5], "prompt_logprobs": [0, 2], "repetition_penalty": [0.5, 1.3], "frequency_penalty": [-2, 2],
    "ignore_eos": [True], "include_stop_str_in_output": [True], "truncate_prompt_tokens": [1, 3],
}


def valid_combination(rng: random.Random) -> dict:
    """One to three constraints (one guided_* key at most: two are refused as such) and one to four sampling
    keys, each valid alone."""
    keys = rng.sample(sorted(CONSTRAINTS), rng.randint(1, 3))
    guided = [k for k in keys if k.startswith("guided_")]
    picked = {k: rng.choice(CONSTRAINTS[k]) for k in keys if not k.startswith("guided_") or k == guided[0]}
    return picked | {k: rng.choice(SAMPLING[k]) for k in rng.sample(sorted(SAMPLING), rng.randint(1, 4))}
