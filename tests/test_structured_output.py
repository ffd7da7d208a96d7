"""Structured output on a tiny random Llama (CPU): the request keys, the bitmask op, grammar compilation and
errors, and the engine's masking and termination under continuous batching, the overlapped loop and preemption."""

import json
import re
import threading

import jsonschema
import numpy as np
import pytest
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.structured_output import StructuredOutputManager
from kvtriton.backend.engine.token_bitmask import apply_token_bitmask_
from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.backend.triton.request import RequestError, parse_generate_request

from tests.tiny_model import make_tiny_engine

pytest.importorskip("transformers")

SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"type": "string", "enum": ["fox", "dog", "cat"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["animal", "count", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["The quick brown fox", "What is the capital of France?", "Paged attention stores keys", "0123"]


@pytest.fixture(scope="module")
def manager(tiny_folder):
    tokenizer = Tokenizer.from_pretrained(tiny_folder)
    return StructuredOutputManager(tokenizer, tokenizer.eos_token_ids), tokenizer


@pytest.fixture(scope="module")
def engine(tiny_folder):
    engine = make_tiny_engine(tiny_folder).start()
    yield engine
    engine.shutdown()


def allowed_ids(bitmask_row: torch.Tensor, vocab: int) -> set[int]:
    return {t for t in range(vocab) if (int(bitmask_row[t // 32]) >> (t % 32)) & 1}


# ---- the request keys --------------------------------------------------------------------------------------
def test_guided_keys_parse_from_json_and_keep_the_schema_order():
    p = SamplingParams.from_dict({"guided_json": {"z": 1, "a": 2}})
    assert p.guided_json == '{"z": 1, "a": 2}' and p.guided_decoding == ("json", '{"z": 1, "a": 2}')
    hash(p)
    assert SamplingParams(guided_regex="[0-9]+").guided_decoding == ("regex", "[0-9]+")
    assert SamplingParams(guided_grammar='root ::= "a"').guided_decoding == ("grammar", 'root ::= "a"')
    assert SamplingParams.from_dict({"guided_json_object": "true"}).guided_decoding == ("json_object", "")
    choice = SamplingParams.from_dict({"guided_choice": ["yes", "no", "é"]})
    assert choice.guided_choice == ("yes", "no", "é") and choice.guided_decoding == ("choice", '["yes", "no", "é"]')
    hash(choice)
    assert SamplingParams(guided_choice=["a"]).guided_choice == ("a",)
    assert SamplingParams().guided_decoding is None


@pytest.mark.parametrize("kwargs, message", [
    ({"guided_json": "{}", "guided_regex": "a"}, "guided_json and guided_regex are both set"),
    ({"guided_regex": "a", "guided_json_object": True}, "guided_regex and guided_json_object are both set"),
    ({"guided_regex": ""}, "guided_regex must be a non-empty string"),
    ({"guided_grammar": 5}, "guided_grammar must be a non-empty string, got 5"),
    ({"guided_json": ["a"]}, "guided_json must be a JSON schema (a string or an object)"),
    ({"guided_json_object": "yes"}, "guided_json_object must be true or false"),
    ({"guided_choice": "yes"}, "guided_choice must be a list"),
    ({"guided_choice": ["yes", ""]}, "guided_choice must be a list of non-empty strings"),
    ({"guided_choice": ["yes", 1]}, "guided_choice must be a list of non-empty strings"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_regex and guided_choice are both set"),
])
def test_bad_guided_keys_are_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(kwargs)
    assert message in str(err.value)


def test_triton_request_carries_the_guided_keys():
    sampling = json.dumps({"guided_json": SCHEMA, "max_tokens": 8})
    inputs = {"text_input": [b"hi"], "sampling_parameters": [sampling.encode()]}

    def get(name):
        return np.array(inputs[name], dtype=np.object_) if name in inputs else None

    req = parse_generate_request(get, None, lambda m: "")
    assert json.loads(req.params.guided_json) == SCHEMA
    inputs["sampling_parameters"] = [json.dumps({"guided_json": SCHEMA, "guided_regex": "x"}).encode()]
    with pytest.raises(RequestError, match="give at most one guided_"):
        parse_generate_request(get, None, lambda m: "")


# ---- the bitmask op ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 400])
def test_bitmask_masks_exactly_the_cleared_bits(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1  # an unconstrained row
    logits = torch.randn(3, vocab, generator=gen)
    masked = apply_token_bitmask_(logits.clone(), bitmask)
    for row in range(3):
        allowed = allowed_ids(bitmask[row], vocab)
        for t in range(vocab):
            assert masked[row, t] == (logits[row, t] if t in allowed else float("-inf"))
    assert torch.equal(masked[1], logits[1])


def test_bitmask_shape_is_checked():
    with pytest.raises(ValueError, match="does not cover"):
        apply_token_bitmask_(torch.zeros(2, 65), torch.zeros(2, 2, dtype=torch.int32))


# ---- compilation, errors, the cache, the masks ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"guided_json": '{"type": "foo"}'}, "guided_json is invalid: Invalid type: foo"),
    ({"guided_json": '{"properties": 5}'}, "guided_json is invalid: properties must be an object"),
    ({"guided_json": "{not json"}, "guided_json is not valid JSON: Expecting property name"),
    ({"guided_json": "[1, 2]"}, "guided_json must be a JSON schema (an object), got list"),
    # nested past llguidance's JSON reader's limit (Python's json.loads takes it)
    ({"guided_json": '{"properties": {"a": ' * 150 + "{}" + "}}" * 150}, "guided_json is invalid: recursion limit"),
    ({"guided_regex": "[0-9"}, "guided_regex is invalid"),
    ({"guided_grammar": "root ::= foo"}, "guided_grammar is invalid"),
    ({"guided_grammar": "start: bar"}, "guided_grammar is invalid"),
])
def test_invalid_constraints_get_a_clear_error(manager, kwargs, message):
    structured, _ = manager
    with pytest.raises(ValueError) as err:
        structured.matcher_for(SamplingParams(**kwargs))
    assert message in str(err.value)


def test_a_constraint_is_compiled_once_and_each_request_gets_its_own_matcher(manager):
    structured, tokenizer = manager
    params = SamplingParams(guided_regex="(ab)+")
    first, second = structured.matcher_for(params), structured.matcher_for(params)
    assert first is not second and len([k for k in structured._cache if k == ("regex", "(ab)+")]) == 1
    ab = tokenizer.encode("ab", add_special_tokens=False)
    assert all(first.accept(t) for t in ab)
    assert not second.accept(tokenizer.encode("b", add_special_tokens=False)[0])  # second is still at the start
    assert structured.matcher_for(SamplingParams()) is None


def test_eos_is_allowed_only_where_the_grammar_accepts(manager):
    structured, tokenizer = manager
    eos = min(tokenizer.eos_token_ids)
    seq = type("Seq", (), {"finish_reason": None, "params": SamplingParams(), "bad_words_token_ids": ()})()
    seq.grammar = structured.matcher_for(SamplingParams(guided_regex="[0-9]+"))
    vocab = tokenizer.vocab_size
    start = allowed_ids(structured.bitmask([seq], torch.device("cpu"))[0], vocab)
    assert eos not in start and start and all(re.fullmatch("[0-9]+", tokenizer.decode([t])) for t in start)
    assert seq.grammar.accept(tokenizer.encode("7", add_special_tokens=False)[0])
    after_digit = allowed_ids(structured.bitmask([seq], torch.device("cpu"))[0], vocab)
    assert eos in after_digit and not seq.grammar.is_terminated


def test_every_eos_id_of_a_model_with_several_ends_a_grammar(manager):
    """Llama 3 and Qwen 3 end turns with several ids (generation_config's eos_token_id list): each is allowed
    where the grammar may end (llguidance >= 1.7 takes the list; 1.6 refused it, and guided decoding was off)."""
    _, tokenizer = manager
    eos = sorted(tokenizer.eos_token_ids)[0]
    other = tokenizer.encode("!", add_special_tokens=False)[0]  # a second EOS id, as a model's config may name
    structured = StructuredOutputManager(tokenizer, {eos, other})
    seq = type("Seq", (), {"finish_reason": None, "params": SamplingParams(), "bad_words_token_ids": ()})()
    seq.grammar = structured.matcher_for(SamplingParams(guided_regex="[0-9]+"))
    assert seq.grammar.accept(tokenizer.encode("7", add_special_tokens=False)[0])
    after_digit = allowed_ids(structured.bitmask([seq], torch.device("cpu"))[0], tokenizer.vocab_size)
    assert {eos, other} <= set(after_digit)


def test_bitmask_is_none_without_guided_rows_and_all_ones_for_unguided_rows(manager):
    structured, tokenizer = manager
    plain = type("Seq", (), {"finish_reason": None, "grammar": None, "params": SamplingParams(),
                             "bad_words_token_ids": ()})()
    guided = type("Seq", (), {"finish_reason": None, "params": SamplingParams(), "bad_words_token_ids": ()})()
    guided.grammar = structured.matcher_for(SamplingParams(guided_json_object=True))
    assert structured.bitmask([plain, plain], torch.device("cpu")) is None
    mask = structured.bitmask([plain, guided], torch.device("cpu"))
    assert mask.dtype == torch.int32 and mask.shape == (2, (tokenizer.vocab_size + 31) // 32)
    assert bool((mask[0] == -1).all())
    assert all(tokenizer.decode([t]).startswith("{") for t in allowed_ids(mask[1], tokenizer.vocab_size))
    # allowed_token_ids (vLLM's) without a grammar: the same mask, no llguidance call; with one, both at once
    limited = type("Seq", (), {"finish_reason": None, "grammar": None, "bad_words_token_ids": (),
                               "params": SamplingParams(allowed_token_ids=(5, 40, tokenizer.vocab_size - 1))})()
    mask = structured.bitmask([plain, limited], torch.device("cpu"))
    assert bool((mask[0] == -1).all())
    assert allowed_ids(mask[1], tokenizer.vocab_size) == {5, 40, tokenizer.vocab_size - 1}
    brace = tokenizer.encode("{", add_special_tokens=False)[0]
    guided.params = SamplingParams(allowed_token_ids=(5, brace))
    assert allowed_ids(structured.bitmask([guided], torch.device("cpu"))[0], tokenizer.vocab_size) == {brace}


# ---- the engine ----------------------------------------------------------------------------------------------
def guided(**kwargs):
    return SamplingParams(**{"max_tokens": 60, "temperature": 0.0, **kwargs})


def test_json_schema_outputs_parse_and_validate_greedy_and_sampled(engine):
    params = [guided(guided_json=SCHEMA), guided(guided_json=SCHEMA, temperature=5.0, seed=7)]
    for p in params:
        for out in engine.generate(PROMPTS, p):
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), SCHEMA)
    assert engine.stats().kv_usage == 0.0


def test_the_request_ends_with_the_grammar_without_an_eos_step(engine):
    out = engine.generate(["The quick"], guided(guided_regex="[a-z]{3}-[0-9]{2}"))[0]
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", out.text) and out.finish_reason == "stop"
    tokenizer = engine.tokenizer
    assert tokenizer.decode(out.token_ids) == out.text  # every token is text: no EOS was sampled
    assert not set(out.token_ids) & engine.eos_token_ids


def test_choice_outputs_are_one_of_the_choices(engine):
    choices = ["Paris", "New York", 'a "quoted" \\ one', "Zürich"]  # spaces, JSON escapes, non-ASCII
    outs = engine.generate(PROMPTS * 2, guided(guided_choice=choices, temperature=1.0, seed=3))
    assert all(o.text in choices and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    assert engine.stats().kv_usage == 0.0


def test_many_choices_compile(tiny_folder):
    """A long choice list is one lexer terminal: 100,000 choices compile (as grammar rules they passed
    llguidance's symbol limit, a 400)."""
    choices = [f"choice {i} \"q\"" for i in range(100_000)]
    manager = StructuredOutputManager(Tokenizer.from_pretrained(tiny_folder), [0])
    assert manager.matcher_for(SamplingParams(guided_choice=choices)) is not None


def test_regex_grammar_and_json_object(engine):
    yes_no = engine.generate(PROMPTS, guided(guided_grammar='root ::= "yes" | "no"', temperature=1.0, seed=1))
    assert {o.text for o in yes_no} <= {"yes", "no"} and all(o.finish_reason == "stop" for o in yes_no)
    lark = engine.generate(PROMPTS[:1], guided(guided_grammar='start: "a" NUM\nNUM: /[0-9]{2}/'))[0]
    assert re.fullmatch("a[0-9]{2}", lark.text)
    objects = engine.generate(PROMPTS, guided(guided_json_object=True, max_tokens=120))
    for o in objects:  # a random model may run out of tokens inside an object; what it wrote is JSON so far
        assert o.text.startswith("{")
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)


def test_guided_rows_do_not_change_unguided_neighbours(tiny_folder, engine):
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = engine.generate(PROMPTS, plain)
    streams = []
    for i, prompt in enumerate(PROMPTS):
        streams.append(engine.add_request(f"mix-plain-{i}", prompt, plain))
        streams.append(engine.add_request(f"mix-guided-{i}", prompt, guided(guided_json=SCHEMA)))
    outs = [s.result() for s in streams]
    assert [o.token_ids for o in outs[0::2]] == [o.token_ids for o in alone]
    for o in outs[1::2]:
        jsonschema.validate(json.loads(o.text), SCHEMA)


@pytest.mark.parametrize("overrides", [
    dict(enable_async_scheduling=False),  # the synchronous loop
    dict(num_kv_blocks=40, max_num_batched_tokens=16),  # preemption by recompute, chunked prefill
])
def test_same_guided_output_in_every_loop_mode(tiny_folder, engine, overrides):
    params = [guided(guided_json=SCHEMA), guided(guided_regex="[a-z ]{5,30}", max_tokens=40)]
    reference = [[o.token_ids for o in engine.generate(PROMPTS * 3, p)] for p in params]
    other = make_tiny_engine(tiny_folder, **overrides).start()
    try:
        for p, expected in zip(params, reference):
            assert [o.token_ids for o in other.generate(PROMPTS * 3, p)] == expected
        assert other.stats().kv_usage == 0.0
        if "num_kv_blocks" in overrides:
            assert other.stats().num_preemptions > 0
    finally:
        other.shutdown()


def test_the_llguidance_tokenizer_is_built_at_start_up(engine):
    """Its construction holds the GIL (238 ms for the default model's vocabulary on the 2-core VM): built on the
    first guided request, it stalled every stream; the engine builds it before serving."""
    assert engine.structured_output._ll_tokenizer is not None


def test_a_tokenizer_llguidance_cannot_read_is_said_at_start_up_and_refused_per_request(manager, monkeypatch,
                                                                                          caplog):
    _, tokenizer = manager
    fresh = StructuredOutputManager(tokenizer, tokenizer.eos_token_ids)
    monkeypatch.setattr(tokenizer, "to_json", lambda: "{not a tokenizer")
    with caplog.at_level("WARNING", logger="kvtriton"):
        fresh.warm_up()
    assert "guided decoding is not available for this model's tokenizer" in caplog.text
    with pytest.raises(ValueError, match="guided decoding is not available"):
        fresh.matcher_for(guided(guided_regex="ok"))


def test_invalid_schema_is_refused_at_once_and_the_engine_serves_on(engine):
    with pytest.raises(ValueError, match="guided_json is invalid"):
        engine.add_request("bad-schema", "hi", guided(guided_json='{"type": "foo"}'))
    out = engine.generate(["hi"], guided(guided_regex="ok"))[0]
    assert out.text == "ok" and engine.stats().kv_usage == 0.0


def test_a_token_outside_the_grammar_ends_that_request_with_an_error(tiny_folder):
    engine = make_tiny_engine(tiny_folder)
    real_bitmask = engine.structured_output.bitmask
    broken = threading.Event()

    def bitmask(seqs, device):  # a mask that lets everything through, once the guided request has begun
        mask = real_bitmask(seqs, device)
        if mask is not None and any(s.num_output_tokens for s in seqs if s.grammar is not None):
            broken.set()
            return None
        return mask

    engine.structured_output.bitmask = bitmask
    engine.start()
    try:
        bad = engine.add_request("off-grammar", "The quick", guided(guided_regex="x[0-9]{20}", ignore_eos=True))
        good = engine.add_request("plain", "The quick", SamplingParams(max_tokens=10, ignore_eos=True))
        out = bad.result()
        assert out.finish_reason == "error" and "does not fit the guided_* constraint" in out.error
        assert good.result().finish_reason == "length" and broken.is_set()
        assert engine.stats().kv_usage == 0.0
    finally:
        engine.shutdown()


def test_abort_of_a_guided_request_frees_its_blocks(engine):
    stream = engine.add_request("guided-abort", "The quick", guided(guided_regex="[a-z]{500}", max_tokens=200))
    engine.abort("guided-abort")
    assert stream.result().finish_reason in ("abort", "length")
    assert engine.stats().kv_usage == 0.0
