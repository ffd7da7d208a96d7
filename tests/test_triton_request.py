"""The `llm` model's request contract without a server: parse_generate_request over a dict of inputs,
config.pbtxt against the contract's table, and auto_complete_config with Triton's own ModelConfig."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.triton.request import INPUTS, KEY_ALIASES, OUTPUTS, RequestError, parse_generate_request

from tests.fake_pb_utils import import_model

CONFIG_PBTXT = Path(__file__).resolve().parent.parent / "model_repository" / "llm" / "config.pbtxt"


def text(*values) -> np.ndarray:
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=np.object_)


def parse(parameters: dict | str | None = None, **inputs):
    """parse_generate_request as execute() calls it, with the inputs in a dict."""
    inputs.setdefault("text_input", text("Hi"))
    if isinstance(parameters, dict):
        parameters = json.dumps(parameters)
    return parse_generate_request(inputs.get, parameters, render)


def render(messages, tools=None, **options) -> str:
    """A stand-in chat template that shows what it was given."""
    if tools is None and not options:
        return json.dumps(messages)
    return json.dumps({"messages": messages, **({"tools": tools} if tools is not None else {}), **options})


# ---- parsing ----------------------------------------------------------------------------------------------
def test_typed_inputs_become_sampling_params():
    r = parse(max_tokens=np.array([7], np.int32), temperature=np.array([0.5], np.float32),
              top_k=np.array([3], np.int32), seed=np.array([11], np.uint64), stop=text("a", "b"),
              ignore_eos=np.array([True]), logprobs=np.array([2], np.int32), stream=np.array([True]),
              exclude_input_in_output=np.array([True]))
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stop, p.ignore_eos, p.logprobs) == \
           (7, 0.5, 3, 11, ("a", "b"), True, 2)
    assert r.prompt == "Hi" and r.stream is True and r.exclude_input_in_output is True


def test_defaults_without_sampling_inputs():
    r = parse()
    assert r.params == SamplingParams() and r.stream is False and r.exclude_input_in_output is False


def test_tensorrt_llm_tensor_names_map_onto_vllm_names():
    p = parse(random_seed=np.array([7], np.uint64), min_length=np.array([2], np.int32),
              stop_words=text("zzz"), return_log_probs=np.array([True])).params
    assert (p.seed, p.min_tokens, p.stop, p.logprobs) == (7, 2, ("zzz",), 0)


def test_return_log_probs_does_not_lower_asked_top_logprobs():
    assert parse(logprobs=np.array([3], np.int32), return_log_probs=np.array([True])).params.logprobs == 3
    assert parse(return_log_probs=np.array([False])).params.logprobs is None


def test_tensorrt_llm_names_are_accepted_in_json_too():
    p = parse(sampling_parameters=text(json.dumps({"random_seed": 5, "stop_words": ["x"], "min_length": 1,
                                                   "max_new_tokens": 9}))).params
    assert (p.seed, p.stop, p.min_tokens, p.max_tokens) == (5, ("x",), 1, 9)


def test_alias_and_vllm_name_in_one_json_object_is_an_error():
    with pytest.raises(RequestError, match="sampling_parameters: seed and random_seed both set seed"):
        parse(sampling_parameters=text(json.dumps({"seed": 1, "random_seed": 2})))


def test_precedence_json_then_parameters_then_typed_inputs():
    sampling_json = text(json.dumps({"temperature": 0.1, "top_p": 0.5, "max_tokens": 3, "stream": True}))
    parameters = {"temperature": 0.2, "top_p": 0.6, "stream": False, "triton_enable_empty_final_response": True}
    r = parse(parameters, sampling_parameters=sampling_json, temperature=np.array([0.3], np.float32))
    assert r.params.temperature == pytest.approx(0.3)  # typed input over both JSON objects
    assert r.params.top_p == pytest.approx(0.6)  # request parameters over sampling_parameters
    assert r.params.max_tokens == 3 and r.stream is False  # ... also for the flags


def test_typed_tensorrt_llm_name_wins_over_vllm_name():
    assert parse(seed=np.array([1], np.uint64), random_seed=np.array([2], np.uint64)).params.seed == 2


USER = [{"role": "user", "content": "Hi"}]


def test_messages_go_through_the_chat_template():
    r = parse(messages=text(json.dumps(USER)))
    assert r.prompt == json.dumps(USER)


def test_tools_and_tool_turns_reach_the_chat_template():
    """OpenAI's tool definitions and a conversation that called one: an assistant turn with tool_calls and no
    content, the tool's answer naming its call."""
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "name": "get_time", "content": "noon"}]
    r = parse(messages=text(json.dumps(messages)), tools=text(json.dumps(tools)))
    assert json.loads(r.prompt) == {"messages": messages, "tools": tools}


def test_chat_template_kwargs_reach_the_chat_template():
    """HF's two flags by name, the template's own variables as template_kwargs."""
    kwargs = {"enable_thinking": False, "add_generation_prompt": False, "continue_final_message": True}
    r = parse(messages=text(json.dumps(USER)), chat_template_kwargs=text(json.dumps(kwargs)))
    assert json.loads(r.prompt) == {"messages": USER, "add_generation_prompt": False, "continue_final_message": True,
                                    "template_kwargs": {"enable_thinking": False}}
    assert json.loads(parse(messages=text(json.dumps(USER)), chat_template_kwargs=text("{}")).prompt) == USER


def test_input_ids_are_the_prompt_as_token_ids():
    """TensorRT-LLM's input_ids (and OpenAI's token-id prompts through the frontend): a list the engine admits."""
    assert parse(text_input=None, input_ids=np.array([5, 6, 7], np.int32)).prompt == [5, 6, 7]
    assert parse(text_input=None, input_ids=np.array([[5, 6]], np.int32)).prompt == [5, 6]  # a batch of one


def test_tools_count_towards_max_prompt_bytes():
    tools = text(json.dumps([{"type": "function", "function": {"name": "f" * 64}}]))
    with pytest.raises(RequestError, match="max_prompt_bytes"):
        parse_generate_request({"messages": text(json.dumps(USER)), "tools": tools}.get, None, render,
                               max_prompt_bytes=100)


@pytest.mark.parametrize("inputs, parameters, field", [
    ({"sampling_parameters": text("{max_tokens: 4")}, None, "sampling_parameters is not valid JSON"),
    ({"sampling_parameters": text("[1]")}, None, "sampling_parameters must be a JSON object"),
    ({}, "{oops", "parameters is not valid JSON"),
    ({"text_input": text(b"caf\xc3(")}, None, "text_input is not valid UTF-8"),
    ({"stop": text(b"\xff")}, None, "stop is not valid UTF-8"),
    ({"text_input": text("a", "b")}, None, "text_input must hold exactly one element, got shape [2]"),
    ({"max_tokens": np.array([1, 2], np.int32)}, None, "max_tokens must hold exactly one element"),
    ({"stream": np.array([True, False])}, None, "stream must hold exactly one element"),
    ({"sampling_parameters": text(json.dumps({"tempreature": 1}))}, None, "unknown sampling parameter 'tempreature'"),
    ({"temperature": np.array([-1.0], np.float32)}, None, "temperature must be >= 0"),
    ({"sampling_parameters": text(json.dumps({"stream": "maybe"}))}, None, "stream must be a boolean"),
    ({"messages": text(json.dumps([{"content": "Hi"}]))}, None, "messages must be a JSON list"),
    ({"messages": text(json.dumps([{"role": "user"}]))}, None, "messages[0].content must be a string, got nothing"),
    ({"messages": text(json.dumps([{"role": "user", "content": 3}]))}, None, "messages[0].content must be a string"),
    ({"messages": text(json.dumps([{"role": "tool", "content": "x", "tool_call_id": 1}]))}, None,
     "messages[0].tool_call_id must be a string"),
    ({"messages": text(json.dumps([{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]))}, None,
     "messages[0].tool_calls[0] must be"),
    ({"messages": text(json.dumps([{"role": "assistant", "tool_calls": {}}]))}, None,
     "messages[0].tool_calls must be a list"),
    ({"tools": text("[]")}, None, "tools needs messages"),
    ({"chat_template_kwargs": text("{}")}, None, "chat_template_kwargs needs messages"),
    ({"messages": text(json.dumps(USER)), "chat_template_kwargs": text("[]")}, None,
     "chat_template_kwargs must be a JSON object"),
    ({"messages": text(json.dumps(USER)), "chat_template_kwargs": text('{"continue_final_message": "yes"}')}, None,
     "chat_template_kwargs.continue_final_message must be true or false"),
    ({"messages": text(json.dumps(USER)), "tools": text("{}")}, None, "tools must be a JSON list"),
    ({"messages": text(json.dumps(USER)), "tools": text('[{"type": "function"}]')}, None, "tools[0] must be"),
    ({"messages": text(json.dumps(USER)), "tools": text('[{"type": "retrieval", "function": {"name": "f"}}]')}, None,
     "tools[0] must be"),
    ({"messages": text(json.dumps(USER)), "tools": text('[{"function": {"name": "f", "parameters": 1}}]')}, None,
     "tools[0].function.parameters must be a JSON schema object"),
    ({"messages": text(json.dumps(USER)), "tools": text("[oops")}, None, "tools is not valid JSON"),
    ({"text_input": None}, None, "text_input is required"),
    ({"text_input": None, "input_ids": np.array([1.5], np.float32)}, None, "input_ids must be one list of integer"),
    ({"input_ids": np.array([1, 2], np.int32)}, None, "text_input or as input_ids, not both"),
])
def test_bad_input_is_a_request_error_naming_the_field(inputs, parameters, field):
    with pytest.raises(RequestError) as err:
        parse(parameters, **inputs)
    assert field in str(err.value)


# ---- the contract: one table, config.pbtxt and auto_complete_config agree with it -----------------------
def pbtxt_tensors(kind: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, data type, dims) of config.pbtxt's `input [...]` or `output [...]` block, in order."""
    block = re.search(rf"^{kind} \[(.*?)^\]", CONFIG_PBTXT.read_text(), re.M | re.S).group(1)
    entries = re.findall(r'name: "(\w+)", data_type: (TYPE_\w+), dims: \[([^\]]*)\]', block)
    return [(name, dtype, tuple(int(d) for d in dims.split(","))) for name, dtype, dims in entries]


@pytest.mark.parametrize("kind, table", [("input", INPUTS), ("output", OUTPUTS)])
def test_config_pbtxt_declares_exactly_the_contract(kind, table):
    assert pbtxt_tensors(kind) == [(s.name, s.data_type, s.dims) for s in table]


def test_the_table_maps_every_sampling_input_onto_a_sampling_params_field():
    fields = SamplingParams.accepted_keys()
    assert {s.sampling_key for s in INPUTS if s.role == "sampling"} <= fields
    assert set(KEY_ALIASES.values()) <= fields and not set(KEY_ALIASES) & fields


def triton_model_config(inputs=(), outputs=()):
    """Triton's own ModelConfig (the auto-complete argument), from the installed Python backend."""
    from kvtriton.backend.entrypoints.triton_install import TritonServerError, find_tritonserver

    try:
        path = find_tritonserver().backend_dir / "python" / "triton_python_backend_utils.py"
    except TritonServerError as exc:
        pytest.skip(f"no tritonserver: {exc}")
    spec = importlib.util.spec_from_file_location("_triton_pb_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # As Triton hands it over: the config's JSON, every declared input with its data type and dims.
    config = {"name": "llm", "max_batch_size": 0, "input": list(inputs), "output": list(outputs)}
    return module.ModelConfig(json.dumps(config))


def test_auto_complete_declares_the_whole_contract_and_decoupled_mode(monkeypatch):
    model = import_model(monkeypatch)
    config = model.TritonPythonModel.auto_complete_config(triton_model_config()).as_dict()
    assert [(e["name"], e["data_type"], tuple(e["dims"])) for e in config["input"]] == \
           [(s.name, s.data_type, s.dims) for s in INPUTS]
    assert all(e["optional"] for e in config["input"])
    assert [e["name"] for e in config["output"]] == [s.name for s in OUTPUTS]
    assert config["model_transaction_policy"] == {"decoupled": True}


def test_auto_complete_keeps_what_config_pbtxt_declares_and_adds_the_rest(monkeypatch):
    model = import_model(monkeypatch)
    declared = [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [1], "optional": True}]
    config = model.TritonPythonModel.auto_complete_config(triton_model_config(declared)).as_dict()
    names = [e["name"] for e in config["input"]]
    assert names[0] == "text_input" and sorted(names) == sorted(s.name for s in INPUTS)


def test_auto_complete_refuses_a_declared_input_with_another_data_type(monkeypatch):
    model = import_model(monkeypatch)
    declared = [{"name": "max_tokens", "data_type": "TYPE_FP32", "dims": [1], "optional": True}]
    with pytest.raises(ValueError, match="input 'max_tokens' as TYPE_FP32.*contract.*TYPE_INT32"):
        model.TritonPythonModel.auto_complete_config(triton_model_config(declared))
