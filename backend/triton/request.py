"""The `llm` model's request contract (INPUTS, OUTPUTS) and the parsing of one request into a prompt +
SamplingParams, or a RequestError naming the field.

Accepts the vLLM backend's format (text_input, stream, sampling_parameters JSON,
exclude_input_in_output) and the TensorRT-LLM tensor names (random_seed,
stop_words, min_length, return_log_probs). Those aliases live here only: the
engine's SamplingParams knows vLLM's names alone. Precedence, lowest first:
sampling_parameters JSON, the request's parameters (Triton's generate endpoint
puts `"parameters": {...}` there), typed inputs.
A request's `task` input (default "generate") may instead ask for the prompt's token ids ("tokenize": text,
a chat or ids, encoded as a generation would encode them) or for the text of `input_ids` ("detokenize"):
answered at once, without the engine (vLLM's /tokenize and /detokenize).
Independent of pb_utils so it is unit-testable: inputs arrive through a getter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kvtriton.backend.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the contract: what Triton declares, and what the adapter does with it."""

    name: str
    data_type: str  # Triton's TYPE_* name
    dims: tuple[int, ...]  # (-1,): a list
    role: str  # prompt | chat | task | flag | sampling_json | sampling | return_log_probs | output
    sampling_key: str | None = None  # role "sampling": the SamplingParams field the input sets

    def as_config(self) -> dict[str, Any]:
        """The entry auto_complete_config adds (dims as a list: Triton compares it with the config's)."""
        entry = {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)}
        return entry if self.role == "output" else {**entry, "optional": True}


def _sampling(name: str, data_type: str, key: str | None = None, dims: tuple[int, ...] = (1,)) -> TensorSpec:
    return TensorSpec(name, data_type, dims, "sampling", key or name)


# Every input is optional to Triton; parse_generate_request asks for text_input or messages. Of two typed
# inputs that set one key, the later row wins (random_seed over seed).
INPUTS = (
    TensorSpec("text_input", "TYPE_STRING", (1,), "prompt"),
    TensorSpec("input_ids", "TYPE_INT32", (-1,), "prompt"),  # TensorRT-LLM's: the prompt as token ids
    TensorSpec("messages", "TYPE_STRING", (1,), "chat"),
    TensorSpec("tools", "TYPE_STRING", (1,), "chat"),  # OpenAI's tool definitions, for the chat template
    # A JSON object: more chat-template variables (HF's apply_chat_template kwargs, vLLM's chat_template_kwargs,
    # e.g. {"enable_thinking": false}), and add_generation_prompt / continue_final_message as HF takes them.
    TensorSpec("chat_template_kwargs", "TYPE_STRING", (1,), "chat"),
    TensorSpec("task", "TYPE_STRING", (1,), "task"),  # generate (the default) | tokenize | detokenize
    TensorSpec("stream", "TYPE_BOOL", (1,), "flag"),
    TensorSpec("sampling_parameters", "TYPE_STRING", (1,), "sampling_json"),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", (1,), "flag"),
    _sampling("max_tokens", "TYPE_INT32"),
    _sampling("temperature", "TYPE_FP32"),
    _sampling("top_p", "TYPE_FP32"),
    _sampling("top_k", "TYPE_INT32"),
    _sampling("min_p", "TYPE_FP32"),
    _sampling("seed", "TYPE_UINT64"),
    _sampling("random_seed", "TYPE_UINT64", "seed"),  # TensorRT-LLM
    _sampling("stop", "TYPE_STRING", dims=(-1,)),
    _sampling("stop_words", "TYPE_STRING", "stop", dims=(-1,)),  # TensorRT-LLM
    _sampling("ignore_eos", "TYPE_BOOL"),
    _sampling("min_tokens", "TYPE_INT32"),
    _sampling("min_length", "TYPE_INT32", "min_tokens"),  # TensorRT-LLM
    _sampling("repetition_penalty", "TYPE_FP32"),
    _sampling("presence_penalty", "TYPE_FP32"),
    _sampling("frequency_penalty", "TYPE_FP32"),
    _sampling("logprobs", "TYPE_INT32"),
    _sampling("num_speculative_tokens", "TYPE_INT32"),  # 0: no speculative decoding for this request
    _sampling("priority", "TYPE_INT32"),  # scheduling_policy priority: lower runs sooner (vLLM's)
    TensorSpec("return_log_probs", "TYPE_BOOL", (1,), "return_log_probs"),  # TensorRT-LLM: true = logprobs 0
)
OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (-1,), "output"),
    TensorSpec("num_input_tokens", "TYPE_UINT32", (1,), "output"),
    TensorSpec("num_output_tokens", "TYPE_UINT32", (1,), "output"),
    TensorSpec("finish_reason", "TYPE_STRING", (1,), "output"),
    TensorSpec("logprobs", "TYPE_STRING", (1,), "output"),
    # JSON, on the first response of a request with prompt_logprobs: one entry per prompt token (the first's
    # logprob null).
    TensorSpec("prompt_logprobs", "TYPE_STRING", (1,), "output"),
    # On a generation's final response: how many prompt tokens the prefix cache served (not computed again).
    TensorSpec("num_cached_tokens", "TYPE_UINT32", (1,), "output"),
    # The answer to task "tokenize": the prompt's ids, and the context they must fit in (vLLM's /tokenize).
    TensorSpec("token_ids", "TYPE_INT32", (-1,), "output"),
    TensorSpec("max_model_len", "TYPE_UINT32", (1,), "output"),
)
TASKS = ("generate", "tokenize", "detokenize")
FLAG_KEYS = tuple(spec.name for spec in INPUTS if spec.role == "flag")
# Other names for sampling keys in the JSON objects: the typed inputs' TensorRT-LLM names, and
# max_new_tokens (Hugging Face generate()'s name, JSON only).
KEY_ALIASES = {spec.name: spec.sampling_key for spec in INPUTS
               if spec.role == "sampling" and spec.name != spec.sampling_key} | {"max_new_tokens": "max_tokens"}


# The JSON objects of a request (sampling_parameters, parameters) are a few hundred bytes; this bounds the
# work of parsing one before any of it is checked.
MAX_JSON_BYTES = 65536


class RequestError(ValueError):
    """A client mistake; its message is sent back as the error response."""


@dataclass(frozen=True)
class Prompt:
    value: str | list[int]  # text, or token ids (input_ids)
    chat: bool = False  # text the chat template rendered (messages): Tokenizer.encode_chat_prompt encodes it


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str | list[int]  # text, or token ids (input_ids)
    stream: bool
    exclude_input_in_output: bool
    params: SamplingParams
    chat: bool = False  # the prompt is a rendered chat (Prompt.chat)


def parse_task(get_input: Callable[[str], np.ndarray | None]) -> str:
    """The request's task: "generate" unless its `task` input says "tokenize" or "detokenize"."""
    tensor = get_input("task")
    if tensor is None:
        return "generate"
    task = _text("task", tensor)
    if task not in TASKS:
        raise RequestError(f"task must be one of {', '.join(TASKS)}, got {task[:40]!r}")
    return task


def parse_generate_request(get_input: Callable[[str], np.ndarray | None], parameters_json: str | None,
                           apply_chat_template: Callable[..., str], max_prompt_bytes: int = 0,
                           sampling_defaults: dict[str, Any] | None = None) -> GenerateRequest:
    """`max_prompt_bytes` (0: no bound) bounds text_input and messages before they are decoded or rendered;
    `sampling_defaults` (the model's: engine/generation_defaults.py) stand in for sampling keys left unset."""
    sampling: dict[str, Any] = {}
    flags: dict[str, Any] = {"stream": False, "exclude_input_in_output": False}

    raw = get_input("sampling_parameters")
    if raw is not None:
        _check_size("sampling_parameters", _nbytes(raw), MAX_JSON_BYTES)
        _merge_json("sampling_parameters", _text("sampling_parameters", raw), sampling, flags)
    if parameters_json:
        _check_size("parameters", len(parameters_json), MAX_JSON_BYTES)
        _merge_json("parameters", parameters_json, sampling, flags)
    for spec in INPUTS:
        tensor = get_input(spec.name)
        if tensor is None:
            continue
        if spec.role == "flag":
            flags[spec.name] = bool(_scalar(spec.name, tensor))
        elif spec.role == "sampling" and spec.dims == (-1,):
            sampling[spec.sampling_key] = [_decode(spec.name, b) for b in tensor.reshape(-1)]
        elif spec.role == "sampling":
            sampling[spec.sampling_key] = _scalar(spec.name, tensor)
        elif spec.role == "return_log_probs" and bool(_scalar(spec.name, tensor)):
            sampling.setdefault("logprobs", 0)

    try:
        params = SamplingParams.from_dict(sampling, sampling_defaults)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    prompt = parse_prompt(get_input, apply_chat_template, max_prompt_bytes)
    return GenerateRequest(prompt.value, _bool("stream", flags["stream"]),
                           _bool("exclude_input_in_output", flags["exclude_input_in_output"]), params, prompt.chat)


def _merge_json(name: str, text: str, sampling: dict[str, Any], flags: dict[str, Any]) -> None:
    """One JSON object's keys over `sampling` and `flags` (vLLM clients sometimes put "stream" in the
    sampling JSON). Aliases become vLLM's names; an alias beside its vLLM name in one object is an error."""
    given_as: dict[str, str] = {}
    for key, value in _json_object(name, text).items():
        if key.startswith("triton_"):  # set by Triton / tritonclient themselves
            continue
        if key in FLAG_KEYS:
            if value is not None:  # JSON null: keep the default, as for sampling keys
                flags[key] = value
            continue
        canonical = KEY_ALIASES.get(key, key)
        if canonical in given_as:
            raise RequestError(f"{name}: {given_as[canonical]} and {key} both set {canonical}; give only one")
        given_as[canonical] = key
        sampling[canonical] = value


def parse_prompt(get_input, apply_chat_template, max_prompt_bytes: int) -> Prompt:
    """The prompt of text_input, input_ids, or messages (with tools and chat_template_kwargs) rendered."""
    messages, tools, kwargs = get_input("messages"), get_input("tools"), get_input("chat_template_kwargs")
    if messages is not None:
        _check_size("messages", _nbytes(messages) + (_nbytes(tools) if tools is not None else 0), max_prompt_bytes,
                    "max_prompt_bytes")
        value = _json("messages", _text("messages", messages))
        if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
            raise RequestError('messages must be a JSON list of {"role": ..., "content": ...} objects')
        for i, m in enumerate(value):
            _check_message(i, m)
        options = _template_options(kwargs) if kwargs is not None else {}
        return Prompt(apply_chat_template(value, _tools(tools) if tools is not None else None, **options), chat=True)
    for name, tensor in (("tools", tools), ("chat_template_kwargs", kwargs)):
        if tensor is not None:
            raise RequestError(f"{name} needs messages: a text_input prompt is not rendered by the chat template")
    text, ids = get_input("text_input"), get_input("input_ids")
    if text is not None and ids is not None:
        raise RequestError("give the prompt as text_input or as input_ids, not both")
    if ids is not None:
        if ids.dtype.kind not in "iu" or ids.ndim > 2 or (ids.ndim == 2 and ids.shape[0] != 1):
            raise RequestError(f"input_ids must be one list of integer token ids, got {ids.dtype} of shape "
                               f"{list(ids.shape)}")
        return Prompt([int(t) for t in ids.reshape(-1)])  # admission checks them against the vocabulary
    if text is None:
        raise RequestError("text_input is required (or messages, or input_ids)")
    _check_size("text_input", _nbytes(text), max_prompt_bytes, "max_prompt_bytes")
    return Prompt(_text("text_input", text))


def _check_message(i: int, m: dict) -> None:
    """OpenAI's message shape: string role and content; an assistant turn's tool_calls may stand in for its
    content, and a tool result names its call (tool_call_id). The template gets the object as sent."""
    if not isinstance(m["role"], str):
        raise RequestError(f"messages[{i}].role must be a string, got {type(m['role']).__name__}")
    if m.get("content") is None and "tool_calls" in m:
        pass  # an assistant turn that only calls tools
    elif not isinstance(m.get("content"), str):
        got = "nothing" if "content" not in m else type(m["content"]).__name__
        raise RequestError(f"messages[{i}].content must be a string, got {got}")
    for key in ("tool_call_id", "name"):
        if key in m and not isinstance(m[key], str):
            raise RequestError(f"messages[{i}].{key} must be a string, got {type(m[key]).__name__}")
    calls = m.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise RequestError(f"messages[{i}].tool_calls must be a list, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments"), (str, dict)):
            raise RequestError(f'messages[{i}].tool_calls[{j}] must be {{"function": {{"name": ..., "arguments": '
                               '...}}} with a string name and the arguments as a JSON string or object')


def _template_options(tensor: np.ndarray) -> dict[str, Any]:
    """chat_template_kwargs as Tokenizer.apply_chat_template's keywords: HF's two flags by name, the rest as
    template variables."""
    _check_size("chat_template_kwargs", _nbytes(tensor), MAX_JSON_BYTES)
    kwargs = _json_object("chat_template_kwargs", _text("chat_template_kwargs", tensor))
    options: dict[str, Any] = {}
    for flag in ("add_generation_prompt", "continue_final_message"):
        if flag in kwargs:
            value = kwargs.pop(flag)
            if not isinstance(value, bool):
                raise RequestError(f"chat_template_kwargs.{flag} must be true or false, got {value!r}")
            options[flag] = value
    if kwargs:
        options["template_kwargs"] = kwargs
    return options


def _tools(tensor: np.ndarray) -> list[dict]:
    """OpenAI's `tools`: [{"type": "function", "function": {"name": ..., "parameters": {...}}}]."""
    value = _json("tools", _text("tools", tensor))
    if not isinstance(value, list):
        raise RequestError(f"tools must be a JSON list of tool definitions, got {type(value).__name__}")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise RequestError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        if not isinstance(function.get("parameters", {}), dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object")
    return value


def _nbytes(tensor: np.ndarray) -> int:
    """The payload size of a BYTES tensor (Python bytes objects) or a fixed-size one."""
    if tensor.dtype == np.object_:
        return sum(len(v) if isinstance(v, (bytes, str)) else 0 for v in tensor.reshape(-1))
    return tensor.nbytes


def _check_size(name: str, size: int, limit: int, setting: str = "") -> None:
    if limit and size > limit:
        raise RequestError(f"{name} must be at most {limit} bytes" + (f" ({setting})" if setting else "") +
                           f", got {size}")


def _text(name: str, tensor: np.ndarray) -> str:
    flat = tensor.reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got shape {list(tensor.shape)}")
    return _decode(name, flat[0])


def _decode(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return str(value)


def _scalar(name: str, tensor: np.ndarray) -> Any:
    flat = tensor.reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got shape {list(tensor.shape)}")
    value = flat[0]
    if isinstance(value, bytes):
        return _decode(name, value)
    return value.item() if isinstance(value, np.generic) else value


def _json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise RequestError(f"{name} is not valid JSON: nested too deeply") from None


def _json_object(name: str, text: str) -> dict[str, Any]:
    value = _json(name, text) if text.strip() else {}
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise RequestError(f"{name} must be a boolean, got {value!r}")
