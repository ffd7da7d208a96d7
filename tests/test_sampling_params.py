import dataclasses

import pytest

from kvtriton.backend.engine.sampling_params import SamplingParams


def test_defaults_follow_openai_semantics():
    p = SamplingParams()
    assert (p.max_tokens, p.min_tokens, p.temperature, p.top_p, p.top_k) == (128, 0, 1.0, 1.0, 0)
    assert (p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (
        0.0, 1.0, 0.0, 0.0)
    assert p.seed is None and p.logprobs is None and p.stop == () and p.stop_token_ids == ()
    assert p.ignore_eos is False and p.skip_special_tokens is True
    assert not p.is_greedy


@pytest.mark.parametrize("kwargs, field, fragment", [
    ({"max_tokens": 0}, "max_tokens", ">= 1, got 0"),
    ({"min_tokens": -1}, "min_tokens", "[0, max_tokens=128], got -1"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens", "[0, max_tokens=4], got 5"),
    ({"temperature": -0.1}, "temperature", ">= 0, got -0.1"),
    ({"temperature": float("nan")}, "temperature", "finite"),
    ({"top_p": 1.5}, "top_p", "in (0, 1], got 1.5"),
    ({"top_p": 0.0}, "top_p", "in (0, 1], got 0.0"),
    ({"top_k": -2}, "top_k", "got -2"),
    ({"min_p": 1.1}, "min_p", "in [0, 1], got 1.1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0, got 0.0"),
    ({"presence_penalty": 2.5}, "presence_penalty", "in [-2, 2], got 2.5"),
    ({"frequency_penalty": -3}, "frequency_penalty", "in [-2, 2], got -3"),
    ({"seed": -1}, "seed", "[0, 2**63), got -1"),
    ({"seed": 2**63}, "seed", "[0, 2**63)"),
    ({"stop": ("",)}, "stop", "non-empty"),
    ({"stop_token_ids": (-5,)}, "stop_token_ids", "got -5"),
    ({"logprobs": 21}, "logprobs", "[0, 20], got 21"),
    ({"logprobs": -1}, "logprobs", "got -1"),
    ({"max_tokens": 1.5}, "max_tokens", "integer"),
    ({"max_tokens": True}, "max_tokens", "integer"),
    ({"temperature": "0.7"}, "temperature", "number"),
    ({"ignore_eos": 1}, "ignore_eos", "true or false"),
    ({"logit_bias": {5: 101}}, "logit_bias", "[-100, 100], got 101.0"),
    ({"logit_bias": {5: float("nan")}}, "logit_bias", "got nan"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias", ">= 0, got -1"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias", "got 'x'"),
    ({"logit_bias": 3}, "logit_bias", "token id -> bias, got 3"),
])
def test_each_violation_names_the_field_and_the_value(kwargs, field, fragment):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(field)
    assert fragment in str(err.value)


def test_top_p_message_matches_the_documented_form():
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)


def test_normalisation():
    p = SamplingParams(top_k=-1, temperature=1, stop=["a", "b"], stop_token_ids=[3])
    assert p.top_k == 0
    assert isinstance(p.temperature, float)
    assert p.stop == ("a", "b") and p.stop_token_ids == (3,)
    hash(p)  # tuples keep a frozen instance hashable


def test_instances_are_frozen():
    p = SamplingParams()
    with pytest.raises(Exception):
        p.temperature = 0.5


@pytest.mark.parametrize("kwargs, greedy", [
    ({"temperature": 0.0}, True),
    ({"temperature": 0.7, "top_k": 1}, True),
    ({"temperature": 1e-7}, True),  # the T -> 0 limit, below float32 resolution
    ({"temperature": 0.01}, False),
    ({"top_k": 2}, False),
])
def test_is_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).is_greedy is greedy


def test_from_dict_single_stop_string_becomes_a_tuple():
    assert SamplingParams.from_dict({"stop": "END"}).stop == ("END",)


def test_from_dict_coerces_strings_and_integral_floats():
    p = SamplingParams.from_dict({
        "temperature": "0.7", "top_p": "0.9", "top_k": "40", "max_tokens": 16.0,
        "min_tokens": "2.0", "seed": "123", "ignore_eos": "true",
        "skip_special_tokens": "False", "stop_token_ids": ["5", 6.0], "logprobs": "3",
        "presence_penalty": 1, "frequency_penalty": "-0.5",
    })
    assert p.temperature == 0.7 and p.top_p == 0.9 and p.top_k == 40
    assert p.max_tokens == 16 and isinstance(p.max_tokens, int) and p.min_tokens == 2
    assert p.seed == 123 and p.logprobs == 3
    assert p.ignore_eos is True and p.skip_special_tokens is False
    assert p.stop_token_ids == (5, 6)
    assert p.presence_penalty == 1.0 and p.frequency_penalty == -0.5


def test_logit_bias_is_sorted_pairs_from_a_mapping_with_string_keys():
    p = SamplingParams.from_dict({"logit_bias": {"50256": -100, "9": "2.5"}})
    assert p.logit_bias == ((9, 2.5), (50256, -100.0))
    hash(p)
    assert SamplingParams().logit_bias == ()


def test_from_dict_null_keeps_the_default():
    p = SamplingParams.from_dict({"temperature": None, "seed": None, "top_k": -1})
    assert p.temperature == 1.0 and p.seed is None and p.top_k == 0


@pytest.mark.parametrize("d, field", [
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": [1]}, "temperature"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"stop": 3}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop_token_ids": "5"}, "stop_token_ids"),
    ({"top_p": "1.5"}, "top_p"),
])
def test_from_dict_wrong_types_name_the_field(d, field):
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(d)
    assert str(err.value).startswith(field)


def test_from_dict_unknown_key_names_it_and_lists_accepted():
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict({"temprature": 0.5})
    msg = str(err.value)
    assert msg.startswith("unknown sampling parameter 'temprature'; accepted: ")
    assert msg.split("accepted: ")[1].split(", ") == sorted(SamplingParams.accepted_keys())


def test_from_dict_accepts_the_field_names_only():
    # Other clients' spellings (TensorRT-LLM's random_seed, ...) are the Triton adapter's to translate.
    assert SamplingParams.accepted_keys() == {f.name for f in dataclasses.fields(SamplingParams)}
    for alias in ("random_seed", "stop_words", "max_new_tokens", "min_length"):
        with pytest.raises(ValueError, match=f"unknown sampling parameter '{alias}'"):
            SamplingParams.from_dict({alias: 1})


def test_from_dict_rejects_a_non_object():
    with pytest.raises(ValueError, match="JSON object"):
        SamplingParams.from_dict([("temperature", 1.0)])
